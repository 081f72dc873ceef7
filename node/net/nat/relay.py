"""Circuit relay v2: serving as a relay (hop) with our limits, and a private node's reservations.

Serving: `relay_protocol` builds py-libp2p's `CircuitV2Protocol` with `NatConfig`'s limits. Relay v2's
defaults cap a relayed connection at 1 GiB and one hour, which a training run crosses; ours default to
no duration cap and 2**50 bytes (a data limit of 0 is not "unlimited" in py-libp2p 0.8.1: its
per-reservation fallback then refuses every byte).

Reserving: `RelayClient` keeps up to `max_relays` reservations on distinct relays, taken from the
candidates it is given (bootstrap peers, then peers discovery found through gossip and the DHT that
announce direct addresses). It renews each one after `reservation_renew_fraction` of its lifetime,
drops one whose relay disconnected or whose reservation expired, and replaces it, backing off
(`relay_retry_backoff_s`, doubled, capped at `relay_retry_backoff_max_s`) while no candidate accepts.
Every refusal and loss is kept with its reason (`events`, `refused`) for the node's status.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import multiaddr
import trio
from libp2p.peer.id import ID
from libp2p.peer.peerinfo import PeerInfo
from libp2p.relay.circuit_v2.pb.circuit_pb2 import HopMessage, PeerId
from libp2p.relay.circuit_v2.protocol import PROTOCOL_ID as HOP_PROTOCOL_ID
from libp2p.relay.circuit_v2.protocol import CircuitV2Protocol
from libp2p.relay.circuit_v2.protocol_buffer import StatusCode
from libp2p.relay.circuit_v2.resources import RelayLimits
from libp2p.relay.circuit_v2.utils import read_delimited_msg, write_delimited_msg

from node.config import NatConfig
from node.net.nat.errors import RelayUnreachableError, ReservationRefusedError
from node.net.nat.paths import is_circuit, peer_conns

MAX_EVENTS = 32  # reservation events kept for the status


def relay_limits(cfg: NatConfig) -> RelayLimits:
    """The limits this node's relay applies (and announces) to every reservation and circuit."""
    return RelayLimits(duration=cfg.relay_circuit_duration_s, data=cfg.relay_circuit_bytes,
                       max_circuit_conns=cfg.relay_max_circuits, max_reservations=cfg.relay_max_reservations,
                       reservation_ttl=cfg.relay_reservation_ttl_s)


def relay_protocol(host: Any, cfg: NatConfig, hop: bool) -> CircuitV2Protocol:
    """py-libp2p's relay v2 service with our limits: STOP (accept relayed connections) always, HOP (relay
    for others) when `hop`. Run it with `libp2p.tools.async_service.background_trio_service`."""
    t = max(1, int(cfg.reservation_timeout_s))
    return CircuitV2Protocol(host, limits=relay_limits(cfg), allow_hop=hop, read_timeout=t, write_timeout=t,
                             close_timeout=t)


@dataclass
class Slot:
    """One reservation this node holds."""

    relay: str  # the relay's peer id
    addrs: list[str]  # the relay's direct addresses (each with /p2p/<relay>)
    expires: float  # unix time the relay says it ends
    renew_at: float  # trio time we renew it


def _status_name(code: int) -> str:
    try:
        return StatusCode(code).name
    except ValueError:
        return f"status {code}"


class RelayClient:
    """A private node's reservations. `candidates()` lists (peer id, direct addrs) of possible relays."""

    def __init__(self, host: Any, cfg: NatConfig, candidates: Callable[[], Sequence[tuple[ID, list[str]]]],
                 on_change: Callable[[], None]) -> None:
        self.host = host
        self.cfg = cfg
        self.candidates = candidates
        self.on_change = on_change
        self.slots: dict[str, Slot] = {}  # relay peer id -> our reservation there
        self.refused: dict[str, str] = {}  # relay peer id -> why it last refused or failed (retried after backoff)
        self.events: list[str] = []  # the latest reservation events, oldest first
        self.failures = 0  # reservation rounds in a row that ended with no reservation at all
        self.reserved = trio.Event()  # set once the first reservation is held

    def _event(self, text: str) -> None:
        self.events = (self.events + [f"{time.strftime('%H:%M:%S')} {text}"])[-MAX_EVENTS:]

    def circuit_addrs(self) -> list[str]:
        """Our addresses through every relay we hold a slot on: <relay addr>/p2p-circuit/p2p/<us>."""
        me = self.host.get_id().pretty()
        return [f"{a}/p2p-circuit/p2p/{me}" for s in self.slots.values() for a in s.addrs]

    async def reserve(self, peer: ID, addrs: list[str]) -> Slot:
        """Connect to `peer` and reserve a slot (ReservationRefusedError / RelayUnreachableError otherwise)."""
        key = peer.pretty()
        maddrs = [multiaddr.Multiaddr(a) for a in addrs]
        try:
            with trio.fail_after(self.cfg.reservation_timeout_s):
                await self.host.connect(PeerInfo(peer, maddrs))
                stream = await self.host.new_stream(peer, [HOP_PROTOCOL_ID])
                try:
                    await write_delimited_msg(stream, HopMessage(type=HopMessage.RESERVE,
                                                                 peer=PeerId(id=self.host.get_id().to_bytes())))
                    resp = await read_delimited_msg(stream, HopMessage)
                finally:
                    await stream.close()
        except trio.TooSlowError as exc:
            raise RelayUnreachableError(f"relay {key}: no reservation answer within "
                                        f"reservation_timeout_s={self.cfg.reservation_timeout_s}") from exc
        except Exception as exc:  # refused stream (no hop protocol), dial errors: several libp2p types
            raise RelayUnreachableError(f"relay {key}: {exc}") from exc
        status = resp.status if resp.HasField("status") else StatusCode.OK
        if status != StatusCode.OK:
            raise ReservationRefusedError(key, _status_name(status))
        expires = float(resp.reservation.expire) if resp.HasField("reservation") else time.time() + 60
        ttl = max(1.0, expires - time.time())
        got = [str(multiaddr.Multiaddr(bytes(a))) for a in resp.reservation.addrs] if resp.HasField("reservation") else []
        got = [a if "/p2p/" in a else f"{a}/p2p/{key}" for a in got if not is_circuit(a)]
        return Slot(relay=key, addrs=got or [a if "/p2p/" in a else f"{a}/p2p/{key}" for a in addrs], expires=expires,
                    renew_at=trio.current_time() + ttl * self.cfg.reservation_renew_fraction)

    def _lost(self) -> list[str]:
        """Drop slots whose relay disconnected or whose reservation expired; returns what was dropped, why."""
        lost = []
        for key, slot in list(self.slots.items()):
            why = None
            if not peer_conns(self.host, ID.from_base58(key)):
                why = "relay disconnected"
            elif slot.expires <= time.time():
                why = "reservation expired"
            if why is not None:
                del self.slots[key]
                self.refused[key] = why
                lost.append(f"{key}: {why}")
                self._event(f"lost relay {key}: {why}")
        return lost

    async def _renew(self) -> bool:
        changed = False
        now = trio.current_time()
        for key, slot in list(self.slots.items()):
            if now < slot.renew_at:
                continue
            try:
                self.slots[key] = await self.reserve(ID.from_base58(key), slot.addrs)
                self._event(f"renewed reservation on {key}")
            except (RelayUnreachableError, ReservationRefusedError) as exc:
                del self.slots[key]
                self.refused[key] = str(exc)
                self._event(f"renewal failed: {exc}")
                changed = True
        return changed

    async def round(self, retry_refused: bool = False) -> bool:
        """One maintenance round: drop lost slots, renew due ones, fill up to `max_relays`. Returns whether the
        set of relays changed."""
        changed = bool(self._lost())
        changed |= await self._renew()
        for peer, addrs in self.candidates():
            if len(self.slots) >= self.cfg.max_relays:
                break
            key = peer.pretty()
            if key in self.slots or key == self.host.get_id().pretty() or not addrs:
                continue
            if key in self.refused and not retry_refused:
                continue
            try:
                self.slots[key] = await self.reserve(peer, addrs)
            except (RelayUnreachableError, ReservationRefusedError) as exc:
                self.refused[key] = str(exc)
                self._event(str(exc))
                continue
            self.refused.pop(key, None)
            self._event(f"reserved a slot on relay {key}")
            changed = True
        if self.slots:
            self.reserved.set()
        return changed

    async def run(self) -> None:
        """Maintain the reservations until cancelled (checks every `relay_check_interval_s`, backs off while
        no relay accepts, and retries refused relays after each backoff)."""
        backoff = self.cfg.relay_retry_backoff_s
        retry_refused = False
        while True:
            if await self.round(retry_refused):
                self.on_change()
            if self.slots:
                self.failures = 0
                backoff = self.cfg.relay_retry_backoff_s
                retry_refused = False
                await trio.sleep(self.cfg.relay_check_interval_s)
            else:
                self.failures += 1
                await trio.sleep(backoff)
                backoff = min(backoff * 2, self.cfg.relay_retry_backoff_max_s)
                retry_refused = True
