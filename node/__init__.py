"""Node package: libp2p host, wire frames, pipeline runtime and daemon."""
