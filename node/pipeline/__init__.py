"""The synchronous pipeline schedule and its runner."""
