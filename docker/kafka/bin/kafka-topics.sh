#!/bin/bash
# as Kafka's own bin/kafka-topics.sh (the compose file's health check calls it)
KAFKA_TOOLS=1 KAFKA_HEAP_OPTS="-Xmx256m" exec kafka-run-class org.apache.kafka.tools.TopicCommand "$@"
