"""aisemble: a Kafka-native AI inference pipeline (see README.md)."""

__version__ = "0.1.0"
