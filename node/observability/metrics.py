"""Prometheus metrics of one node (own registry, served on `NodeConfig.metrics_port`)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, start_http_server


class NodeMetrics:
    """Gauges and counters updated by the daemon after each step."""

    def __init__(self, stage: int) -> None:
        self.registry = CollectorRegistry()
        labels = {"stage": str(stage)}
        self.tokens_per_s = Gauge("pmn_tokens_per_second", "Tokens per second over the last step", ["stage"],
                                  registry=self.registry).labels(**labels)
        self.step = Gauge("pmn_step", "Last completed global step", ["stage"], registry=self.registry).labels(**labels)
        self.loss = Gauge("pmn_tail_loss", "Mean training loss of the last step (tail stage)", ["stage"],
                          registry=self.registry).labels(**labels)
        self.bytes_in = Counter("pmn_bytes_in", "Activation-protocol bytes received", ["stage"],
                                registry=self.registry).labels(**labels)
        self.bytes_out = Counter("pmn_bytes_out", "Activation-protocol bytes sent", ["stage"],
                                 registry=self.registry).labels(**labels)
        self.peers = Gauge("pmn_peers", "Connected libp2p peers", ["stage"], registry=self.registry).labels(**labels)
        self.comm_fraction = Gauge("pmn_comm_fraction", "Share of the last step spent waiting on the network",
                                   ["stage"], registry=self.registry).labels(**labels)

    def serve(self, port: int, addr: str = "127.0.0.1") -> None:
        """Start the HTTP exporter in a daemon thread."""
        start_http_server(port, addr=addr, registry=self.registry)
