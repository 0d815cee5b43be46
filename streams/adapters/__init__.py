"""Thin adapters to the outside: object store (boto3), source fetching, Kafka admin and client."""
