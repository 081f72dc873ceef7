"""Replicated mode: the engine, routing, gradient averaging, state sync, rebalancing."""
