"""Discovery without a central server: bootstrap peers + Kademlia DHT + announcement gossip.

Gossip on `/pmn/announce/1.0.0`: the dialer sends its own announcement, the responder answers with its
table (its own announcement included). Tables merge by peer id, newest wins; entries expire after
`entry_ttl_s`. With a `ModelDht` the node also provides its model's key in the DHT, looks up the key's
other providers every `dht.lookup_interval_s` and exchanges announcements with each one it had not heard
of, so it finds peers that neither its bootstrap list nor their tables lead to.

An announcement that names an Ethereum address carries the node key's binding of its peer id
(`node.net.identity.bind`, hex); entries whose binding does not verify are dropped at the merge (and counted
in `Discovery.unbound`), so the address of a table entry is the node key of that peer id. The rest of an
announcement (addrs, stage, seq) is not signed: the activation handshake checks what matters again.
"""

from __future__ import annotations

import json
import struct
import time
from collections.abc import Iterable
from dataclasses import asdict, dataclass
from typing import Any

import trio
from libp2p.custom_types import TProtocol

from node.config import DiscoveryConfig
from node.errors import BindingError, DiscoveryError
from node.net.dht import ModelDht, peer_addr
from node.net.host import parse_peer_addr
from node.net.identity import verify_binding

ANNOUNCE_PROTOCOL = TProtocol("/pmn/announce/1.0.0")
MAX_MESSAGE = 1 << 20  # bytes of one announcement message


@dataclass(frozen=True)
class Announcement:
    """What a node tells the swarm about itself."""

    peer_id: str  # libp2p peer id
    addrs: tuple[str, ...]  # full multiaddrs with /p2p/<peer id>
    spec_hash: str  # hex model spec hash
    num_stages: int  # pipeline depth it trains in
    stage: int  # stage it serves (-1 while still choosing)
    capacity: int  # declared capacity units
    address: str = ""  # Ethereum address of its node key ("" = none claimed)
    next_step: int = -1  # replicated mode: the first step it has not applied (-1 = not reported)
    throughput: float = 0.0  # replicated mode: tokens/s its compute sustained over its last step (0 = unknown)
    seq: int = 0  # sender's version: milliseconds since the epoch at start, +1 per change (newest wins,
    # so a restarted node's fresh addresses replace its old entry)
    binding: str = ""  # hex node-key signature binding peer_id to address (`node.net.identity.bind`); "" without one

    def check_binding(self) -> None:
        """BindingError unless the address is empty or bound to the peer id by its node key."""
        if not self.address:
            return
        try:
            signature = bytes.fromhex(self.binding.removeprefix("0x"))
        except ValueError as exc:
            raise BindingError(f"announcement of peer {self.peer_id}: binding is not hex ({exc})") from exc
        verify_binding(self.address, self.peer_id, signature)

    def to_json(self) -> dict[str, Any]:
        d = asdict(self)
        d["addrs"] = list(self.addrs)
        return d

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> Announcement:
        return cls(str(d["peer_id"]), tuple(str(a) for a in d["addrs"]), str(d["spec_hash"]), int(d["num_stages"]),
                   int(d["stage"]), int(d["capacity"]), str(d.get("address", "")), int(d.get("next_step", -1)),
                   float(d.get("throughput", 0.0)), int(d.get("seq", 0)), str(d.get("binding", "")))


def choose_stage(entries: Iterable[Announcement], spec_hash: str, num_stages: int, exclude: str = "") -> int:
    """The stage with the least announced capacity for this model (lowest index on ties)."""
    load = [0] * num_stages
    for e in entries:
        if e.peer_id != exclude and e.spec_hash == spec_hash and e.num_stages == num_stages and 0 <= e.stage < num_stages:
            load[e.stage] += e.capacity
    return min(range(num_stages), key=lambda s: (load[s], s))


async def _write_msg(stream: Any, obj: Any) -> None:
    body = json.dumps(obj).encode()
    await stream.write(struct.pack(">I", len(body)) + body)


async def _read_msg(stream: Any) -> Any:
    buf = b""
    while len(buf) < 4:
        chunk = await stream.read(4 - len(buf))
        if not chunk:
            raise DiscoveryError("announce stream closed before a message")
        buf += chunk
    (n,) = struct.unpack(">I", buf)
    if n > MAX_MESSAGE:
        raise DiscoveryError(f"announce message of {n} bytes exceeds {MAX_MESSAGE}")
    body = b""
    while len(body) < n:
        chunk = await stream.read(n - len(body))
        if not chunk:
            raise DiscoveryError("announce message truncated")
        body += chunk
    return json.loads(body)


class Discovery:
    """Keeps a table of announcements fresh by gossiping with known peers."""

    def __init__(self, host: Any, me: Announcement, cfg: DiscoveryConfig, bootstrap: list[str],
                 dht: ModelDht | None = None) -> None:
        self.host = host
        self.dht = dht  # None: bootstrap + gossip only
        self.me = me
        self.cfg = cfg
        if me.seq == 0:
            me = Announcement(**{**me.__dict__, "seq": int(time.time() * 1000)})
            self.me = me
        self.bootstrap = list(bootstrap)
        for a in self.bootstrap:
            parse_peer_addr(a)  # ValueError names a bad bootstrap address
        self.table: dict[str, tuple[Announcement, float]] = {}  # peer id -> (announcement, local time seen)
        self.changed = trio.Event()
        self.dht_learned: set[str] = set()  # peer ids first heard of through a DHT provider lookup
        self.unbound = 0  # announcements dropped because their address was not bound to their peer id
        self._dht_joined = False  # bootstrap peers added to the DHT routing table at least once
        host.set_stream_handler(ANNOUNCE_PROTOCOL, self._handle)

    def update_me(self, **changes: Any) -> None:
        """Change our own announcement (e.g. the chosen stage); bumps seq."""
        d = {**self.me.__dict__, **changes, "seq": self.me.seq + 1}
        self.me = Announcement(**d)

    def entries(self, max_age_s: float | None = None) -> list[Announcement]:
        """Live announcements of other peers (refreshed within `max_age_s`, default `entry_ttl_s`)."""
        now = trio.current_time()
        limit = self.cfg.entry_ttl_s if max_age_s is None else min(max_age_s, self.cfg.entry_ttl_s)
        return [a for a, t in self.table.values() if now - t <= limit and a.peer_id != self.me.peer_id]

    def _merge(self, items: list[Any]) -> None:
        now = trio.current_time()
        for raw in items:
            try:
                a = Announcement.from_json(raw)
            except (KeyError, TypeError, ValueError):
                continue
            if a.peer_id == self.me.peer_id:
                continue
            try:
                a.check_binding()
            except BindingError:
                self.unbound += 1
                continue
            old = self.table.get(a.peer_id)
            if old is None or a.seq >= old[0].seq:
                self.table[a.peer_id] = (a, now)
        self.changed.set()
        self.changed = trio.Event()

    def _payload(self) -> list[dict[str, Any]]:
        return [self.me.to_json()] + [a.to_json() for a in self.entries()]

    async def _handle(self, stream: Any) -> None:
        try:
            with trio.fail_after(self.cfg.discovery_timeout_s):
                msg = await _read_msg(stream)
                self._merge(msg if isinstance(msg, list) else [])
                await _write_msg(stream, self._payload())
                await stream.close()
        except Exception:  # a misbehaving peer only loses its own exchange
            try:
                await stream.reset()
            except Exception:
                pass

    async def exchange(self, addr: str) -> None:
        """One gossip exchange with the peer at `addr` (a full multiaddr)."""
        info = parse_peer_addr(addr)
        if info.peer_id == self.host.get_id():
            return
        with trio.fail_after(self.cfg.discovery_timeout_s):
            await self.host.connect(info)
            stream = await self.host.new_stream(info.peer_id, [ANNOUNCE_PROTOCOL])
            await _write_msg(stream, self._payload())
            msg = await _read_msg(stream)
            await stream.close()
        self._merge(msg if isinstance(msg, list) else [])

    def _targets(self) -> list[str]:
        seen = set()
        out = []
        for a in self.bootstrap:
            pid = parse_peer_addr(a).peer_id.pretty()
            if pid not in seen:
                seen.add(pid)
                out.append(a)
        for e in self.entries():
            if e.peer_id not in seen and e.addrs:
                seen.add(e.peer_id)
                out.append(e.addrs[0])
        return out

    async def gossip_round(self) -> int:
        """Exchange with every known peer once; returns how many answered."""
        ok = 0
        for addr in self._targets():
            try:
                await self.exchange(addr)
                ok += 1
            except Exception:  # unreachable peers are skipped until their entry expires
                continue
        return ok

    async def dht_round(self) -> int | None:
        """Look up the model key's providers and exchange announcements with each one not in the table.

        Returns how many peers it learned of; None when there is no DHT or the lookup failed (counted)."""
        if self.dht is None:
            return None
        providers = await self.dht.find_providers()
        if providers is None:
            return None
        known = {e.peer_id for e in self.entries()}
        learned = 0
        for info in providers:
            pid, addr = info.peer_id.pretty(), peer_addr(info)
            if pid in known or addr is None:
                continue
            try:
                await self.exchange(addr)
            except Exception as exc:  # a provider that went away: its record expires, we retry next round
                self.dht.fail("exchange", f"{pid}: {exc!r}")
                continue
            if pid in {e.peer_id for e in self.entries()}:
                learned += 1
                self.dht_learned.add(pid)
        return learned

    async def _join_dht(self) -> None:
        assert self.dht is not None
        if self.bootstrap and (not self._dht_joined or self.dht.routing_table_size() == 0):
            await self.dht.add_bootstrap(self.bootstrap)
        self._dht_joined = True

    async def first_round(self) -> int:
        """Start-up: join the DHT through the bootstrap peers, provide the model key, look up its other
        providers once, then one gossip round; returns how many peers answered the gossip."""
        if self.dht is not None:
            await self._join_dht()
            await self.dht.provide()
            await self.dht_round()
        return await self.gossip_round()

    async def _provide_loop(self) -> None:
        assert self.dht is not None
        failures = 0
        while True:
            await self._join_dht()  # again while the routing table is empty (bootstrap peers were down)
            ok = await self.dht.provide()
            failures = 0 if ok else failures + 1
            await trio.sleep(self.dht.cfg.provide_interval_s if ok else self.dht.backoff(failures))

    async def _lookup_loop(self) -> None:
        assert self.dht is not None
        failures = 0
        while True:
            ok = await self.dht_round() is not None
            failures = 0 if ok else failures + 1
            await trio.sleep(self.dht.cfg.lookup_interval_s if ok else self.dht.backoff(failures))

    async def run(self) -> None:
        """Gossip forever every `announce_interval_s`; with a DHT also serve it, re-provide the model key
        every `dht.provide_interval_s` and look up its providers every `dht.lookup_interval_s`."""
        async with trio.open_nursery() as nursery:
            if self.dht is not None:
                nursery.start_soon(self.dht.serve)
                nursery.start_soon(self._provide_loop)
                nursery.start_soon(self._lookup_loop)
            while True:
                await self.gossip_round()
                await trio.sleep(self.cfg.announce_interval_s)

    def stage_peers(self, stage: int) -> list[Announcement]:
        """Live peers announcing `stage` of our model, by peer id."""
        return sorted((e for e in self.entries()
                       if e.stage == stage and e.spec_hash == self.me.spec_hash and e.num_stages == self.me.num_stages),
                      key=lambda e: e.peer_id)

    async def wait_for_stage(self, stage: int, timeout_s: float | None = None) -> Announcement:
        """A live peer serving `stage` of our model (DiscoveryError naming the stage on timeout)."""
        limit = self.cfg.discovery_timeout_s if timeout_s is None else timeout_s
        with trio.move_on_after(limit):
            while True:
                found = [e for e in self.entries()
                         if e.stage == stage and e.spec_hash == self.me.spec_hash and e.num_stages == self.me.num_stages]
                if found:
                    return max(found, key=lambda e: (e.capacity, e.seq))
                await self.changed.wait()
        raise DiscoveryError(f"no peer serving stage {stage} of model 0x{self.me.spec_hash[:16]}... "
                             f"was found within discovery_timeout_s={limit}")
