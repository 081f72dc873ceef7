"""Who may use which protocol: the access-policy seam every protocol handler calls before reading a body.

`AccessPolicy.check(peer_id, protocol, stage)` raises `NotAuthorizedError` when the peer (its
Noise-authenticated id) may not use `protocol` for `stage`; handlers call it after reading at most a
bounded header (to learn the stage) and before a body byte. What `stage` means per protocol:

* `/pmn/state/1.0.0`, `/pmn/avg/1.0.0`: the stage whose state or contributions are asked for or pushed;
* `/pmn/delegate/1.0.0`: 0 (a leading head replica hands microbatches to the other head replicas);
* `/pmn/infer/1.0.0`: the stage of the node a hop is sent to (the sender must serve the stage before it);
  None for the head's `limits` / `generate` (paid requests from clients);
* `/pmn/audit/1.0.0`: the stage of the node being audited; each request is then checked again with
  `check_audit` (which step, microbatch and epoch the asker may fetch);
* `/pmn/announce/1.0.0`: None;
* `/pmn/act/1.0.0`: the stage the peer claimed in its HELLO (checked after the handshake, before any data frame).
* `/pmn/eval/1.0.0`: the stage of the node an evaluation is sent to (the sender must serve the stage before it).

`note_binding(peer_id, address, binding)` hands the policy a peer's node-key binding that a handshake
verified (the activation protocol's HELLO); policies that ignore node keys do nothing with it.

Implementations here: `OpenPolicy` (off-chain mode: everyone allowed, logged once when built) and
`StagePeersPolicy` (replicated off-chain mode: only peers that discovery knows, with a verified
announcement, as serving the same stage). A chain-backed policy (registered + bonded for the model and
stage, attester sampling) plugs in by implementing the same two methods.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any, Protocol

from libp2p.peer.id import ID

from node.errors import NotAuthorizedError, OtherGenerationError

STATE = "/pmn/state/1.0.0"
AVG = "/pmn/avg/1.0.0"
INFER = "/pmn/infer/1.0.0"
AUDIT = "/pmn/audit/1.0.0"
ANNOUNCE = "/pmn/announce/1.0.0"
ACT = "/pmn/act/1.0.0"
DELEGATE = "/pmn/delegate/1.0.0"
EVAL = "/pmn/eval/1.0.0"
UNAVAILABLE = "chain_unavailable"  # NodeAccess.admit's reason when it could not decide (not the sender's fault)

log = logging.getLogger("node.access")


@dataclass(frozen=True)
class AuditRequest:
    """One audit request, as the policy sees it (the model id was already matched)."""

    kind: str  # "hop" (parameters + input of a step: the stage's weights leave the node), "received", "receipts"
    step: int  # training step asked for (-1 for "receipts")
    microbatch: int  # microbatch asked for (-1 for "receipts")
    direction: int  # 0 forward, 1 backward (-1 for "receipts")
    epoch: int  # accounting epoch of the step (or the epoch asked for)
    stage: int = -1  # stage of the hop's sender (the receipt's stage): ours for "hop", a neighbour's for "received"
    attester: str = ""  # the node key the asker claims to speak for (an attester's validator address), "" if none
    binding: bytes = b""  # that key's signature over the asker's peer id (node.net.identity.bind), b"" if none


class AccessPolicy(Protocol):
    """Decides which peer may use which protocol of this node (raise NotAuthorizedError to refuse)."""

    async def check(self, peer_id: ID, protocol: str, stage: int | None) -> None:
        """Refuse `peer_id` on `protocol` for `stage` (see the module docstring for what stage means)."""
        ...

    async def check_audit(self, peer_id: ID, request: AuditRequest) -> None:
        """Refuse one audit request: which steps' weights an attester may fetch is decided here."""
        ...

    def note_binding(self, peer_id: ID, address: str, binding: bytes) -> None:
        """A peer's node-key binding, verified by a handshake (policies without node keys ignore it)."""
        ...


class OpenPolicy:
    """Every peer may use every protocol (off-chain mode: `pmn swarm`, tests). Says so once, when built."""

    def __init__(self, what: str = "every protocol of this node") -> None:
        self.what = what
        log.warning("open policy: any peer may use %s (off-chain mode: no registration or stake is checked)", what)

    async def check(self, peer_id: ID, protocol: str, stage: int | None) -> None:
        return None

    async def check_audit(self, peer_id: ID, request: AuditRequest) -> None:
        return None

    def note_binding(self, peer_id: ID, address: str, binding: bytes) -> None:
        return None


class PeerDirectory(Protocol):
    """What StagePeersPolicy reads from discovery (node.net.discovery.Discovery implements it)."""

    me: Any  # our own announcement (spec_hash, num_stages)

    def entries(self, max_age_s: float | None = None) -> list[Any]:
        """Live announcements whose signatures verified."""
        ...

    async def learn(self, peer_id: ID) -> None:
        """Fetch the announcement of a connected peer not in the table yet (rate limited)."""
        ...


class StagePeersPolicy:
    """Replicated off-chain mode: a protocol is open only to peers that discovery knows, from a verified
    announcement of our model bound to a node key, as serving the right stage in our rollback generation.

    State, contributions and delegated head work (`/pmn/state`, `/pmn/avg`, `/pmn/delegate`): the peer serves
    `stage` (or, for state, announces -1: a replica joining or re-syncing, when `joining_may_fetch_state`).
    Inference hops: the peer serves
    `stage - 1` (a client's `generate` to the head, stage None, is left to the payment check). Activations
    (`/pmn/act`, when opened): the stage the peer claimed in its HELLO is next to ours (one before or one
    after) and the peer serves it, so a stranger claiming to be an upstream replica feeds nothing in. Other
    protocols are refused. An unknown peer is looked up once (`directory.learn`)."""

    def __init__(self, directory: PeerDirectory, joining_may_fetch_state: bool = True,
                 protocols: Iterable[str] = (STATE, AVG, DELEGATE), act_stage: int | None = None) -> None:
        self.directory = directory
        self.joining_may_fetch_state = joining_may_fetch_state  # a stage -1 announcement may fetch state
        self.protocols = frozenset(protocols)  # protocols this policy opens at all
        self.act_stage = act_stage  # /pmn/act: the stage of the endpoint whose neighbours may use it (None: the
        # stage our announcement names)

    def _stages(self, peer: str, other_generation: bool = False) -> set[int]:
        """Stages `peer` announces for our model in our rollback generation (`other_generation`: in another)."""
        me = self.directory.me
        return {e.stage for e in self.directory.entries() if e.peer_id == peer and e.address
                and e.spec_hash == me.spec_hash and e.num_stages == me.num_stages
                and (e.generation() != me.generation()) == other_generation}

    async def check(self, peer_id: ID, protocol: str, stage: int | None) -> None:
        if protocol == INFER and stage is None and INFER in self.protocols:
            return  # a client's paid request to the head: the payment decides
        if protocol not in self.protocols or stage is None:
            raise NotAuthorizedError(f"{protocol} is not open to this peer")
        allowed = {stage - 1} if protocol in (INFER, EVAL) else {stage}
        ours = self.directory.me.stage if self.act_stage is None else self.act_stage
        if protocol == ACT and abs(stage - ours) != 1:
            raise NotAuthorizedError(f"{protocol} is open only to the stages next to ours ({ours}), not to stage {stage}")
        if protocol == STATE and self.joining_may_fetch_state:
            allowed.add(-1)
        peer = peer_id.pretty()
        if self._stages(peer) & allowed:
            return
        await self.directory.learn(peer_id)
        if self._stages(peer) & allowed:
            return
        if self._stages(peer, other_generation=True) & allowed:
            raise OtherGenerationError(f"peer {peer} serves the requested stage in another rollback generation")
        raise NotAuthorizedError(f"peer {peer} is not known as a peer of the requested stage")

    async def check_audit(self, peer_id: ID, request: AuditRequest) -> None:
        raise NotAuthorizedError("audits are not open to stage peers")

    def note_binding(self, peer_id: ID, address: str, binding: bytes) -> None:
        return None  # stage membership comes from discovery's verified announcements


class NodeAccess(AccessPolicy, Protocol):
    """A policy for the whole node (on-chain mode): it also reads discovery and admits announcements."""

    def attach(self, directory: PeerDirectory) -> None:
        """Use `directory` (the node's discovery) to resolve peer ids and learn our own stage."""
        ...

    async def admit(self, entry: Any) -> str | None:
        """None when a verified announcement may enter the peer table, else why not (counted against its sender)."""
        ...
