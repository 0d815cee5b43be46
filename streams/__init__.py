"""imagefork: a Kafka-native image fan-out pipeline (planner -> resize -> join)."""

__version__ = "0.1.0"
