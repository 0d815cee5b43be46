"""The local stack: Apache Kafka (KRaft) and S3Proxy from Maven Central, on loopback."""
