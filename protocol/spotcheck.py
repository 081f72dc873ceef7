"""Spot checks: deterministic CPU re-execution of a stage's hop, sampling, and fraud evidence.

An attester samples co-signed hops at the model's audit rate (a seeded, per-hop hash so the choice is
reproducible and unpredictable without the seed), fetches the stage's parameters as they were at that
step and the hop's input, re-executes the stage on CPU with deterministic algorithms, and compares the
result with the payload the node sent (whose digest the node signed).
Non-tail stages are checked on their forward activation, the tail stage on its backward gradient.

Metric (SPOTCHECK_RULE, version SPOTCHECK_VERSION, hashed into the accounting function hash that the
model's on-chain proposal pins): both tensors go through the same codec round trip and are compared on
the codec's wire vectors (z = U^T (h - E_fixed[ids]) for subspace codecs, h otherwise). Per token t,
e_t = ||sent_t - recomputed_t|| / max(||recomputed_t||, 0.1 * mean_t ||recomputed_t||); the score is
max(max_t e_t, MEAN_WEIGHT * mean_t e_t): one token far off, or every token a little off, both count.
A hop passes when score <= tolerance. Nodes may run bf16 autocast on GPUs while attesters re-execute in
fp32 on CPU, so the default tolerance is TOLERANCES["bf16"], 4x the largest bf16-autocast vs fp32 score
measured on CPU (0.062 on bench-subspace, 0.014-0.02 on tiny and 12-layer models); TOLERANCES["fp32"] is
for models whose terms require fp32 execution (cross-device fp32 noise is bf16 wire rounding, <= 0.004).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from eth_utils import keccak

from protocol.errors import SpotCheckError
from protocol.receipts import (
    BACKWARD,
    FORWARD,
    Domain,
    KeyRegistry,
    SignedReceipt,
    check_address,
    check_bytes32,
    payload_digest,
    recover_typed,
    sign_typed,
    verify_signed_receipt,
)
from sharding.codecs import get_codec, token_id_bytes
from sharding.config import ModelConfig
from sharding.stage import build_stage
from sharding.stagespec import StageSpec

SPOTCHECK_VERSION = 2  # 1: relative L2 over the whole decoded tensor; 2: per-token score on wire vectors
MEAN_WEIGHT = 8.0  # weight of the mean per-token error in the score (bf16 tolerance / a mean tolerance of ~0.03)
DENOMINATOR_FLOOR = 0.1  # per-token norms below this fraction of the microbatch's mean norm are floored to it
TOLERANCES: dict[str, float] = {"bf16": 0.25, "fp32": 0.02}  # score accepted as honest, by execution precision
SPOTCHECK_RULE = (
    f"v{SPOTCHECK_VERSION}: wire vectors after the codec round trip; e_t = ||sent_t - recomputed_t|| / "
    f"max(||recomputed_t||, {DENOMINATOR_FLOOR} * mean ||recomputed_t||); score = max(max_t e_t, "
    f"{MEAN_WEIGHT} * mean_t e_t); pass iff score <= tolerance; tolerances {sorted(TOLERANCES.items())}"
)


def spotcheck_rule_hash() -> bytes:
    """keccak256 of SPOTCHECK_RULE (part of the accounting function hash pinned on chain)."""
    return bytes(keccak(SPOTCHECK_RULE.encode()))


def hop_score(sent: torch.Tensor, recomputed: torch.Tensor) -> tuple[float, float, float]:
    """(score, max per-token error, mean per-token error) of two (B, T, w) wire-vector tensors."""
    a = sent.detach().double().reshape(-1, sent.shape[-1])
    b = recomputed.detach().double().reshape(-1, recomputed.shape[-1])
    norms = b.norm(dim=-1)
    den = torch.clamp(norms, min=max(DENOMINATOR_FLOOR * float(norms.mean()), 1e-30))
    err = (a - b).norm(dim=-1) / den
    worst, mean = float(err.max()), float(err.mean())
    return max(worst, MEAN_WEIGHT * mean), worst, mean


FRAUD_TYPES: dict[str, list[dict[str, str]]] = {
    "Fraud": [
        {"name": "modelId", "type": "uint256"},
        {"name": "epoch", "type": "uint64"},
        {"name": "node", "type": "address"},
        {"name": "evidence", "type": "bytes32"},
    ]
}


@dataclass(frozen=True)
class SpotCheckConfig:
    """How an attester samples and re-executes hops."""

    audit_rate: float = 0.05  # probability that a given co-signed hop is re-executed (the model's published rate)
    tolerance: float = TOLERANCES["bf16"]  # largest hop score (see SPOTCHECK_RULE) accepted as honest
    seed: int = 0  # attester's sampling seed (combined with each hop's key)
    threads: int = 1  # torch CPU threads during re-execution (fixed so results do not depend on the machine)

    def validate(self) -> SpotCheckConfig:
        """Raise ValueError naming a bad field."""
        if not 0.0 < self.audit_rate <= 1.0:
            raise ValueError(f"SpotCheckConfig.audit_rate={self.audit_rate!r}: must be in (0, 1]")
        if not self.tolerance > 0:
            raise ValueError(f"SpotCheckConfig.tolerance={self.tolerance!r}: must be > 0")
        if self.threads < 1:
            raise ValueError(f"SpotCheckConfig.threads={self.threads!r}: must be >= 1")
        return self


def detection_probability(rate: float, n: int) -> float:
    """Probability that at least one of `n` bad hops is sampled at audit rate `rate`: 1 - (1 - r)^n."""
    if not 0.0 <= rate <= 1.0:
        raise ValueError(f"rate={rate!r}: must be in [0, 1]")
    if n < 0:
        raise ValueError(f"n={n!r}: must be >= 0")
    return 1.0 - (1.0 - rate) ** n


def is_sampled(key: tuple[int, ...], rate: float, seed: int) -> bool:
    """Deterministic Bernoulli(rate) draw for one hop key under `seed`."""
    h = keccak(json.dumps([seed, *key]).encode())
    return int.from_bytes(h[:8], "big") < rate * 2**64


def sample_hops(receipts: list[SignedReceipt], config: SpotCheckConfig) -> list[SignedReceipt]:
    """The receipts (hops) an attester re-executes: those whose key is drawn at `config.audit_rate`."""
    config.validate()
    return [s for s in receipts if is_sampled(s.receipt.key, config.audit_rate, config.seed)]


@contextlib.contextmanager
def deterministic_cpu(threads: int) -> Iterator[None]:
    """Run torch on a fixed number of threads with deterministic algorithms; restore settings afterwards."""
    previous_threads = torch.get_num_threads()
    previous_det = torch.are_deterministic_algorithms_enabled()
    torch.set_num_threads(threads)
    torch.use_deterministic_algorithms(True)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(previous_det)
        torch.set_num_threads(previous_threads)


def window_bytes(window: torch.Tensor, config: ModelConfig) -> bytes:
    """(B, T+1) token window as its wire bytes (little-endian uint16, or uint32 for large vocabularies)."""
    dt = np.dtype("<u2") if token_id_bytes(config) == 2 else np.dtype("<u4")
    return window.detach().cpu().numpy().astype(dt).tobytes()


@dataclass(frozen=True)
class HopInput:
    """What an attester fetched to re-execute one sampled hop of a node."""

    receipt: SignedReceipt  # the audited hop, sent (and signed) by the audited node
    payload: bytes  # the payload the node sent in that hop (must match receipt.payloadDigest)
    window: torch.Tensor  # (B, T+1) token window of the microbatch
    state_dict: dict[str, torch.Tensor]  # the stage's parameters as they were at receipt.step
    input_payload: bytes | None = None  # activation payload the node received (None at the head)


@dataclass(frozen=True)
class SpotCheckResult:
    """Outcome of re-executing one hop."""

    key: tuple[int, int, int, int, int, int]  # the hop's replay key
    node: str  # audited node
    relative_error: float  # the hop score of SPOTCHECK_RULE (max of the worst and MEAN_WEIGHT x mean token error)
    recomputed_digest: bytes  # payloadDigest of the recomputed payload (encoded with the same codec)
    passed: bool  # relative_error <= tolerance


def reexecute(
    config: ModelConfig, spec: StageSpec, codec_name: str, hop: HopInput, threads: int = 1,
    precision: str = "fp32",
) -> tuple[torch.Tensor, bytes]:
    """Recompute the hop's tensor and its encoded payload deterministically on CPU.

    Forward hops (non-tail): the boundary activation. Backward hop of the tail: d loss / d input.
    precision: "fp32" (what attesters run) or "bf16" (CPU bf16 autocast, what a GPU node runs; used to
    measure re-execution noise).
    """
    if precision not in TOLERANCES:
        raise SpotCheckError("precision", f"{precision!r} is not one of {sorted(TOLERANCES)}")
    autocast = torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16")
    r = hop.receipt.receipt
    codec = get_codec(codec_name, config)
    window = hop.window.to(torch.long)
    ids, targets = window[:, :-1], window[:, 1:]
    with deterministic_cpu(threads):
        module = build_stage(config, spec)
        try:
            module.load_state_dict(hop.state_dict)
        except (RuntimeError, KeyError) as exc:
            raise SpotCheckError("state_dict", f"does not fit stage {spec.index}: {exc}") from exc
        h_in = None
        if not spec.is_first:
            if hop.input_payload is None:
                raise SpotCheckError("input_payload", f"stage {spec.index} needs the activation it received")
            h_in = codec.decode_activation(hop.input_payload, ids)
        if r.direction == FORWARD:
            if spec.is_last:
                raise SpotCheckError("direction", "the tail stage sends no forward hop")
            with torch.no_grad(), autocast:
                out = module(ids, h_in)
            return out, codec.encode_activation(out, ids)
        if not spec.is_last:
            raise SpotCheckError("direction", "only the tail's backward hop can be re-executed from its inputs")
        assert h_in is not None
        h_in = h_in.detach().requires_grad_(True)
        with autocast:
            loss = module(ids, h_in, targets)
        loss.backward()
        assert h_in.grad is not None
        # the worker backpropagates loss / num_microbatches; compare directions up to that scale
        return h_in.grad.detach(), codec.encode_gradient(h_in.grad.detach(), ids)


def _decode_sent(config: ModelConfig, codec_name: str, hop: HopInput) -> torch.Tensor:
    codec = get_codec(codec_name, config)
    ids = hop.window[:, :-1].to(torch.long)
    try:
        if hop.receipt.receipt.direction == FORWARD:
            return codec.decode_activation(hop.payload, ids)
        return codec.decode_gradient(hop.payload, ids)
    except Exception as exc:  # the codec names what was wrong; garbage here is itself evidence
        raise SpotCheckError("payload", f"the sent payload does not decode: {exc}") from exc


def check_hop(
    config: ModelConfig,
    spec: StageSpec,
    codec_name: str,
    hop: HopInput,
    check: SpotCheckConfig,
    grad_scale: float = 1.0,
) -> SpotCheckResult:
    """Re-execute `hop` and compare with what the node sent.

    `grad_scale` is the factor the node applies to the tail loss before backward (1/num_microbatches).
    """
    r = hop.receipt.receipt
    if r.stage != spec.index:
        raise SpotCheckError("stage", f"receipt is for stage {r.stage}, spec is stage {spec.index}")
    window = window_bytes(hop.window, config) if r.direction == FORWARD else b""
    if payload_digest(hop.payload, window) != r.payload_digest:
        raise SpotCheckError("payload", "does not match the payloadDigest the node signed")
    recomputed, encoded = reexecute(config, spec, codec_name, hop, check.threads)
    if r.direction == BACKWARD:
        recomputed = recomputed * grad_scale
        encoded = get_codec(codec_name, config).encode_gradient(recomputed, hop.window[:, :-1].to(torch.long))
    sent = _decode_sent(config, codec_name, hop)
    # compare in what the wire can carry: the recomputed tensor after the same codec round trip
    recomputed = _decode_sent(config, codec_name, dataclasses.replace(hop, payload=encoded))
    if sent.shape != recomputed.shape:
        raise SpotCheckError("payload", f"shape {tuple(sent.shape)} differs from {tuple(recomputed.shape)}")
    ids = hop.window[:, :-1].to(torch.long)
    err, _, _ = hop_score(_wire_vectors(config, codec_name, sent, ids, r.direction),
                          _wire_vectors(config, codec_name, recomputed, ids, r.direction))
    return SpotCheckResult(r.key, r.sender, err, payload_digest(encoded, window), err <= check.tolerance)


def _wire_vectors(config: ModelConfig, codec_name: str, x: torch.Tensor, ids: torch.Tensor, direction: int) -> torch.Tensor:
    """The codec's per-token wire vectors of a decoded tensor (z for subspace codecs, x itself otherwise)."""
    codec = get_codec(codec_name, config)
    return codec.wire_vectors(x, ids, gradient=direction != FORWARD)


@dataclass(frozen=True)
class FraudEvidence:
    """A failed spot check: the node's own signed receipt and what the attester recomputed."""

    receipt: SignedReceipt  # the hop the node signed (its payloadDigest commits what it sent)
    recomputed_digest: bytes  # digest of the correctly recomputed payload
    relative_error: float  # measured relative L2 error
    tolerance: float  # the tolerance the check used

    @property
    def node(self) -> str:
        """The node accused."""
        return self.receipt.receipt.sender

    def to_json(self) -> dict[str, Any]:
        """JSON-safe dict."""
        return {
            "receipt": self.receipt.to_json(),
            "recomputedDigest": "0x" + self.recomputed_digest.hex(),
            "relativeError": repr(self.relative_error),
            "tolerance": repr(self.tolerance),
        }

    def hash(self) -> bytes:
        """The `evidence` bytes32 of the Fraud verdict: keccak256 of the canonical JSON."""
        return keccak(json.dumps(self.to_json(), sort_keys=True, separators=(",", ":")).encode())


def fraud_evidence(hop: HopInput, result: SpotCheckResult, check: SpotCheckConfig) -> FraudEvidence:
    """Evidence from a failed check; a passed check is not fraud."""
    if result.passed:
        raise SpotCheckError("result", "the hop passed its spot check; there is no fraud to report")
    return FraudEvidence(hop.receipt, result.recomputed_digest, result.relative_error, check.tolerance)


def fraud_message(model_id: int, epoch: int, node: str, evidence: bytes) -> dict[str, Any]:
    """The Fraud EIP-712 message."""
    return {
        "modelId": model_id,
        "epoch": epoch,
        "node": check_address("node", node, SpotCheckError),
        "evidence": check_bytes32("evidence", evidence, SpotCheckError),
    }


def sign_fraud(domain: Domain, evidence: FraudEvidence, key: Any) -> tuple[dict[str, Any], bytes]:
    """An attester's signature over the Fraud verdict for `evidence`; returns (message, signature)."""
    r = evidence.receipt.receipt
    message = fraud_message(r.model_id, r.epoch, evidence.node, evidence.hash())
    return message, sign_typed(domain, FRAUD_TYPES, message, key)


def verify_fraud(
    domain: Domain,
    evidence: FraudEvidence,
    signatures: list[bytes],
    attesters: KeyRegistry,
    nodes: KeyRegistry,
    quorum: int,
) -> list[str]:
    """Check a Fraud verdict: the accused signed the hop, and >= `quorum` distinct attesters signed the verdict."""
    verify_signed_receipt(evidence.receipt, domain, nodes, require_cosigned=False)
    if evidence.relative_error <= evidence.tolerance:
        raise SpotCheckError("relativeError", "is within the tolerance: not fraud")
    r = evidence.receipt.receipt
    message = fraud_message(r.model_id, r.epoch, evidence.node, evidence.hash())
    signers: list[str] = []
    for i, sig in enumerate(signatures):
        signer = recover_typed(domain, FRAUD_TYPES, message, sig, f"signatures[{i}]")
        if not attesters.is_registered(signer) or signer in signers:
            raise SpotCheckError(f"signatures[{i}]", f"{signer} is not a distinct registered attester")
        signers.append(signer)
    if len(signers) < quorum:
        raise SpotCheckError("signatures", f"{len(signers)} attester signature(s), quorum is {quorum}")
    return signers
