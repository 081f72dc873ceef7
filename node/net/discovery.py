"""Discovery without a central server: bootstrap peers + Kademlia DHT + announcement gossip.

Gossip on `/pmn/announce/1.0.0`: the dialer sends its own announcement, the responder answers with its
table (its own announcement included). Tables merge by peer id, newest wins; entries expire after
`entry_ttl_s`. With a `ModelDht` the node also provides its model's key in the DHT, looks up the key's
other providers every `dht.lookup_interval_s` and exchanges announcements with each one it had not heard
of, so it finds peers that neither its bootstrap list nor their tables lead to.

Every announcement carries its node key's EIP-712 signature over all of its fields (`Announcement.sign`,
`verify`); an entry without one, or whose fields were changed by whoever relayed it, is dropped at the
merge (counted in `Discovery.unbound`), so the address of a table entry is the node key that signed it.
Limits (`AnnounceLimits`): message size and nesting, entries taken per message, a table cap, a cap on
entries one sender may contribute, and a maximum declared capacity; every refusal counts against the
sender (`node.net.peerscore`).
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import asdict, dataclass, field, replace
from functools import lru_cache
from typing import Any

import trio
from eth_account import Account
from eth_account.messages import SignableMessage, encode_typed_data
from eth_utils import to_checksum_address
from libp2p.custom_types import TProtocol
from libp2p.peer.id import ID

from node.config import DiscoveryConfig
from node.errors import BindingError, DiscoveryError, NotAuthorizedError, PeerRefusedError
from node.net import msgio
from node.net.access import UNAVAILABLE, AccessPolicy
from node.net.dht import ModelDht, peer_addr
from node.net.gate import ProtocolGate, reset_quietly
from node.net.host import parse_peer_addr
from node.net.identity import NodeIdentity, bind, verify_binding
from node.net.peerscore import PeerGuardConfig, PeerScores

ANNOUNCE_PROTOCOL = TProtocol("/pmn/announce/1.0.0")
ANNOUNCE_DOMAIN: dict[str, Any] = {"name": "PMN Announcement", "version": "1"}  # EIP-712 domain of announcements
ANNOUNCE_TYPES = {"Announcement": [  # EIP-712 type: every field of an announcement but the signature itself
    {"name": "peerId", "type": "string"}, {"name": "addrs", "type": "string[]"},
    {"name": "specHash", "type": "string"}, {"name": "numStages", "type": "uint256"},
    {"name": "stage", "type": "int256"}, {"name": "capacity", "type": "uint256"},
    {"name": "nodeAddress", "type": "address"}, {"name": "nextStep", "type": "int256"},
    {"name": "throughputMilli", "type": "uint256"}, {"name": "headTerm", "type": "int256"},
    {"name": "ckptSteps", "type": "uint256[]"}, {"name": "rollbackGen", "type": "uint256"},
    {"name": "rollbackStep", "type": "int256"}, {"name": "rollbackStage", "type": "int256"},
    {"name": "seq", "type": "uint256"},
    {"name": "binding", "type": "bytes"}]}


@dataclass
class AnnounceLimits:
    """Bounds of `/pmn/announce/1.0.0` and of the peer table (every refusal counts against the sender)."""

    max_message_bytes: int = 256 * 1024  # longest announcement message, checked on its length prefix
    max_depth: int = 4  # deepest JSON nesting of a message (a list of objects holding a list of addrs)
    idle_timeout_s: float = 10.0  # longest wait for the next bytes of an announce stream
    max_entries_per_message: int = 64  # entries read from one message (the rest are ignored)
    max_table_entries: int = 512  # peers in the table (expired ones are dropped first; new ones refused when full)
    max_entries_per_sender: int = 32  # table entries one sender may have introduced (its own entry not counted)
    max_capacity: int = 1024  # largest capacity an entry may declare (a larger one is dropped)
    max_addrs: int = 8  # multiaddrs one entry may list
    max_ckpt_steps: int = 256  # checkpoint steps one entry may list (replicated mode: `Announcement.ckpt_steps`)
    max_string_bytes: int = 256  # longest peer id, multiaddr, spec hash or signature string in an entry
    learn_interval_s: float = 5.0  # an unknown connected peer is asked for its announcement at most this often
    guard: PeerGuardConfig = field(default_factory=PeerGuardConfig)  # bans, scores and stream caps

    def message_limits(self) -> msgio.MessageLimits:
        """The msgio limits of one announce message."""
        return msgio.MessageLimits(max_header_bytes=self.max_message_bytes, max_body_bytes=0,
                                   max_depth=self.max_depth, idle_timeout_s=self.idle_timeout_s).validate()


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
    head_term: int = -1  # replicated mode, stage 0: the term in which it holds the head's step authority (-1 = none:
    # a standby head replica or another stage; `node.replicas.heads`)
    ckpt_steps: tuple[int, ...] = ()  # replicated mode: the next steps of the checkpoints it holds of its stage (the
    # steps a rollback may rewind it to; the newest `AnnounceLimits.max_ckpt_steps` only)
    rollback_gen: int = 0  # replicated mode: the rollback generation it trains in (`node.replicas.rollback`);
    # replicas of different generations never exchange frames, contributions or state
    rollback_step: int = -1  # replicated mode: the step its generation rewound to (-1 = generation 0, no rollback)
    rollback_stage: int = -1  # replicated mode: the stage whose newer state its generation's rollback declared lost
    # (-1 = generation 0); a node follows the rollback only when its own view of that stage agrees
    seq: int = 0  # sender's version: milliseconds since the epoch at start, +1 per change (newest wins,
    # so a restarted node's fresh addresses replace its old entry)
    binding: str = ""  # hex node-key signature binding peer_id to address (`node.net.identity.bind`); "" without one
    signature: str = ""  # hex node-key EIP-712 signature over every field above (`sign`); "" = unsigned

    def generation(self) -> tuple[int, int]:
        """The rollback generation it trains in, as (number, rollback step): two replicas that started a rollback at
        once may announce the same number with different steps, and those are different generations (strangers)."""
        return self.rollback_gen, self.rollback_step

    def check_binding(self) -> None:
        """BindingError unless the address is empty or bound to the peer id by its node key."""
        if not self.address:
            return
        verify_binding(self.address, self.peer_id, _hex(self.binding, "binding", self.peer_id))

    def message(self) -> SignableMessage:
        """The EIP-712 message the node key signs: every field but the signature."""
        return _announce_message(self.peer_id, self.addrs, self.spec_hash, self.num_stages, self.stage, self.capacity,
                                 self.address, self.next_step, _milli(self.throughput), self.head_term,
                                 self.ckpt_steps, self.rollback_gen, self.rollback_step, self.rollback_stage, self.seq,
                                 self.binding)

    def sign(self, identity: NodeIdentity) -> Announcement:
        """This announcement with `identity`'s address, binding and signature over all its fields."""
        bound = replace(self, address=identity.address, binding="0x" + bind(identity).hex(), signature="")
        sig = identity.account.sign_message(bound.message()).signature
        return replace(bound, signature="0x" + bytes(sig).hex())

    def verify(self) -> None:
        """BindingError unless the entry is signed, over its current fields, by the node key of `address`,
        and that key's binding ties `peer_id` to it (a relay cannot change a field without the key)."""
        if not self.address or not self.signature:
            raise BindingError(f"announcement of peer {self.peer_id} is not signed by a node key")
        self.check_binding()
        sig = _hex(self.signature, "signature", self.peer_id)
        try:
            signer = _recover(self.message(), sig)
        except Exception as exc:  # eth-keys / eth-account raise several types for a malformed signature
            raise BindingError(f"announcement of peer {self.peer_id}: malformed signature ({exc})") from exc
        if signer != to_checksum_address(self.address):
            raise BindingError(f"announcement of peer {self.peer_id} was not signed by {self.address} "
                               "(forged, or altered after signing)")

    def to_json(self) -> dict[str, Any]:
        d = asdict(self)
        d["addrs"] = list(self.addrs)
        d["ckpt_steps"] = list(self.ckpt_steps)
        return d

    @classmethod
    def from_json(cls, d: Any, limits: AnnounceLimits | None = None) -> Announcement:
        """Parse one entry; ValueError names the field of a wrong type or size."""
        lim = limits or AnnounceLimits()
        if not isinstance(d, dict):
            raise ValueError(f"an announcement must be an object, got {type(d).__name__}")
        addrs = msgio.field(d, "addrs", list, ValueError)
        if len(addrs) > lim.max_addrs:
            raise ValueError(f"announcement lists {len(addrs)} addrs, more than {lim.max_addrs}")

        def text(value: Any, name: str) -> str:
            if not isinstance(value, str) or len(value) > lim.max_string_bytes:
                raise ValueError(f"field '{name}' must be a string of at most {lim.max_string_bytes} characters")
            return value

        def num(name: str, lo: int, hi: int, default: int | None = None) -> int:
            if default is not None and name not in d:
                return default
            return msgio.int_field(d, name, lo, hi, ValueError)

        ckpt = d.get("ckpt_steps", [])
        if not isinstance(ckpt, list) or len(ckpt) > lim.max_ckpt_steps or not all(
                isinstance(x, int) and not isinstance(x, bool) and 0 <= x < 1 << 62 for x in ckpt):
            raise ValueError(f"field 'ckpt_steps' must be a list of at most {lim.max_ckpt_steps} steps in [0, 2**62)")
        throughput = d.get("throughput", 0.0)
        if isinstance(throughput, bool) or not isinstance(throughput, int | float) or not 0 <= throughput < 1e12:
            raise ValueError("field 'throughput' must be a number within [0, 1e12)")
        gen, step = num("rollback_gen", 0, 1 << 16, 0), num("rollback_step", -1, 1 << 62, -1)
        lost_stage = num("rollback_stage", -1, 1 << 16, -1)
        if not (gen > 0 and step >= 0 and 0 <= lost_stage < num("num_stages", 1, 1 << 16)) \
                and not (gen == 0 and step == -1 and lost_stage == -1):
            raise ValueError("fields 'rollback_gen', 'rollback_step' and 'rollback_stage' (a stage of the model) must "
                             "be all set (a rollback) or all unset")
        return cls(text(d.get("peer_id"), "peer_id"), tuple(text(a, "addrs") for a in addrs),
                   text(d.get("spec_hash"), "spec_hash"), num("num_stages", 1, 1 << 16),
                   num("stage", -1, 1 << 16), num("capacity", 0, 1 << 62), text(d.get("address", ""), "address"),
                   num("next_step", -1, 1 << 62, -1), float(throughput), num("head_term", -1, 1 << 16, -1),
                   tuple(ckpt), gen, step, lost_stage,
                   num("seq", 0, 1 << 62, 0),
                   text(d.get("binding", ""), "binding"), text(d.get("signature", ""), "signature"))


def _hex(value: str, name: str, peer: str) -> bytes:
    try:
        return bytes.fromhex(value.removeprefix("0x"))
    except ValueError as exc:
        raise BindingError(f"announcement of peer {peer}: {name} is not hex ({exc})") from exc


def _milli(throughput: float) -> int:
    """The signed form of a throughput: integer thousandths (EIP-712 has no floats)."""
    return max(0, int(round(throughput * 1000)))


def _announce_message(peer_id: str, addrs: tuple[str, ...], spec_hash: str, num_stages: int, stage: int,
                      capacity: int, address: str, next_step: int, throughput_milli: int, head_term: int,
                      ckpt_steps: tuple[int, ...], rollback_gen: int, rollback_step: int, rollback_stage: int, seq: int,
                      binding: str) -> SignableMessage:
    return encode_typed_data(ANNOUNCE_DOMAIN, ANNOUNCE_TYPES, {
        "peerId": peer_id, "addrs": list(addrs), "specHash": spec_hash, "numStages": num_stages, "stage": stage,
        "capacity": capacity, "nodeAddress": to_checksum_address(address), "nextStep": next_step,
        "throughputMilli": throughput_milli, "headTerm": head_term,
        "ckptSteps": list(ckpt_steps), "rollbackGen": rollback_gen, "rollbackStep": rollback_step,
        "rollbackStage": rollback_stage, "seq": seq, "binding": bytes.fromhex(binding.removeprefix("0x"))})


@lru_cache(maxsize=4096)
def _recover_cached(body: bytes, header: bytes, version: bytes, signature: bytes) -> str:
    return str(Account.recover_message(SignableMessage(version, header, body), signature=signature))


def _recover(message: SignableMessage, signature: bytes) -> str:
    return _recover_cached(bytes(message.body), bytes(message.header), bytes(message.version), signature)


def choose_stage(entries: Iterable[Announcement], spec_hash: str, num_stages: int, exclude: str = "") -> int:
    """The stage with the least announced capacity for this model (lowest index on ties)."""
    load = [0] * num_stages
    for e in entries:
        if e.peer_id != exclude and e.spec_hash == spec_hash and e.num_stages == num_stages and 0 <= e.stage < num_stages:
            load[e.stage] += e.capacity
    return min(range(num_stages), key=lambda s: (load[s], s))


class Discovery:
    """Keeps a table of announcements fresh by gossiping with known peers."""

    def __init__(self, host: Any, me: Announcement, cfg: DiscoveryConfig, bootstrap: list[str],
                 dht: ModelDht | None = None, *, identity: NodeIdentity | None,
                 limits: AnnounceLimits | None = None, policy: AccessPolicy | None = None,
                 scores: PeerScores | None = None,
                 admit: Callable[[Announcement], Awaitable[str | None]] | None = None) -> None:
        self.host = host
        # on-chain mode: a verified entry enters the table only when this says None (else: the refusal reason)
        self.admit = admit
        self.dht = dht  # None: bootstrap + gossip only
        self.cfg = cfg
        self.limits = limits or AnnounceLimits()  # message, table and per-sender bounds
        self._msg_limits = self.limits.message_limits()
        # the node key signing our announcement (None: a client that gossips unsigned, so peers drop its entry)
        self.identity = identity
        if me.seq == 0:
            me = replace(me, seq=int(time.time() * 1000))
        self.me = self._signed(me)
        self.gate = ProtocolGate(ANNOUNCE_PROTOCOL, policy, self.limits.guard, scores)
        self.sources: dict[str, str] = {}  # peer id of a table entry -> peer id of the sender that introduced it
        self.per_sender: Counter[str] = Counter()  # sender peer id -> table entries it introduced
        self.rejected: Counter[str] = Counter()  # reason -> entries dropped at a merge
        self._learned_at: dict[str, float] = {}  # peer id -> trio time we last asked it for its announcement
        self.bootstrap = list(bootstrap)
        for a in self.bootstrap:
            parse_peer_addr(a)  # ValueError names a bad bootstrap address
        self.table: dict[str, tuple[Announcement, float]] = {}  # peer id -> (announcement, local time seen)
        # peer id -> local time we last had a sign of life from it: its entry from itself, or a new version of it
        # (gossip refreshes `table`'s time with every relayed copy, so a dead peer's entry stays in the table until
        # its relays drop it; `recent` tells the peers that are still alive)
        self.heard_at: dict[str, float] = {}
        self.changed = trio.Event()
        self.dht_learned: set[str] = set()  # peer ids first heard of through a DHT provider lookup
        self.unbound = 0  # announcements dropped because they were unsigned, forged or altered
        self._dht_joined = False  # bootstrap peers added to the DHT routing table at least once
        host.set_stream_handler(ANNOUNCE_PROTOCOL, self._handle)

    def _signed(self, me: Announcement) -> Announcement:
        if me.capacity > self.limits.max_capacity:
            raise ValueError(f"capacity {me.capacity} exceeds AnnounceLimits.max_capacity={self.limits.max_capacity}")
        return me if self.identity is None else me.sign(self.identity)

    def update_me(self, **changes: Any) -> None:
        """Change our own announcement (e.g. the chosen stage); bumps seq and signs it again."""
        self.me = self._signed(replace(self.me, **{**changes, "seq": self.me.seq + 1}))

    def entries(self, max_age_s: float | None = None) -> list[Announcement]:
        """Live announcements of other peers (refreshed within `max_age_s`, default `entry_ttl_s`)."""
        now = trio.current_time()
        limit = self.cfg.entry_ttl_s if max_age_s is None else min(max_age_s, self.cfg.entry_ttl_s)
        return [a for a, t in self.table.values() if now - t <= limit and a.peer_id != self.me.peer_id]

    def recent(self, max_age_s: float) -> list[Announcement]:
        """The announcements of peers we had a sign of life from within `max_age_s`: an entry sent by the peer
        itself or a new version of its entry (a relayed copy of an unchanged entry does not count)."""
        now = trio.current_time()
        return [a for a in self.entries() if now - self.heard_at.get(a.peer_id, -float("inf")) <= max_age_s]

    def _expire(self, now: float) -> None:
        for pid in [p for p, (_, t) in self.table.items() if now - t > self.cfg.entry_ttl_s]:
            del self.table[pid]
            self.heard_at.pop(pid, None)
            src = self.sources.pop(pid, None)
            if src is not None:
                self.per_sender[src] -= 1
                if self.per_sender[src] <= 0:
                    del self.per_sender[src]

    def _drop(self, reason: str) -> None:
        self.rejected[reason] += 1

    def _merge(self, items: list[Any], sender: str | None = None) -> int:
        """Merge received entries (at most `max_entries_per_message`); returns how many were refused as
        forged, malformed or over a limit (the caller counts them against `sender`)."""
        lim = self.limits
        now = trio.current_time()
        self._expire(now)
        bad = 0
        for raw in items[: lim.max_entries_per_message]:
            try:
                a = Announcement.from_json(raw, lim)
            except (KeyError, TypeError, ValueError):
                self._drop("malformed")
                bad += 1
                continue
            if a.peer_id == self.me.peer_id:
                continue
            old = self.table.get(a.peer_id)
            if old is not None and a.seq < old[0].seq:
                continue  # stale copy of an entry we hold a newer version of
            if old is not None and a.seq == old[0].seq and a.signature == old[0].signature and a == old[0]:
                self.table[a.peer_id] = (old[0], now)  # the same signed entry again: verified already
                if sender == a.peer_id:
                    self.heard_at[a.peer_id] = now
                continue
            if a.capacity > lim.max_capacity:
                self._drop("capacity")
                bad += 1
                continue
            try:
                a.verify()
            except BindingError:
                self.unbound += 1
                self._drop("unsigned")
                bad += 1
                continue
            if old is None:
                own = sender is None or sender == a.peer_id
                if len(self.table) >= lim.max_table_entries:
                    self._drop("table_full")
                    continue
                if not own and sender is not None and self.per_sender[sender] >= lim.max_entries_per_sender:
                    self._drop("per_sender")
                    bad += 1
                    continue
                if not own and sender is not None:
                    self.sources[a.peer_id] = sender
                    self.per_sender[sender] += 1
            self.table[a.peer_id] = (a, now)
            if sender is None or sender == a.peer_id or (old is not None and a.seq > old[0].seq):
                self.heard_at[a.peer_id] = now
        self.changed.set()
        self.changed = trio.Event()
        return bad

    async def _admitted(self, items: list[Any]) -> tuple[list[Any], int]:
        """The entries of a message `admit` lets through (entries that do not parse or verify are left to
        `_merge`, which drops them), and how many it refused."""
        if self.admit is None or not isinstance(items, list):
            return items, 0
        kept: list[Any] = []
        refused = 0
        for raw in items[: self.limits.max_entries_per_message]:
            try:
                a = Announcement.from_json(raw, self.limits)
                if a.peer_id != self.me.peer_id:
                    a.verify()
            except (KeyError, TypeError, ValueError, BindingError):
                kept.append(raw)
                continue
            if a.peer_id != self.me.peer_id:
                reason = await self.admit(a)
                if reason is not None:
                    self._drop(reason)
                    refused += reason != UNAVAILABLE  # an unreachable chain is not the sender's fault
                    continue
            kept.append(raw)
        return kept, refused

    async def _merge_admitted(self, items: list[Any], sender: str | None = None) -> int:
        """`_merge` of what `admit` lets through; returns the entries refused (admit and merge together)."""
        kept, refused = await self._admitted(items)
        return self._merge(kept, sender) + refused

    def _payload(self) -> list[dict[str, Any]]:
        return [self.me.to_json()] + [a.to_json() for a in self.entries()]

    async def _read_table(self, stream: Any) -> list[Any]:
        msg = await msgio.read_json(stream, self._msg_limits, DiscoveryError, "announce message")
        if not isinstance(msg, list):
            raise DiscoveryError(f"an announce message must be a list of entries, got {type(msg).__name__}")
        return msg

    async def _handle(self, stream: Any) -> None:
        try:
            async with self.gate.serve(stream) as peer:
                try:
                    with trio.fail_after(self.cfg.discovery_timeout_s):
                        await self.gate.authorize(peer, None)
                        msg = await self._read_table(stream)
                        if await self._merge_admitted(msg, sender=peer.pretty()):
                            self.gate.refuse(peer, "bad_entries")
                        await msgio.write_json(stream, self._payload())
                        await stream.close()
                except (DiscoveryError, trio.TooSlowError, NotAuthorizedError) as exc:
                    if not isinstance(exc, NotAuthorizedError):
                        self.gate.refuse(peer, type(exc).__name__)
                    await reset_quietly(stream)
        except PeerRefusedError:
            return
        except Exception:  # a vanished peer only loses its own exchange
            await reset_quietly(stream)

    async def exchange(self, addr: str) -> None:
        """One gossip exchange with the peer at `addr` (a full multiaddr)."""
        info = parse_peer_addr(addr)
        if info.peer_id == self.host.get_id():
            return
        with trio.fail_after(self.cfg.discovery_timeout_s):
            await self.host.connect(info)
            stream = await self.host.new_stream(info.peer_id, [ANNOUNCE_PROTOCOL])
            await msgio.write_json(stream, self._payload())
            msg = await self._read_table(stream)
            await stream.close()
        await self._merge_admitted(msg, sender=info.peer_id.pretty())

    async def learn(self, peer_id: ID) -> None:
        """Ask a connected peer that is not in the table for its announcement (once per `learn_interval_s`;
        errors are swallowed: the caller decides on what the table holds afterwards)."""
        key = peer_id.pretty()
        now = trio.current_time()
        if now - self._learned_at.get(key, -float("inf")) < self.limits.learn_interval_s:
            return
        self._learned_at[key] = now
        if len(self._learned_at) > self.limits.max_table_entries * 4:
            self._learned_at = {k: t for k, t in self._learned_at.items() if now - t < self.limits.learn_interval_s}
        try:
            with trio.fail_after(min(self.cfg.discovery_timeout_s, self.limits.idle_timeout_s)):
                stream = await self.host.new_stream(peer_id, [ANNOUNCE_PROTOCOL])
                try:
                    await msgio.write_json(stream, self._payload())
                    msg = await self._read_table(stream)
                    await stream.close()
                except BaseException:
                    await reset_quietly(stream)
                    raise
            await self._merge_admitted(msg, sender=key)
        except Exception:  # an unreachable or silent peer stays unknown
            return

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
        """Live peers announcing `stage` of our model in our rollback generation (`Announcement.generation`:
        always (0, -1) without a rollback), by peer id."""
        me = self.me
        return sorted((e for e in self.entries() if e.stage == stage and e.spec_hash == me.spec_hash
                       and e.num_stages == me.num_stages and e.generation() == me.generation()),
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
