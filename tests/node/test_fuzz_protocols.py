"""Fuzzing every protocol a node serves, over real libp2p hosts on 127.0.0.1 (seeded, bounded in time).

A real node process (replicated mode, lingering) takes the announce, state, averaging and delegation fuzz: deep
nesting (100,000 levels), oversized length prefixes, random bytes, truncation, wrong types, 200 idle
streams, slow-loris; it must stay up, its RSS must grow by less than `RSS_BOUND`, and an honest
exchange must still be answered. The audit and inference services are fuzzed in-process the same way
(this process has py_ecc's recursion limit of 100,000 too: a crash there would kill the test run).
"""

from __future__ import annotations

import contextlib
import json
import random
import sys
from pathlib import Path
from typing import Any

import multiaddr
import pytest
import torch
import trio
from libp2p.custom_types import TProtocol

from node.config import DiscoveryConfig
from node.errors import NotAuthorizedError
from node.net.access import INFER, OpenPolicy, StagePeersPolicy
from node.net.discovery import ANNOUNCE_PROTOCOL, AnnounceLimits, Announcement, Discovery
from node.net.host import full_addrs, make_host, parse_peer_addr
from node.net.identity import identity_from_secret
from node.net.jsonbound import loads_bounded, nesting_depth_at_most
from node.net.peerscore import PeerGuardConfig, PeerScores
from node.net.running import run_host
from node.replicas.averaging import (
    AVG_PROTOCOL,
    AveragingService,
    AvgLimits,
    ContributionStore,
    push,
    vec_bytes,
)
from node.replicas.delegation import DELEGATE_PROTOCOL
from node.replicas.statesync import STATE_PROTOCOL
from node.services.audit import AUDIT_PROTOCOL, AuditConfig, AuditRecorder, AuditService
from node.services.inference import (
    INFER_PROTOCOL,
    InferenceConfig,
    InferenceService,
    UnpaidRequestError,
    generate,
    read_message,
    write_message,
)
from node.testing.swarm import start_node, stop_nodes
from sharding import PRESETS, OptimConfig, partition
from sharding.codecs import get_codec
from sharding.stage import build_stage
from tests.node.conftest import FixedDirectory

pytestmark = [pytest.mark.network]

RSS_BOUND = 48 * 1024 * 1024  # most a node's RSS may grow after a first fuzz round, under a second round, 12 x 64
# MiB declared bodies, 200 idle streams and a slow-loris (the first round itself: +64 MiB, allocator high-water
# of 30 fresh Noise connections with 1 MiB read-ahead each, kept in the tuned heap)
DEEP = b"[" * 100_000 + b"]" * 100_000  # ~200 KB, 100,000 levels: overflowed the C stack before
LISTEN = [multiaddr.Multiaddr("/ip4/127.0.0.1/tcp/0")]
CONFIG = PRESETS["tiny-subspace"]


async def _bounded(fn: Any, limit_s: float) -> None:
    with trio.fail_after(limit_s):
        await fn()


def _u32(n: int) -> bytes:
    return n.to_bytes(4, "big")


def _rss(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")


def _cases(rng: random.Random) -> list[bytes]:
    """Hostile messages common to every `u32 | JSON` protocol."""
    return [
        _u32(len(DEEP)) + DEEP,  # deep nesting
        _u32(64 << 20),  # a 64 MiB header declared, nothing sent
        _u32(0xFFFFFFFF) + rng.randbytes(100),  # the largest prefix
        rng.randbytes(4096),  # random bytes
        _u32(200) + b'{"op": "push", "spec_h',  # truncated
        _u32(2) + b"[]",  # wrong type
        _u32(9) + b'"string"',  # wrong type
        _u32(30) + b'{"stage": "1", "blob": "many"}',  # wrong field types
        _u32(4) + b"\xff\xfe\xfd\xfc",  # not UTF-8
        _u32(60) + b'{"op":"push","stage":0,"step":0,"mb":0,"attempt":0,"blob":1073741824,"spec_hash":"aa"}'[:60],
    ]


def test_nesting_scan_matches_json_and_ignores_strings() -> None:
    rng = random.Random(7)

    def doc(depth: int) -> Any:
        if depth == 0:
            return rng.choice([1, "x]]]{{\\\"[", None, 2.5])
        inner = [doc(depth - 1) for _ in range(rng.randint(1, 3))]
        return inner if rng.random() < 0.5 else {f"k{i}[": v for i, v in enumerate(inner)}

    for _ in range(200):
        d = rng.randint(0, 12)
        raw = json.dumps(doc(d)).encode()
        assert nesting_depth_at_most(raw, max(d, 1))
        if d > 1:
            assert not nesting_depth_at_most(raw, d - 1)
    assert sys.getrecursionlimit() >= 100_000  # py_ecc is loaded here too: json.loads(DEEP) would crash
    with pytest.raises(ValueError, match="nests deeper than 8"):
        loads_bounded(DEEP, 1 << 20, 8, ValueError)
    with pytest.raises(ValueError, match="exceeds the limit"):
        loads_bounded(b"[1]" * 100, 64, 8, ValueError)


@contextlib.asynccontextmanager
async def _client(seed: int) -> Any:
    host = make_host(identity_from_secret(seed.to_bytes(32, "big")))
    async with run_host(host, LISTEN):
        yield host


async def _send(host: Any, addr: str, protocol: str, data: bytes, read_s: float = 3.0) -> bytes:
    """Open a stream, write `data`, read what comes back until it closes or `read_s` passes."""
    info = parse_peer_addr(addr)
    got = b""
    try:
        await host.connect(info)
        stream = await host.new_stream(info.peer_id, [protocol])
    except Exception:  # a banned peer's stream open may fail or be reset: the node refused it
        return got
    try:
        await stream.write(data)
        with trio.move_on_after(read_s):
            while True:
                chunk = await stream.read(65536)
                if not chunk:
                    break
                got += chunk
    except Exception:  # reset by the node: refused
        pass
    finally:
        with contextlib.suppress(Exception):
            await stream.reset()
    return got


async def _fuzz_one(seed: int, addr: str, protocol: str, case: bytes) -> None:
    async with _client(seed) as h:
        await _send(h, addr, protocol, case, read_s=1.0)


@pytest.mark.timeout(240)
def test_real_node_survives_announce_state_avg_floods(tmp_path: Path) -> None:
    node = start_node(0, tmp_path / "node", ["--stages", "1", "--replicated", "--steps", "1", "--linger",
                                             "--microbatches", "1", "--microbatch-size", "1", "--no-dht",
                                             "--model", "tiny"], ready_timeout_s=120)
    addr = node.ready["addrs"][0]
    rng = random.Random(1234)
    report: dict[str, Any] = {}

    async def main() -> None:
        # warm up: one honest exchange so lazily built state is in the baseline
        async with _client(900) as honest:
            d = Discovery(honest, Announcement(honest.get_id().pretty(), tuple(full_addrs(honest)), "aa", 1, 0, 1),
                          DiscoveryConfig(), [], identity=None)
            await d.exchange(addr)
        start = _rss(node.proc.pid)
        seed = 1000
        for round_ in range(2):  # round 1 reaches the heap's high-water mark, round 2 must not grow it much
            if round_ == 1:
                before = _rss(node.proc.pid)
                report["first_round"] = before - start
            for protocol in (ANNOUNCE_PROTOCOL, STATE_PROTOCOL, AVG_PROTOCOL, DELEGATE_PROTOCOL):
                async with trio.open_nursery() as cases:  # a protocol's cases at once, each from its own peer
                    for case in _cases(rng):
                        seed += 1  # a fresh identity per message: bans do not hide the parser from the fuzz
                        cases.start_soon(_fuzz_one, seed, addr, protocol, case)
                assert node.proc.poll() is None, f"node died on a {protocol} case"
        report["after_fuzz"] = _rss(node.proc.pid) - before
        # twelve 64 MiB bodies declared in parallel, each followed by 1 MiB of it: refused unread
        async with _client(5000) as h, trio.open_nursery() as n:
            for protocol in (STATE_PROTOCOL, AVG_PROTOCOL) * 6:
                head = json.dumps({"op": "push", "spec_hash": "aa", "stage": 0, "step": 0, "mb": 0, "attempt": 0,
                                   "blob": 64 << 20}).encode()
                n.start_soon(_send, h, addr, protocol, _u32(len(head)) + head + b"\0" * (1 << 20), 2.0)
        report["after_64mib"] = _rss(node.proc.pid) - before
        # 200 idle streams and a slow-loris from a few identities: capped, then closed by idle timeouts
        async with contextlib.AsyncExitStack() as stack:
            hosts = [await stack.enter_async_context(_client(6000 + i)) for i in range(10)]
            info = parse_peer_addr(addr)
            opened = 0
            streams = []
            for i in range(200):
                h = hosts[i % len(hosts)]
                with contextlib.suppress(Exception):
                    await h.connect(info)
                    streams.append(await h.new_stream(info.peer_id, [ANNOUNCE_PROTOCOL]))
                    opened += 1
            slow = streams[-1] if streams else None
            if slow is not None:
                with contextlib.suppress(Exception):
                    for b in _u32(100):
                        await slow.write(bytes([b]))
                        await trio.sleep(0.2)
            report["idle_opened"] = opened
            # an honest peer is still served while the idle streams sit there
            async with _client(901) as honest:
                d = Discovery(honest, Announcement(honest.get_id().pretty(), tuple(full_addrs(honest)), "aa", 1, 0,
                                                   1), DiscoveryConfig(), [], identity=None)
                await d.exchange(addr)
                report["honest_entries"] = [e.peer_id for e in d.entries()]
            for s in streams:
                with contextlib.suppress(Exception):
                    await s.reset()
        report["rss_growth"] = _rss(node.proc.pid) - before
        report["rss_before"] = before

    try:
        trio.run(_bounded, main, 200)
        assert node.proc.poll() is None
        assert node.ready["peer_id"] in report["honest_entries"]
        print(f"RSS at start {report['rss_before'] / 2**20 - report['first_round'] / 2**20:.1f} MiB, first fuzz "
              f"round +{report['first_round'] / 2**20:.1f} MiB; then growth after a second round "
              f"{report['after_fuzz'] / 2**20:.1f} MiB, after 12 x 64 MiB declared "
              f"{report['after_64mib'] / 2**20:.1f} MiB, at the end {report['rss_growth'] / 2**20:.1f} MiB; "
              f"{report['idle_opened']} idle streams opened")
        assert report["rss_growth"] < RSS_BOUND
    finally:
        stop_nodes([node])


def test_forged_flood_is_bounded_and_capacity_capped() -> None:
    me = identity_from_secret((51).to_bytes(32, "big"))
    limits = AnnounceLimits(max_table_entries=100, max_entries_per_sender=10)

    class Stub:
        def set_stream_handler(self, protocol: object, handler: object) -> None:
            return None

    def entry(seed: int, capacity: int = 1) -> dict[str, Any]:
        ident = identity_from_secret(seed.to_bytes(32, "big"))
        pid = ident.peer_id.pretty()
        return Announcement(pid, (f"/ip4/127.0.0.1/tcp/1/p2p/{pid}",), "aa", 3, 2, capacity).sign(ident).to_json()

    async def main() -> None:
        d = Discovery(Stub(), Announcement(me.peer_id.pretty(), (), "aa", 3, 0, 1), DiscoveryConfig(), [],
                      identity=me, limits=limits)
        signed = entry(60)  # one real signature, 50,000 forged copies claiming other peer ids
        forged = [{**signed, "peer_id": f"fake{i}"} for i in range(50_000)]
        d._merge(forged, sender="attacker")
        assert d.entries() == [] and d.unbound == limits.max_entries_per_message  # only one message's worth read
        assert d._merge([entry(61, capacity=10**9)], sender="attacker") == 1  # capacity 10^9: dropped
        # signed entries relayed by one sender: at most max_entries_per_sender taken from it
        d._merge([entry(100 + i) for i in range(40)], sender="relay")
        assert len(d.entries()) == 10 and d.rejected["per_sender"] == 30
        for k in range(20):  # many senders: the table stops at max_table_entries
            d._merge([entry(1000 + 10 * k + i) for i in range(10)], sender=f"relay{k}")
        assert len(d.table) == limits.max_table_entries

    trio.run(main)


def _audit_service(tmp_path: Path, cfg: AuditConfig) -> AuditService:
    model = PRESETS["tiny"]
    from node.training.worker import StageWorker

    worker = StageWorker(model, partition(model, 2)[1], codec="dense", optim=OptimConfig(), num_microbatches=2,
                         microbatch_size=2)
    rec = AuditRecorder(tmp_path, epoch_length=2)
    worker.observers.append(rec)
    rec.on_before_update(0, worker.module)
    return AuditService(rec, worker, model_id=7, config=cfg)


class _Ledger:
    def __init__(self) -> None:
        self.paid: dict[bytes, bytes] = {}

    def verify(self, request_id: bytes, tx_hash: bytes) -> None:
        if self.paid.get(tx_hash) != request_id:
            raise UnpaidRequestError("did not pay")


@pytest.mark.timeout(180)
def test_audit_and_inference_survive_fuzz_and_keep_serving(tmp_path: Path) -> None:
    rng = random.Random(99)
    guard = PeerGuardConfig(max_streams_per_peer=4, max_streams_total=32)
    audit = _audit_service(tmp_path, AuditConfig(idle_timeout_s=1.0, guard=guard))
    spec = partition(CONFIG, 1)[0]
    ledger = _Ledger()
    infer = InferenceService(CONFIG, spec, build_stage(CONFIG, spec), get_codec("dense", CONFIG), ledger, None,
                             InferenceConfig(idle_timeout_s=1.0, guard=guard))

    async def main() -> None:
        server = make_host(identity_from_secret((70).to_bytes(32, "big")))
        async with run_host(server, LISTEN):
            server.set_stream_handler(TProtocol(AUDIT_PROTOCOL), audit.handle)
            server.set_stream_handler(INFER_PROTOCOL, infer.handle)
            addr = full_addrs(server)[0]
            seed = 2000
            header_cases = [
                _u32(len(DEEP)) + DEEP + _u32(0),
                _u32(64 << 20),
                rng.randbytes(2048),
                _u32(30) + b'{"type": "hop", "step": 1',  # truncated
                _u32(2) + b"[]" + _u32(0),
                _u32(40) + json.dumps({"type": "hop", "step": "1", "model_id": [7]}).encode()[:40] + _u32(0),
                _u32(17) + b'{"type":"limits"}' + _u32(64 << 20),  # a 64 MiB body on a bodiless message
                _u32(17) + b'{"type":"receipts"}'[:17],
            ]
            for protocol in (AUDIT_PROTOCOL, INFER_PROTOCOL):
                for case in header_cases:
                    seed += 1
                    async with _client(seed) as h:
                        got = await _send(h, addr, protocol, case, read_s=2.0)
                    assert len(got) < 4096  # an error line at most, never a model's worth of bytes
            # a peer that keeps sending garbage is banned: its next streams are reset at once
            async with _client(3000) as h:
                for _ in range(8):
                    await _send(h, addr, INFER_PROTOCOL, _u32(2) + b"[]" + _u32(0), read_s=1.0)
                assert infer.gate.scores.is_banned(h.get_id().pretty())
            # many idle streams: at most max_streams_per_peer per peer, all closed by the idle timeout
            async with _client(3001) as h:
                info = parse_peer_addr(addr)
                await h.connect(info)
                streams = []
                for _ in range(50):
                    with contextlib.suppress(Exception):
                        streams.append(await h.new_stream(info.peer_id, [AUDIT_PROTOCOL]))
                await trio.sleep(0.5)
                assert audit.gate.total <= guard.max_streams_per_peer
                with trio.fail_after(10):
                    while audit.gate.total:
                        await trio.sleep(0.1)
                for s in streams:
                    with contextlib.suppress(Exception):
                        await s.reset()
            # honest requests are still served
            ledger.paid[b"\x03" * 32] = b"\x04" * 32
            async with _client(3002) as h:
                info = parse_peer_addr(addr)

                async def opener() -> Any:
                    await h.connect(info)
                    return await h.new_stream(info.peer_id, [INFER_PROTOCOL])

                tokens = [t async for t in generate(opener, [1, 2, 3], request_id=b"\x04" * 32, tx_hash=b"\x03" * 32,
                                                    max_new_tokens=3)]
                assert len(tokens) == 3
                stream = await h.new_stream(info.peer_id, [AUDIT_PROTOCOL])
                await write_message(stream, {"type": "hop", "model_id": 7, "step": 0, "microbatch": 1,
                                             "direction": 0})
                reply, _ = await read_message(stream, 1 << 26)
                await stream.close()
                assert reply["type"] == "error" and "no activation received" in reply["message"]

    trio.run(_bounded, main, 160)


@pytest.mark.timeout(120)
def test_replayed_payment_and_direct_hop_to_the_tail_buy_nothing() -> None:
    specs = partition(CONFIG, 3)
    codec = get_codec("subspace", CONFIG)
    ledger = _Ledger()
    prompt = list(b"def f(")

    async def main() -> None:
        idents = [identity_from_secret((80 + i).to_bytes(32, "big")) for i in range(5)]
        hosts = [make_host(i) for i in idents]
        async with contextlib.AsyncExitStack() as stack:
            for h in hosts:
                await stack.enter_async_context(run_host(h, LISTEN))
            addrs = [full_addrs(h)[0] for h in hosts]
            anns = [Announcement(h.get_id().pretty(), (addrs[i],), "aa", 3, i, 1).sign(idents[i])
                    for i, h in enumerate(hosts[:3])]
            services = []
            for i, spec in enumerate(specs):
                policy = StagePeersPolicy(FixedDirectory(anns[i], anns), protocols=(INFER,))
                nxt = None
                if i + 1 < 3:
                    info = parse_peer_addr(addrs[i + 1])

                    async def nxt(h: Any = hosts[i], info: Any = info) -> Any:
                        await h.connect(info)
                        return await h.new_stream(info.peer_id, [INFER_PROTOCOL])
                svc = InferenceService(CONFIG, spec, build_stage(CONFIG, spec), codec, ledger, nxt, policy=policy)
                hosts[i].set_stream_handler(INFER_PROTOCOL, svc.handle)
                services.append(svc)
            client, attacker = hosts[3], hosts[4]

            def opener(h: Any, addr: str) -> Any:
                info = parse_peer_addr(addr)

                async def open_stream() -> Any:
                    await h.connect(info)
                    return await h.new_stream(info.peer_id, [INFER_PROTOCOL])

                return open_stream

            ledger.paid[b"\x03" * 32] = b"\x04" * 32
            tokens = [t async for t in generate(opener(client, addrs[0]), prompt, request_id=b"\x04" * 32,
                                                tx_hash=b"\x03" * 32, max_new_tokens=4)]
            assert len(tokens) == 4 and [s.tokens_served for s in services] == [4, 4, 4]

            async def hop(to: int, request: bytes, tx: bytes) -> dict[str, Any]:
                stream = await opener(attacker, addrs[to])()
                act = codec.encode_activation(torch.randn(1, len(prompt), CONFIG.d_model), torch.tensor([prompt]))
                await write_message(stream, {"type": "hop", "request_id": "0x" + request.hex(),
                                             "tx_hash": "0x" + tx.hex(), "ids": prompt}, act)
                reply, _ = await read_message(stream, 1 << 20)
                await stream.close()
                return reply

            # the used payment replayed at stage 1 and a fresh payment sent straight to the tail: the attacker
            # serves no stage, so neither is served (its hops are refused before the body is read)
            for to, req, tx in ((1, b"\x04" * 32, b"\x03" * 32), (2, b"\x06" * 32, b"\x05" * 32)):
                ledger.paid[b"\x05" * 32] = b"\x06" * 32
                reply = await hop(to, req, tx)
                assert reply["type"] == "error" and reply["message"] == "not authorized"
            # with an open policy the used-request set alone refuses the replay at stage 1 (and at the tail)
            for s in services:
                s.gate.policy = OpenPolicy("test")
            for to in (1, 2):
                reply = await hop(to, b"\x04" * 32, b"\x03" * 32)
                assert reply["type"] == "error" and "already served" in reply["message"]
            assert [s.tokens_served for s in services] == [4, 4, 4]
            with pytest.raises(NotAuthorizedError):
                await StagePeersPolicy(FixedDirectory(anns[2], anns), protocols=(INFER,)).check(
                    attacker.get_id(), INFER, 2)

    trio.run(_bounded, main, 100)


@pytest.mark.timeout(60)
def test_avg_pushes_from_one_peer_are_capped_then_banned() -> None:
    size = 64
    store = ContributionStore(size)
    limits = AvgLimits(max_pending_per_peer=8, guard=PeerGuardConfig(ban_score=-3.0, max_streams_per_peer=16))

    async def main() -> None:
        server = make_host(identity_from_secret((90).to_bytes(32, "big")))
        async with run_host(server, LISTEN), _client(91) as h:
            svc = AveragingService(server, "aa", lambda s: store if s == 0 else None, 5.0, limits=limits,
                                   scores=PeerScores(limits.guard))
            addr = full_addrs(server)[0]
            refused = 0
            for i in range(20):
                try:
                    await push(h, addr, "aa", 0, i, 0, 0, torch.ones(size), None, 5.0)
                except Exception:
                    refused += 1
            assert sum(len(v) for v in store.vecs.values()) == 8 and refused == 12
            assert svc.gate.scores.is_banned(h.get_id().pretty())
            # a blob larger than one contribution is refused before it is read
            assert len(vec_bytes(torch.ones(size))) == 4 * size

    trio.run(main)
