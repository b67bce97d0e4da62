"""Kafka and Redis plumbing that knows no model: settings, topics, batching, replies, cache, runtime."""
