"""Pub/Sub: the typed events, publishing them, push envelopes, and the topology."""
