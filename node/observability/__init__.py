"""What a node shows: status files, Prometheus metrics."""
