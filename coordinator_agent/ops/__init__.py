"""What operators see: the HTTP API, Prometheus metrics and the live status page."""
