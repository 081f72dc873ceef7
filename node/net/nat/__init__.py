"""Nodes behind home routers: reachability (AutoNAT v1), circuit relay v2 and hole punching (DCUtR)."""
