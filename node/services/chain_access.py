"""The chain-backed access policy of an on-chain node (`node.net.access.NodeAccess`).

A peer is known by its Noise-authenticated peer id; its node key comes from a binding the node key signed
over that peer id (`node.net.identity.verify_binding`): the binding of its verified announcement in
discovery, of its activation-protocol HELLO (`note_binding`), or, for attesters, the one carried in each
audit request. The chain (NodeRegistry, ValidatorQuorum, ContributionLedger through `protocol.payments.ChainLink`)
then decides:

* `/pmn/state/1.0.0`, `/pmn/avg/1.0.0`, `/pmn/delegate/1.0.0` (replicated mode): the peer's node key serves the
  same model *and* stage (`servesStage`: assigned, active, stake covering every stage it holds);
* `/pmn/act/1.0.0`: the peer claims the stage before or after ours and its node key serves that stage;
* `/pmn/infer/1.0.0`: a hop to stage s comes from a node key serving s - 1 (a client's request to the head is
  left to the payment check);
* `/pmn/announce/1.0.0`: the stream is open (a joining node must be able to introduce itself), but each
  entry enters the table only when its signed node key serves the announced stage of our model on chain
  (a stage -1 entry: holds some stage of it) with at most the capacity the chain records (`admit`);
* `/pmn/audit/1.0.0`: the stream is open to its small, bodiless request headers; each request must carry
  a binding of the asker's peer id by a validator (`ValidatorQuorum.validators()`), and a hop's data is
  served only when `protocol.audit_sampling.may_request` selects that hop for that attester and epoch,
  which needs the epoch's live root on chain (the hop seed). The epoch's receipts (no parameters) are
  served to any validator.

Chain answers are cached (`ChainAccessConfig.ttl_s` / `negative_ttl_s`); a chain that does not answer
within `rpc_timeout_s`, or fails, refuses the request (`ChainUnavailableError`, a NotAuthorizedError that is
not counted against the peer) and never crashes the node. During such an outage a positive answer that
expired less than `stale_ok_s` ago still counts, so peers the node already worked with keep training
together until the chain is back; a peer the chain never vouched for stays refused.
"""

from __future__ import annotations

import logging
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar

import trio
from eth_utils import to_checksum_address
from libp2p.peer.id import ID

from node.errors import BindingError, ChainUnavailableError, NotAuthorizedError
from node.net.access import (
    ACT,
    ANNOUNCE,
    AUDIT,
    AVG,
    DELEGATE,
    EVAL,
    INFER,
    STATE,
    UNAVAILABLE,
    AuditRequest,
    PeerDirectory,
)
from node.net.identity import verify_binding
from protocol.audit_sampling import AuditRule, may_request, seed_from_chain
from protocol.errors import AuditSamplingError
from protocol.payments import ChainLink

log = logging.getLogger("node.chain_access")
T = TypeVar("T")


@dataclass
class ChainAccessConfig:
    """Caching and timeouts of the chain-backed access policy."""

    ttl_s: float = 30.0  # how long a positive chain answer (serves stage, validator set, epoch seed) is trusted
    negative_ttl_s: float = 2.0  # how long a negative answer is trusted (assignments can land any time)
    rpc_timeout_s: float = 5.0  # longest wait for one chain call; a slower or failed call refuses the request
    stale_ok_s: float = 900.0  # while the chain does not answer, a positive answer up to this old still counts
    max_cached: int = 4096  # chain answers remembered (the oldest is forgotten first)
    max_bindings: int = 4096  # peer id -> node key bindings remembered from handshakes and audit requests
    audit_rule: AuditRule = field(default_factory=AuditRule)  # the published audit sampling rule

    def validate(self) -> ChainAccessConfig:
        """Raise ValueError naming a bad field."""
        if not (self.ttl_s >= 0 and self.negative_ttl_s >= 0 and self.stale_ok_s >= 0 and self.rpc_timeout_s > 0):
            raise ValueError("ChainAccessConfig: ttl_s, negative_ttl_s and stale_ok_s must be >= 0, rpc_timeout_s > 0")
        if min(self.max_cached, self.max_bindings) < 1:
            raise ValueError("ChainAccessConfig: max_cached and max_bindings must be >= 1")
        self.audit_rule.validate()
        return self


class ChainAccessPolicy:
    """`NodeAccess` for one node of one on-chain model (see the module doc)."""

    def __init__(self, link: ChainLink, config: ChainAccessConfig | None = None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.link = link
        self.model_id = link.model_id
        self.config = (config or ChainAccessConfig()).validate()
        self.clock = clock
        terms = link.client.get_model(link.model_id).terms
        self.num_stages = int(terms.num_stages)  # stages of the model (on chain)
        self.audit_rate_bps = int(terms.audit_rate_bps)  # the model's published audit rate
        self.directory: PeerDirectory | None = None  # discovery (attach)
        self.bindings: OrderedDict[str, str] = OrderedDict()  # peer id -> node key, verified
        self._cache: OrderedDict[tuple[Any, ...], tuple[Any, float]] = OrderedDict()
        self.refused: dict[str, int] = {}  # reason -> refusals
        self._down_until = -float("inf")  # clock time until which the chain counts as down (after a failure)
        self.stale_served = 0  # answers given from an expired positive cache entry while the chain was down
        log.info("chain access policy for model %d (%d stages): registered, staked peers only", self.model_id,
                 self.num_stages)

    # -- wiring ------------------------------------------------------------------------------------

    def attach(self, directory: PeerDirectory) -> None:
        self.directory = directory

    def note_binding(self, peer_id: ID, address: str, binding: bytes) -> None:
        try:
            verify_binding(address, peer_id, binding)
        except BindingError:
            return
        key = peer_id.pretty()
        self.bindings.pop(key, None)
        self.bindings[key] = to_checksum_address(address)
        while len(self.bindings) > self.config.max_bindings:
            self.bindings.popitem(last=False)

    # -- chain reads (cached, bounded in time) -----------------------------------------------------

    async def _chain(self, key: tuple[Any, ...], fn: Callable[[], T], positive: Callable[[T], bool] = bool) -> T:
        now = self.clock()
        hit = self._cache.get(key)
        stale: tuple[T] | None = None  # an expired positive answer, still good while the chain is down
        if hit is not None:
            value, at = hit
            if now - at < (self.config.ttl_s if positive(value) else self.config.negative_ttl_s):
                return value  # type: ignore[no-any-return]
            if positive(value) and now - at < self.config.stale_ok_s:
                stale = (value,)
        if now < self._down_until:  # failed a moment ago: refuse at once rather than wait again
            return self._stale_or_refuse(stale, ChainUnavailableError(
                "chain unavailable (a recent call failed): request refused"))
        try:
            with trio.fail_after(self.config.rpc_timeout_s):
                # abandon_on_cancel: a hung RPC call is left to finish in its thread (mypy cannot type the kwarg)
                value = await trio.to_thread.run_sync(fn, abandon_on_cancel=True)  # type: ignore[call-arg]
        except trio.TooSlowError:
            self._down_until = self.clock() + self.config.negative_ttl_s
            return self._stale_or_refuse(stale, ChainUnavailableError(
                f"chain did not answer within rpc_timeout_s={self.config.rpc_timeout_s}: request refused"))
        except Exception as exc:  # requests / web3 / OS errors of a dead or failing RPC
            log.warning("chain call %s failed: %r", key[0], exc)
            self._down_until = self.clock() + self.config.negative_ttl_s
            return self._stale_or_refuse(stale, ChainUnavailableError(
                f"chain unavailable ({type(exc).__name__}): request refused"), exc)
        self._cache.pop(key, None)
        self._cache[key] = (value, self.clock())
        while len(self._cache) > self.config.max_cached:
            self._cache.popitem(last=False)
        return value

    def _stale_or_refuse(self, stale: tuple[T] | None, error: ChainUnavailableError,
                         cause: BaseException | None = None) -> T:
        """During an outage: the last positive answer if it is younger than `stale_ok_s` (an ongoing
        collaboration goes on), else the refusal (not counted against the peer)."""
        if stale is not None:
            self.stale_served += 1
            return stale[0]
        raise self._refuse("chain", error) from cause

    async def serves(self, node_key: str, stage: int) -> bool:
        """servesStage(model, node_key, stage) on chain (cached)."""
        client = self.link.client
        return await self._chain(("serves", node_key, stage),
                                 lambda: bool(client.serves_stage(self.model_id, node_key, stage)))

    async def stage_of(self, node_key: str) -> int | None:
        """The stage the node key is assigned in our model, or None (cached)."""
        client = self.link.client
        return await self._chain(("stage_of", node_key), lambda: client.stage_of(self.model_id, node_key),
                                 positive=lambda v: v is not None)

    async def capacity(self, node_key: str) -> int:
        """Capacity the chain records for an active node key (0 for any other status; cached)."""
        client = self.link.client

        def read() -> int:
            info = client.node_info(node_key)
            return int(info.capacity) if info.status == "Active" else 0

        return await self._chain(("capacity", node_key), read)

    async def validators(self) -> tuple[str, ...]:
        """The attester set (cached)."""
        client = self.link.client
        return await self._chain(("validators",), lambda: tuple(to_checksum_address(v) for v in client.validators()))

    async def seed(self, epoch: int) -> bytes | None:
        """The epoch's hop seed, or None while its root is not live on chain (cached)."""
        client = self.link.client

        def read() -> bytes | None:
            try:
                return seed_from_chain(client, self.model_id, epoch)
            except AuditSamplingError:
                return None

        return await self._chain(("seed", epoch), read, positive=lambda v: v is not None)

    # -- decisions ---------------------------------------------------------------------------------

    def _refuse(self, reason: str, exc: NotAuthorizedError | None = None) -> NotAuthorizedError:
        self.refused[reason] = self.refused.get(reason, 0) + 1
        return exc if exc is not None else NotAuthorizedError("not authorized")

    async def key_of(self, peer_id: ID) -> str | None:
        """The node key bound to `peer_id`: from a verified handshake, or discovery's verified table (asked once)."""
        pid = peer_id.pretty()
        hit = self.bindings.get(pid)
        if hit is not None:
            return hit
        if self.directory is None:
            return None
        for attempt in range(2):
            for e in self.directory.entries():
                if e.peer_id == pid and e.address:
                    return to_checksum_address(e.address)
            if attempt == 0:
                await self.directory.learn(peer_id)
        return None

    def _my_stage(self) -> int | None:
        me = None if self.directory is None else getattr(self.directory, "me", None)
        stage = getattr(me, "stage", -1)
        return stage if isinstance(stage, int) and stage >= 0 else None

    async def check(self, peer_id: ID, protocol: str, stage: int | None) -> None:
        if protocol in (ANNOUNCE, AUDIT):
            return  # per entry (admit) and per request (check_audit)
        if protocol == INFER and stage is None:
            return  # a client's paid request to the head: the payment decides
        if stage is None or isinstance(stage, bool) or not 0 <= stage < self.num_stages:
            raise self._refuse("bad_stage")
        if protocol in (STATE, AVG, DELEGATE):
            wanted = stage
        elif protocol in (INFER, EVAL):
            wanted = stage - 1
        elif protocol == ACT:
            mine = self._my_stage()
            if mine is None or abs(stage - mine) != 1:
                raise self._refuse("not_a_neighbour")
            wanted = stage
        else:
            raise self._refuse("protocol")
        if wanted < 0:
            raise self._refuse("bad_stage")
        key = await self.key_of(peer_id)
        if key is None:
            raise self._refuse("unbound")
        if not await self.serves(key, wanted):
            raise self._refuse("not_on_chain")

    async def check_audit(self, peer_id: ID, request: AuditRequest) -> None:
        if not request.attester:
            raise self._refuse("audit_unbound")
        try:
            verify_binding(request.attester, peer_id, request.binding)
        except BindingError:
            raise self._refuse("audit_unbound") from None
        attester = to_checksum_address(request.attester)
        validators = await self.validators()
        if attester not in validators:
            raise self._refuse("not_attester")
        if request.kind == "receipts":
            return  # receipts carry no parameters: every attester builds roots from them
        seed = await self.seed(request.epoch)
        if seed is None:
            raise self._refuse("epoch_open")  # no live root yet: nobody may audit the epoch
        hop = (self.model_id, request.epoch, request.step, request.microbatch, request.stage, request.direction)
        if not may_request(seed, attester, self.model_id, request.epoch, self.num_stages, validators, hop,
                           self.audit_rate_bps, self.config.audit_rule):
            raise self._refuse("not_sampled")

    async def admit(self, entry: Any) -> str | None:
        me = None if self.directory is None else getattr(self.directory, "me", None)
        if me is not None and (entry.spec_hash != me.spec_hash or entry.num_stages != me.num_stages):
            return "other_model"
        if not entry.address:
            return "unbound"
        try:
            if entry.stage < 0:
                if await self.stage_of(entry.address) is None:
                    return "not_on_chain"
            elif not await self.serves(entry.address, entry.stage):
                return "not_on_chain"
            if entry.capacity > await self.capacity(entry.address):
                return "capacity"
        except NotAuthorizedError:
            return UNAVAILABLE  # not the sender's fault: dropped, not counted against it
        return None
