"""The Prometheus exporter: background collection from the core, served from a snapshot."""
