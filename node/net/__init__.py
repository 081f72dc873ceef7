"""Networking: the libp2p host, node identity, discovery (bootstrap, DHT, gossip), length-prefixed messages, transport speed-ups as host options."""
