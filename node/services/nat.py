"""The NAT service of a node (a `node.services.base.NodeService`) over `node.net.nat`: reachability, relay, hole punching.

At start (after the runner chose the stage, before the ready line) it
1. connects to the bootstrap peers and asks them, with AutoNAT, whether they can dial it back
   (`nat.reachability` may force the answer; a node with no bootstrap peer is the first of its swarm
   and goes on as "unknown", serving as a relay);
2. runs circuit relay v2: STOP always (it accepts relayed connections), HOP (it relays for others,
   with `nat.relay_*` limits) when `nat.relay_service` and it is not private;
3. gives its `NatHost` the circuit transport (dialing `/p2p-circuit` addresses) and the hole puncher
   (DCUtR right after a relayed dial);
4. when private: reserves slots on relays (bootstrap peers, then peers found through gossip and the DHT),
   waits up to `nat.relay_start_timeout_s` for the first one, and announces its `/p2p-circuit` addresses
   first in its signed announcement, its own addresses after them.
While running it keeps the reservations (renew, replace a lost relay), re-checks reachability every
`nat.autonat_interval_s`, pings every connection of every peer every `nat.keepalive_interval_s` (closing one
that misses `nat.keepalive_failures` pings, or one ping while another connection to the same peer answers: a
lost NAT mapping leaves links that look established, `node.net.nat.keepalive`), and writes `nat` into the status file: reachability and its reason, relays,
reservation events and refusals, each connected peer's path (public / relayed / direct after hole punch)
and which protocols' streams ran over which path.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from typing import Any

import trio
from libp2p.peer.id import ID
from libp2p.relay.circuit_v2.config import RelayConfig, RelayRole
from libp2p.relay.circuit_v2.transport import CircuitV2Transport
from libp2p.tools.anyio_service import background_trio_service

from node.config import NatConfig
from node.context import NodeContext
from node.net.host import parse_peer_addr
from node.net.nat.dialing import NatHost
from node.net.nat.holepunch import HolePuncher, NodeDCUtR
from node.net.nat.keepalive import Keepalive
from node.net.nat.paths import DIRECT, PUNCHED, RELAYED, conn_is_relayed, is_circuit, peer_conns
from node.net.nat.reachability import PRIVATE, PUBLIC, Reachability
from node.net.nat.relay import RelayClient, relay_limits, relay_protocol


async def _run_service(service: Any, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
    """Run a py-libp2p async service until the node's nursery is cancelled."""
    async with background_trio_service(service):
        started = getattr(service, "event_started", None)
        if started is not None:
            await started.wait()
        task_status.started()
        await trio.sleep_forever()


class NatService:
    """Reachability, circuit relay v2 and DCUtR for one node (see the module doc)."""

    def __init__(self, cfg: NatConfig, bootstrap: Sequence[str] = ()) -> None:
        self.cfg = cfg
        self.bootstrap = list(bootstrap)
        self.ctx: NodeContext | None = None
        self.reach: Reachability | None = None
        self.relays: RelayClient | None = None
        self.puncher: HolePuncher | None = None
        self.hop = False  # serving as a relay
        self.stream_paths: dict[str, dict[str, set[str]]] = {}  # peer -> path -> protocols seen on it
        self.keepalive: Keepalive | None = None  # per-connection pings, set at start
        self._last: dict[str, Any] = {}
        self._checking = False  # a reachability re-check is running

    # --- start -------------------------------------------------------------------------------------

    async def _bootstrap_peers(self) -> list[ID]:
        assert self.ctx is not None
        host = self.ctx.host
        peers: list[ID] = []
        for addr in self.bootstrap:
            info = parse_peer_addr(addr)
            try:
                with trio.fail_after(self.cfg.autonat_timeout_s):
                    await host.connect(info)
                peers.append(info.peer_id)
            except Exception:  # a bootstrap peer that is down gives no verdict
                continue
        return peers

    async def start(self, ctx: NodeContext) -> None:
        cfg, host = self.cfg, ctx.host
        self.ctx = ctx
        reach = self.reach = Reachability(host, cfg)
        if cfg.reachability == "auto":
            with trio.move_on_after(cfg.reachability_timeout_s):
                peers = await self._bootstrap_peers()
                if peers:
                    await reach.check(peers)
                else:
                    reach.reason = "no bootstrap peer answered: first node of its swarm, serving as if public"
        self.hop = cfg.relay_service and reach.state != PRIVATE
        proto = relay_protocol(host, cfg, hop=self.hop)
        await ctx.nursery.start(_run_service, proto)
        if isinstance(host, NatHost):
            host.circuit = CircuitV2Transport(host, proto, RelayConfig(roles=RelayRole.STOP, limits=relay_limits(cfg)))
            host.direct_timeout_s = cfg.direct_dial_timeout_s
        if cfg.holepunch:
            dcutr = NodeDCUtR(host, read_timeout=cfg.holepunch_io_timeout_s, write_timeout=cfg.holepunch_io_timeout_s,
                              dial_timeout=cfg.holepunch_dial_timeout_s)
            await ctx.nursery.start(_run_service, dcutr)
            self.puncher = HolePuncher(host, cfg, dcutr)
            self.puncher.nursery = ctx.nursery
            if isinstance(host, NatHost):
                host.upgrader = self.puncher.upgrade
        if reach.state == PRIVATE:
            await self._start_relays()
        ctx.nursery.start_soon(self._watch)
        self.keepalive = Keepalive(host, cfg.keepalive_timeout_s, cfg.keepalive_failures)
        ctx.nursery.start_soon(self._keepalive)
        self._write_status(force=True)
        relays = ", ".join(self.relays.slots) if self.relays is not None and self.relays.slots else "none"
        print(f"reachability: {reach.state} ({reach.reason}); relay service {'on' if self.hop else 'off'}"
              + (f"; relayed through {relays}" if reach.state == PRIVATE else ""), file=sys.stderr, flush=True)

    async def _start_relays(self) -> None:
        assert self.ctx is not None
        if self.relays is not None:
            return
        self.relays = RelayClient(self.ctx.host, self.cfg, self._candidates, self._announce)
        self.ctx.nursery.start_soon(self.relays.run)
        with trio.move_on_after(self.cfg.relay_start_timeout_s):
            await self.relays.reserved.wait()
        self._announce()

    # --- relays and the announcement ---------------------------------------------------------------

    def _candidates(self) -> list[tuple[ID, list[str]]]:
        """Possible relays: bootstrap peers first, then announced peers whose first address is direct."""
        assert self.ctx is not None
        out: dict[str, tuple[ID, list[str]]] = {}
        for addr in self.bootstrap:
            info = parse_peer_addr(addr)
            out.setdefault(info.peer_id.pretty(), (info.peer_id, []))[1].append(addr)
        for e in self.ctx.discovery.entries():
            if not e.addrs or is_circuit(e.addrs[0]) or e.peer_id in out:
                continue
            out[e.peer_id] = (ID.from_base58(e.peer_id), [a for a in e.addrs if not is_circuit(a)])
        return list(out.values())

    def _announce(self) -> None:
        """Announce relayed addresses first (what a dialer tries first), our own after them."""
        assert self.ctx is not None
        discovery = self.ctx.discovery
        own = [a for a in discovery.me.addrs if not is_circuit(a)]
        circuit = self.relays.circuit_addrs() if self.relays is not None else []
        addrs = tuple((circuit + own)[: discovery.limits.max_addrs])
        if addrs != discovery.me.addrs:
            discovery.update_me(addrs=addrs)
        self._write_status(force=True)

    # --- status ------------------------------------------------------------------------------------

    def _sample_paths(self) -> dict[str, str]:
        assert self.ctx is not None
        host = self.ctx.host
        peers: dict[str, str] = {}
        outcomes = self.puncher.outcomes() if self.puncher is not None else {}
        for pid in host.get_connected_peers():
            conns = peer_conns(host, pid)
            if not conns:
                continue
            key = pid.pretty()
            punched = key in outcomes and outcomes[key] == PUNCHED
            direct_name = PUNCHED if punched else DIRECT
            paths = []
            for conn in conns:
                path = RELAYED if conn_is_relayed(conn) else direct_name
                paths.append(path)
                seen = self.stream_paths.setdefault(key, {}).setdefault(path, set())
                for s in conn.get_streams():
                    proto = s.get_protocol()
                    if proto:
                        seen.add(str(proto))
            peers[key] = direct_name if direct_name in paths else RELAYED
        return peers

    def snapshot(self) -> dict[str, Any]:
        """The `nat` section of the status file."""
        assert self.reach is not None
        out: dict[str, Any] = {"reachability": self.reach.state, "reason": self.reach.reason,
                               "votes": dict(self.reach.votes), "relay_service": self.hop,
                               "peers": self._sample_paths(),
                               "stream_paths": {p: {k: sorted(v) for k, v in d.items()}
                                                for p, d in self.stream_paths.items()}}
        if self.relays is not None:
            out.update(relays=sorted(self.relays.slots), circuit_addrs=self.relays.circuit_addrs(),
                       relay_events=self.relays.events[-8:], relay_refused=dict(self.relays.refused))
        if self.puncher is not None:
            out["holepunch"] = self.puncher.outcomes()
        if self.keepalive is not None and self.keepalive.closed:
            out["dead_links_closed"] = list(self.keepalive.closed)
        host = self.ctx.host if self.ctx is not None else None
        if isinstance(host, NatHost):
            out.update(relayed_dials=host.relayed_dials, last_dial_error=host.last_dial_error)
        return out

    async def flush_status(self, settle: bool = True) -> None:
        """Write the `nat` section now (the daemon calls it when training ends, while the connections are still
        up): the periodic refresh samples every `relay_check_interval_s`, and a short run could end between two
        samples with its last dials and streams unreported. With `settle`, hole punches a dial still waits on are
        given their bound first (`HolePuncher.settle`), so the status names how they ended."""
        if settle and self.puncher is not None:
            await self.puncher.settle()
        self._write_status(force=True)

    def _write_status(self, force: bool = False) -> None:
        if self.ctx is None or self.reach is None:
            return
        snap = self.snapshot()
        if force or snap != self._last:
            self._last = snap
            self.ctx.log.status(nat=snap)

    async def _watch(self) -> None:
        """Refresh the status every `relay_check_interval_s`, and every `autonat_interval_s` start a re-check of
        reachability (its own task: a check waits up to `autonat_timeout_s`, and the status must not go stale
        meanwhile, or a node that stops during a check leaves an outdated one)."""
        assert self.ctx is not None
        cfg = self.cfg
        next_check = trio.current_time() + cfg.autonat_interval_s
        while True:
            await trio.sleep(cfg.relay_check_interval_s)
            if cfg.reachability == "auto" and trio.current_time() >= next_check and not self._checking:
                next_check = trio.current_time() + cfg.autonat_interval_s
                self._checking = True
                self.ctx.nursery.start_soon(self._recheck)
            self._write_status()

    async def _recheck(self) -> None:
        """One reachability re-check through directly connected peers; start reserving if now private."""
        assert self.ctx is not None and self.reach is not None
        host = self.ctx.host
        try:
            direct = [p for p in host.get_connected_peers()
                      if any(not conn_is_relayed(c) for c in peer_conns(host, p))]
            before = self.reach.state
            await self.reach.check(direct)
            if self.reach.state == PRIVATE and before != PRIVATE:
                print(f"reachability: now private ({self.reach.reason}): reserving relay slots",
                      file=sys.stderr, flush=True)
                self.ctx.nursery.start_soon(self._start_relays)
            elif self.reach.state == PUBLIC and before != PUBLIC:
                print(f"reachability: now public ({self.reach.reason})", file=sys.stderr, flush=True)
        finally:
            self._checking = False
        self._write_status()

    async def _keepalive(self) -> None:
        """Ping every connection of every connected peer every `keepalive_interval_s`: traffic keeps the routers'
        NAT mappings, and a connection that stops answering (its mapping lost, its router renumbered) is closed,
        so new streams and the next dial use a live link (`node.net.nat.keepalive`)."""
        assert self.keepalive is not None
        while True:
            await trio.sleep(self.cfg.keepalive_interval_s)
            await self.keepalive.round()

    def close(self) -> None:
        """Nothing to release: the relay and DCUtR services end with the node's nursery."""
