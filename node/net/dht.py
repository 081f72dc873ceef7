"""Kademlia DHT for discovery: every node is a DHT server on its own host and a provider of its model's key.

py-libp2p's `KadDHT` (`/ipfs/kad/1.0.0`) runs in server mode on the node's existing host. A node that
trains a model provides `model_key(spec hash)`; `find_providers` returns the other providers of that key,
which `node.net.discovery.Discovery` then contacts over the announcement protocol. Nothing here raises into
the node: every failed operation is counted in `errors` by kind, logged once per kind, and the caller
retries it after `error_backoff_s` (doubled per failure in a row, capped at `error_backoff_max_s`).
"""

from __future__ import annotations

import hashlib
import logging
from typing import Any

import trio
from libp2p.kad_dht.kad_dht import DHTMode, KadDHT
from libp2p.peer.id import ID
from libp2p.peer.peerinfo import PeerInfo
from libp2p.tools.anyio_service import background_trio_service

from node.config import DhtConfig
from node.net.host import parse_peer_addr

log = logging.getLogger(__name__)
KEY_PREFIX = b"/pmn/model/"  # namespace of the content keys nodes provide


def model_key(spec_hash_hex: str) -> bytes:
    """The DHT key (a sha2-256 multihash) that nodes training the model with this spec hash provide."""
    if not spec_hash_hex or any(c not in "0123456789abcdef" for c in spec_hash_hex.lower()):
        raise ValueError(f"spec hash must be a hex string, got {spec_hash_hex!r}")
    digest = hashlib.sha256(KEY_PREFIX + spec_hash_hex.lower().encode()).digest()
    return b"\x12\x20" + digest  # multihash: sha2-256, 32 bytes


def peer_addr(info: PeerInfo) -> str | None:
    """The first address of `info` as a full multiaddr with /p2p/<peer id> (None when it has none)."""
    pid = info.peer_id.pretty()
    for a in info.addrs:
        s = str(a)
        return s if "/p2p/" in s else f"{s}/p2p/{pid}"
    return None


class ModelDht:
    """The node's DHT: bootstrap, provide the model key, find its other providers, count failures."""

    def __init__(self, host: Any, spec_hash_hex: str, cfg: DhtConfig) -> None:
        cfg.validate()
        self.host = host
        self.cfg = cfg
        self.key = model_key(spec_hash_hex)
        kad_log = logging.getLogger("libp2p.kad_dht")
        if kad_log.level == logging.NOTSET:  # its per-stream warnings flood stderr; failures are counted here
            kad_log.setLevel(logging.ERROR)
        self.kad = KadDHT(host, DHTMode.SERVER)  # registers the /ipfs/kad/1.0.0 handler on the host
        self.errors: dict[str, int] = {}  # failure kind -> times it happened
        self.provides = 0  # provide rounds that reached at least one peer
        self.lookups = 0  # provider lookups that completed

    def fail(self, kind: str, detail: object) -> None:
        """Count a failure of `kind`; the first of each kind is logged as a warning, later ones at debug."""
        n = self.errors.get(kind, 0) + 1
        self.errors[kind] = n
        if n == 1:
            log.warning("dht %s failed (counted, retried): %s", kind, detail)
        else:
            log.debug("dht %s failed (%d times): %s", kind, n, detail)

    def routing_table_size(self) -> int:
        """Peers in the DHT routing table."""
        return int(self.kad.get_routing_table_size())

    async def serve(self) -> None:
        """Run the DHT's own maintenance (routing-table refresh, record expiry) until cancelled."""
        try:
            async with background_trio_service(self.kad):
                await trio.sleep_forever()
        except Exception as exc:  # the library's service ending must not end the node
            self.fail("service", exc)

    async def add_bootstrap(self, addrs: list[str]) -> int:
        """Connect to each bootstrap peer and put it in the routing table; returns how many were added."""
        added = 0
        for addr in addrs:
            info = parse_peer_addr(addr)
            if info.peer_id == self.host.get_id():
                continue
            try:
                with trio.fail_after(self.cfg.query_timeout_s):
                    await self.host.connect(info)
                    if not await self.kad.add_peer(info.peer_id):
                        raise ConnectionError("not added to the routing table (not a DHT server?)")
                    added += 1
            except Exception as exc:  # unreachable peers: counted, tried again next round
                self.fail("bootstrap", f"{addr}: {exc!r}")
        return added

    async def provide(self) -> bool:
        """Advertise this node as a provider of the model key; False (counted) when no peer took it."""
        ok = False
        try:
            with trio.fail_after(self.cfg.query_timeout_s):
                ok = bool(await self.kad.provide(self.key.hex()))
        except Exception as exc:  # trio.TooSlowError, stream and dial errors
            self.fail("provide", repr(exc))
            return False
        if ok:
            self.provides += 1
        else:
            self.fail("provide", "no DHT peer accepted the provider record")
        return ok

    async def find_providers(self) -> list[PeerInfo] | None:
        """Other providers of the model key: the records held here plus those held by the peers closest to
        the key (asked directly, since the library's lookup stops at local records when it has any).
        None when the lookup failed (counted); an empty result is counted as kind `no_providers`."""
        found: dict[ID, PeerInfo] = {}
        me = self.host.get_id()
        try:
            with trio.fail_after(self.cfg.query_timeout_s):
                store = self.kad.provider_store
                for p in store.get_providers(self.key):
                    found.setdefault(p.peer_id, p)
                ask = getattr(store, "_get_providers_from_peer_with_closers", None)  # py-libp2p 0.8.1
                if ask is None:
                    remote = await store.find_providers(self.key, self.cfg.max_providers)
                else:
                    remote = []
                    closest = await self.kad.peer_routing.find_closest_peers_network(self.key)

                    async def one(pid: ID) -> None:
                        providers, _ = await ask(pid, self.key)
                        remote.extend(providers)

                    async with trio.open_nursery() as nursery:
                        for pid in closest:
                            if pid != me:
                                nursery.start_soon(one, pid)
                for p in remote:
                    found.setdefault(p.peer_id, p)
        except Exception as exc:  # trio.TooSlowError, stream and dial errors
            self.fail("find_providers", repr(exc))
            return None
        self.lookups += 1
        out = [p for pid, p in found.items() if pid != me and p.addrs][: self.cfg.max_providers]
        if not out:
            self.fail("no_providers", f"no other provider of key {self.key.hex()[:16]}...")
        return out

    def backoff(self, failures_in_a_row: int) -> float:
        """Seconds to wait before retrying after this many failures in a row."""
        return float(min(self.cfg.error_backoff_s * 2 ** max(0, failures_in_a_row - 1), self.cfg.error_backoff_max_s))
