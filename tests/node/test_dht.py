"""Discovery through the Kademlia DHT: real hosts on 127.0.0.1, bounded, cleaned up by their nurseries."""

from __future__ import annotations

import logging
import socket

import pytest
import trio
from libp2p.peer.id import ID

from node.config import DhtConfig, DiscoveryConfig, NodeConfig
from node.net.dht import ModelDht, model_key
from node.net.discovery import Announcement, Discovery
from node.net.host import full_addrs
from node.net.identity import NodeIdentity, identity_from_secret
from tests.node.conftest import running_host
from tests.waiting import until

SPEC = "ab" * 32
FAST = DhtConfig(provide_interval_s=0.5, lookup_interval_s=0.1, query_timeout_s=5, error_backoff_s=0.05,
                 error_backoff_max_s=0.2)


def _cfg(dht: DhtConfig = FAST) -> DiscoveryConfig:
    return DiscoveryConfig(announce_interval_s=0.05, discovery_timeout_s=10, dht=dht)


def _me(host, stage: int) -> Announcement:
    return Announcement(host.get_id().pretty(), tuple(full_addrs(host)), SPEC, 3, stage, 1)


def _node(host, ident: NodeIdentity, stage: int, bootstrap: list[str], use_dht: bool = True) -> Discovery:
    cfg = _cfg()
    return Discovery(host, _me(host, stage), cfg, bootstrap, ModelDht(host, SPEC, cfg.dht) if use_dht else None,
                     identity=ident)


def test_model_key_is_a_sha256_multihash_per_spec_hash() -> None:
    k = model_key(SPEC)
    assert k[:2] == b"\x12\x20" and len(k) == 34
    assert k == model_key(SPEC.upper()) and k != model_key("cd" * 32)
    with pytest.raises(ValueError, match="spec hash must be a hex string"):
        model_key("not-hex")


@pytest.mark.parametrize(("field", "value"), [("lookup_interval_s", 0.0), ("provide_interval_s", -1.0),
                                              ("query_timeout_s", 0.0), ("max_providers", 0)])
def test_bad_dht_config_is_refused_naming_the_field(field: str, value: float) -> None:
    cfg = NodeConfig()
    setattr(cfg.discovery.dht, field, value)
    with pytest.raises(ValueError, match=f"discovery.dht.{field}"):
        cfg.validate()


@pytest.mark.network
@pytest.mark.timeout(60)
def test_dht_finds_peers_that_bootstrap_and_gossip_cannot_reach() -> None:
    """R runs only the DHT (no announcement protocol), so gossip through it reaches nobody: A, B and D are
    each bootstrapped to R alone and learn of one another only as providers of the model key."""

    async def main() -> None:
        async with running_host(51) as (r, _), running_host(52) as (a, ai), running_host(53) as (b, bi), \
                running_host(54) as (d, di), trio.open_nursery() as nursery:
            relay = ModelDht(r, SPEC, FAST)
            nursery.start_soon(relay.serve)
            boot = full_addrs(r)
            na, nb, nd = _node(a, ai, 0, boot), _node(b, bi, 1, boot), _node(d, di, 2, boot)
            with trio.fail_after(30):
                for n in (na, nb):
                    await n.first_round()
                    nursery.start_soon(n.run)
                assert await nd.gossip_round() == 0  # R does not speak /pmn/announce/1.0.0
                assert nd.entries() == []
                await nd.first_round()
                nursery.start_soon(nd.run)
                assert (await nd.wait_for_stage(0)).peer_id == a.get_id().pretty()
                assert (await nd.wait_for_stage(1)).peer_id == b.get_id().pretty()
                assert {a.get_id().pretty(), b.get_id().pretty()} <= nd.dht_learned | {
                    e.peer_id for e in nd.entries()}
                assert (await na.wait_for_stage(2)).peer_id == d.get_id().pretty()
                assert r.get_id().pretty() not in {e.peer_id for e in nd.entries()}
            assert nd.dht is not None and nd.dht.lookups > 0 and nd.dht.provides > 0
            nursery.cancel_scope.cancel()

    trio.run(main)


@pytest.mark.network
@pytest.mark.timeout(60)
def test_without_the_dht_a_node_bootstrapped_to_a_dht_only_peer_learns_nothing() -> None:
    async def main() -> None:
        async with running_host(61) as (r, _), running_host(62) as (a, ai), running_host(63) as (d, di), \
                trio.open_nursery() as nursery:
            relay = ModelDht(r, SPEC, FAST)
            nursery.start_soon(relay.serve)
            boot = full_addrs(r)
            na, nd = _node(a, ai, 0, boot, use_dht=False), _node(d, di, 2, boot, use_dht=False)
            with trio.fail_after(30):
                for n in (na, nd, na, nd):
                    assert await n.first_round() == 0
                assert await nd.dht_round() is None
            assert na.entries() == [] and nd.entries() == [] and nd.dht_learned == set()
            nursery.cancel_scope.cancel()

    trio.run(main)


@pytest.mark.network
@pytest.mark.timeout(60)
def test_dht_failures_are_counted_logged_once_and_retried_until_a_peer_appears(caplog) -> None:
    """D's only bootstrap peer is gone: bootstrap and provide fail again and again without ending D's
    discovery; each kind is logged once. When E joins through D, D finds E in the DHT."""
    caplog.set_level(logging.DEBUG, logger="node.net.dht")

    async def main() -> None:
        with socket.socket() as sock:  # a port nobody listens on any more
            sock.bind(("127.0.0.1", 0))
            port = sock.getsockname()[1]
        gone = identity_from_secret((71).to_bytes(32, "big")).key_pair.public_key
        dead = [f"/ip4/127.0.0.1/tcp/{port}/p2p/{ID.from_pubkey(gone).pretty()}"]
        async with running_host(72) as (d, di), running_host(73) as (e, ei), trio.open_nursery() as nursery:
            nd = _node(d, di, 0, dead)
            dht = nd.dht
            assert dht is not None
            nursery.start_soon(nd.run)
            with trio.fail_after(30):
                await until(lambda: dht.errors.get("provide", 0) >= 3 and dht.errors.get("bootstrap", 0) >= 3,
                            30, "three failed provides and three failed bootstraps", detail=lambda: dht.errors)
                warned = [r for r in caplog.records if r.name == "node.net.dht" and r.levelno == logging.WARNING]
                kinds = [r.getMessage().split()[1] for r in warned]
                assert len(kinds) == len(set(kinds)) and {"provide", "bootstrap"} <= set(kinds)
                ne = Discovery(e, _me(e, 1), _cfg(), [], ModelDht(e, SPEC, FAST), identity=ei)
                assert ne.dht is not None
                await ne.dht.add_bootstrap(full_addrs(d))  # E knows D only as a DHT peer, gossips with nobody
                nursery.start_soon(ne.run)
                assert (await nd.wait_for_stage(1)).peer_id == e.get_id().pretty()
                # D's provide loop kept retrying and now reaches E
                await until(lambda: dht.provides > 0, 30, "a provide that reaches E")
            nursery.cancel_scope.cancel()

    trio.run(main)


@pytest.mark.network
@pytest.mark.timeout(180)
def test_two_daemons_bootstrapped_only_to_a_dht_peer_find_each_other_and_train(tmp_path) -> None:
    """Two stage daemons whose only bootstrap peer is a DHT-only host (no announcements) find each other
    through the DHT and train the same losses as the single-process reference."""
    from node.daemon import NodeDaemon
    from sharding import PRESETS, OptimConfig, load_corpus, train_reference

    steps, m, b = 2, 2, 2
    daemons: list[NodeDaemon] = []
    codes: list[int] = []

    async def main() -> None:
        async with running_host(81) as (r, _), trio.open_nursery() as nursery:
            relay = ModelDht(r, SPEC, FAST)
            nursery.start_soon(relay.serve)
            for s in range(2):
                cfg = NodeConfig(data_dir=str(tmp_path / f"n{s}"), model="tiny", num_stages=2, stage=str(s),
                                 bootstrap=full_addrs(r), progress=False)
                cfg.discovery = DiscoveryConfig(announce_interval_s=0.1, discovery_timeout_s=60, dht=FAST)
                cfg.runtime.steps, cfg.runtime.num_microbatches, cfg.runtime.microbatch_size = steps, m, b
                cfg.runtime.torch_threads, cfg.corpus = 1, "synthetic"
                daemons.append(NodeDaemon(cfg))

            async def run(d: NodeDaemon) -> None:
                codes.append(await d.run())

            with trio.fail_after(150):
                async with trio.open_nursery() as group:
                    for d in daemons:
                        group.start_soon(run, d)
            nursery.cancel_scope.cancel()

    import torch

    threads = torch.get_num_threads()
    try:
        trio.run(main)
    finally:
        torch.set_num_threads(threads)  # the daemons set one thread for this whole process
    assert codes == [0, 0]
    head, tail = daemons
    assert head.discovery is not None and tail.discovery is not None
    ids = [d.discovery.me.peer_id for d in daemons if d.discovery is not None]
    assert ids[1] in head.discovery.dht_learned or ids[0] in tail.discovery.dht_learned
    losses = [res.loss for res in tail.results]
    ref = train_reference(PRESETS["tiny"], OptimConfig(), steps, m, b, load_corpus("synthetic"))
    assert losses == pytest.approx(ref, abs=1e-4)
