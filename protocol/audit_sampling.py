"""The published audit sampling rule: which stage an attester may audit, and which hops it may ask for.

Pure functions, shared by attesters (what to request) and nodes (whether to serve a request on
`/pmn/audit/1.0.0`). Nothing here talks to the network; `seed_from_chain` only reads an epoch root.

Rule (contracts/SECURITY.md, "Extraction"):

1. **One stage per attester per coverage window.** Epochs are grouped in windows of `AuditRule.window_epochs`.
   In window w the attesters (the ValidatorQuorum's validators) are put in a seeded order and the stages in a
   seeded order, both keyed by keccak256("pmn/audit/stage/1", modelId, w); the attester at position j audits
   stage `stages[j mod P]`. So every attester audits exactly one stage during the whole window, stages are
   spread evenly (each stage gets floor(A/P) or ceil(A/P) of the A attesters), and with fewer attesters than
   stages the stages left over go unaudited in that window (a random subset, different each window). The order
   uses no chain data on purpose: nobody can grind it, and knowing it in advance gives no hop.
2. **Hops at the model's audit rate, drawn after the epoch ends.** The hop seed is keccak256 of
   ("pmn/audit/hops/1", modelId, epoch, the epoch's live root on chain), known only once the root is submitted.
   An attester may ask for a hop iff the hop belongs to (modelId, epoch), is of its stage, is one a spot check
   can re-execute (a forward hop of a non-tail stage, or the tail's backward hop: `auditable`), and a Bernoulli
   draw keyed by (seed, attester, hop key) falls under `auditRateBps` / 10 000 — the rate of
   `protocol.spotcheck.is_sampled`, drawn per attester.

A hop is identified by its receipt's replay key (modelId, epoch, step, microbatch, stage, direction)
(`protocol.receipts.Receipt.key`); the audited stage is the receipt's `stage` (the sender's stage, whose
parameters the attester fetches; the receiver serves the payload it received for the same key).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from eth_utils import is_address, keccak, to_checksum_address

from protocol.errors import AuditSamplingError

HopKey = tuple[int, int, int, int, int, int]  # (modelId, epoch, step, microbatch, stage, direction)
FORWARD = 0  # receipt directions (protocol.receipts.FORWARD / BACKWARD)
BACKWARD = 1
BPS = 10_000
STAGE_DOMAIN = b"pmn/audit/stage/1"
HOP_SEED_DOMAIN = b"pmn/audit/hops/1"
DRAW_DOMAIN = b"pmn/audit/draw/1"


@dataclass(frozen=True)
class AuditRule:
    """Parameters of the sampling rule (published with the protocol; nodes and attesters must agree)."""

    window_epochs: int = 16  # epochs during which an attester audits the same single stage of a model

    def validate(self) -> AuditRule:
        """Raise AuditSamplingError naming a bad field."""
        if isinstance(self.window_epochs, bool) or not isinstance(self.window_epochs, int) or self.window_epochs < 1:
            raise AuditSamplingError("window_epochs", f"{self.window_epochs!r} must be an integer >= 1")
        return self


@dataclass(frozen=True)
class AuditAssignment:
    """What one attester may audit of one model in one epoch."""

    attester: str  # checksummed attester address
    model_id: int  # model
    epoch: int  # epoch
    stage: int | None  # the one stage it audits; None when it is not an attester or has no stage this window
    hops: tuple[HopKey, ...]  # the hops it may request, sorted (a subset of that stage's auditable hops)


def _u(field: str, value: Any, bits: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value < 1 << bits:
        raise AuditSamplingError(field, f"{value!r} is not an integer in 0..2**{bits}-1")
    return value


def _seed(seed: Any) -> bytes:
    if not isinstance(seed, bytes | bytearray) or len(seed) != 32:
        raise AuditSamplingError("seed", "must be exactly 32 bytes")
    return bytes(seed)


def _address(field: str, value: Any) -> str:
    if not isinstance(value, str) or not is_address(value):
        raise AuditSamplingError(field, f"{value!r} is not a 20-byte hex address")
    return to_checksum_address(value)


def _num_stages(num_stages: Any) -> int:
    n = _u("num_stages", num_stages, 16)
    if n < 1:
        raise AuditSamplingError("num_stages", "must be >= 1")
    return n


def sorted_attesters(attesters: Iterable[str]) -> list[str]:
    """The attester set checksummed, deduplicated and sorted by address (the order `ValidatorQuorum` uses)."""
    return sorted({_address("attesters", a) for a in attesters}, key=lambda a: int(a, 16))


def epoch_seed(model_id: int, epoch: int, root: bytes) -> bytes:
    """The hop seed of an epoch: keccak256(HOP_SEED_DOMAIN || modelId (32 B) || epoch (8 B) || root)."""
    return keccak(HOP_SEED_DOMAIN + _u("model_id", model_id, 256).to_bytes(32, "big")
                  + _u("epoch", epoch, 64).to_bytes(8, "big") + _seed(root))


def seed_from_chain(client: Any, model_id: int, epoch: int) -> bytes:
    """`epoch_seed` of the epoch's live root on chain (`client`: contracts.client.ProtocolContracts).

    Raises AuditSamplingError while no live root exists: before submission nobody may audit the epoch. A root
    voided and replaced gives a new seed (the replacement root's).
    """
    info = client.epoch_info(model_id, epoch)
    if not info.submitted_at or info.voided:
        raise AuditSamplingError("epoch", f"model {model_id} epoch {epoch} has no live root on chain yet")
    return epoch_seed(model_id, epoch, info.root)


def window_of(epoch: int, rule: AuditRule | None = None) -> int:
    """The coverage window an epoch falls in."""
    return _u("epoch", epoch, 64) // (rule or AuditRule()).validate().window_epochs


def _window_key(model_id: int, window: int) -> bytes:
    return keccak(STAGE_DOMAIN + _u("model_id", model_id, 256).to_bytes(32, "big") + window.to_bytes(8, "big"))


def stage_assignment(model_id: int, epoch: int, num_stages: int, attesters: Iterable[str],
                     rule: AuditRule | None = None) -> dict[str, int]:
    """Attester -> the one stage it audits in `epoch`'s window (every attester of the set gets exactly one)."""
    n = _num_stages(num_stages)
    key = _window_key(model_id, window_of(epoch, rule))
    order = sorted(sorted_attesters(attesters), key=lambda a: keccak(key + b"a" + bytes.fromhex(a[2:])))
    stages = sorted(range(n), key=lambda s: keccak(key + b"s" + s.to_bytes(2, "big")))
    return {a: stages[j % n] for j, a in enumerate(order)}


def attester_stage(attester: str, model_id: int, epoch: int, num_stages: int, attesters: Iterable[str],
                   rule: AuditRule | None = None) -> int | None:
    """The one stage `attester` may audit in `epoch`, or None when it is not in the attester set."""
    return stage_assignment(model_id, epoch, num_stages, attesters, rule).get(_address("attester", attester))


def auditable(hop: HopKey, num_stages: int) -> bool:
    """Hops a spot check can re-execute: forward hops of non-tail stages and the tail's backward hop."""
    stage, direction = hop[4], hop[5]
    return (direction == FORWARD and stage < num_stages - 1) or (direction == BACKWARD and stage == num_stages - 1)


def is_hop_sampled(seed: bytes, attester: str, hop: HopKey, audit_rate_bps: int) -> bool:
    """Bernoulli(audit_rate_bps / 10 000) draw for one (attester, hop) under the epoch's hop seed."""
    rate = _u("audit_rate_bps", audit_rate_bps, 16)
    if rate > BPS:
        raise AuditSamplingError("audit_rate_bps", f"{rate} is above {BPS}")
    body = b"".join(_u(f"hop[{i}]", v, b).to_bytes(b // 8, "big")
                    for i, (v, b) in enumerate(zip(hop, (256, 64, 64, 32, 16, 8), strict=True)))
    h = keccak(DRAW_DOMAIN + _seed(seed) + bytes.fromhex(_address("attester", attester)[2:]) + body)
    return int.from_bytes(h[:8], "big") * BPS < rate * 2**64


def hop_key(hop: Any) -> HopKey:
    """The replay key of a hop given as a key tuple, a `Receipt` or a `SignedReceipt`."""
    for attr in ("receipt", "key"):
        if not isinstance(hop, tuple) and hasattr(hop, attr):
            hop = getattr(hop, attr)
    if not isinstance(hop, tuple) or len(hop) != 6:
        raise AuditSamplingError("hop", f"{hop!r:.80} is not a 6-field receipt key")
    return hop  # type: ignore[return-value]


def audit_assignment(seed: bytes, attester: str, model_id: int, epoch: int, num_stages: int,
                     attesters: Iterable[str], hops: Iterable[Any], audit_rate_bps: int,
                     rule: AuditRule | None = None) -> AuditAssignment:
    """The stage `attester` audits in `epoch` and the hops of `hops` (the epoch's hop list) it may request."""
    attester = _address("attester", attester)
    n = _num_stages(num_stages)
    stage = attester_stage(attester, model_id, epoch, n, attesters, rule)
    if stage is None:
        return AuditAssignment(attester, model_id, epoch, None, ())
    chosen = {k for k in map(hop_key, hops)
              if _fits(k, model_id, epoch, stage, n) and is_hop_sampled(seed, attester, k, audit_rate_bps)}
    return AuditAssignment(attester, model_id, epoch, stage, tuple(sorted(chosen)))


def _fits(hop: HopKey, model_id: int, epoch: int, stage: int, num_stages: int) -> bool:
    return hop[0] == model_id and hop[1] == epoch and hop[4] == stage and auditable(hop, num_stages)


def may_request(seed: bytes, attester: str, model_id: int, epoch: int, num_stages: int, attesters: Iterable[str],
                hop: Any, audit_rate_bps: int, rule: AuditRule | None = None) -> bool:
    """Whether a node may serve `attester` the data of `hop` (for the sender: the stage's parameters at the hop's
    step and its input; for the receiver: the payload it received).

    False for anything the rule does not select, including a malformed hop or an attester outside the set.
    Raises AuditSamplingError only for bad local inputs (seed, stage count, attester set, rate, rule).
    """
    n = _num_stages(num_stages)
    _seed(seed)
    members = sorted_attesters(attesters)
    _u("model_id", model_id, 256)
    _u("epoch", epoch, 64)
    if _u("audit_rate_bps", audit_rate_bps, 16) > BPS:
        raise AuditSamplingError("audit_rate_bps", f"{audit_rate_bps} is above {BPS}")
    (rule or AuditRule()).validate()
    try:  # from here on, everything wrong comes from the request: refuse it
        key = hop_key(hop)
        who = _address("attester", attester)
        stage = attester_stage(who, model_id, epoch, n, members, rule)
        if stage is None or not _fits(key, model_id, epoch, stage, n):
            return False
        return is_hop_sampled(seed, who, key, audit_rate_bps)
    except AuditSamplingError:
        return False


def stages_covered(attester: str, model_id: int, epochs: Sequence[int], num_stages: int, attesters: Iterable[str],
                   rule: AuditRule | None = None) -> set[int]:
    """Distinct stages of the model `attester` may audit over `epochs` (with a fixed attester set)."""
    members = sorted_attesters(attesters)
    stages = {attester_stage(attester, model_id, e, num_stages, members, rule) for e in epochs}
    return {s for s in stages if s is not None}
