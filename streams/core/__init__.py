"""The pure core: planning, imaging and join bookkeeping. No Kafka, no S3, no network."""
