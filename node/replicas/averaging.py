"""Averaging inside a stage: per-(step, microbatch, attempt) gradient contributions and `/pmn/avg/1.0.0`.

Every replica keeps the parameter gradient of each microbatch attempt it computed separately and
pushes it to the other replicas of its stage. Once the head's commit of a step is known, each
replica combines the committed contributions (one per microbatch) through `protocol.aggregation`
in microbatch order, so every replica applies the same update and the synchronous result equals
the single-replica run. A replica that lacks a step's commit or contributions pulls them from a
peer of its stage (joining replicas catch up this way).

Contributions travel in the stage's `ContributionCodec` (the spec's `replica_averaging`): dense fp32,
dense bf16 (`dense-bf16`: half the bytes, each value rounded once), or PowerSGD factors
(`sharding.gradcompress`, `powersgd_iterations` power iterations each) in bf16, int8 or int4 (`powersgd_bits`)
with the error feedback kept by the replica that computed the microbatch. Either way a contribution is a flat vector
of 4-byte words of a size fixed by the spec, every replica decodes the same words to the same dense
gradient, and the combination (CenteredClip by choice) runs on the decoded contributions, so replicas
stay identical. A pushed or pulled contribution of another encoding, another size, with NaN/Inf (an
int8 or int4 one: in a scale, or a negative scale or a code outside -127 .. 127 / -7 .. 7) is refused and
counted against the sender.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import trio
from libp2p.custom_types import TProtocol

from node.errors import AveragingError, NotAuthorizedError, PeerRefusedError
from node.net import msgio
from node.net.access import AVG, AccessPolicy
from node.net.gate import ProtocolGate, reset_quietly
from node.net.host import parse_peer_addr
from node.net.peerscore import PeerGuardConfig, PeerScores
from node.net.streampool import StreamPool, request_once
from protocol.aggregation import AggregationConfig, aggregate
from protocol.modelspec import POWERSGD_BITS, REPLICA_AVERAGING
from sharding.gradcompress import (
    GradCompressError,
    PowerSGDEncoder,
    PowerSGDLayout,
    dequantize_factors,
    pack_nibbles,
    powersgd_decode,
    unpack_nibbles,
)
from sharding.optimizers import is_muon_param

AVG_PROTOCOL = TProtocol("/pmn/avg/1.0.0")
MAX_HEADER = 1 << 20  # bytes of one JSON message header a client accepts (a pull answer lists what it holds)


@dataclass
class AvgLimits:
    """Bounds of `/pmn/avg/1.0.0` as a node serves it (every refusal counts against the sender)."""

    max_header_bytes: int = 1 << 16  # largest request header, checked on its length prefix (a head leader's step
    # bundle lists every microbatch of the step with its loss)
    max_depth: int = 3  # deepest JSON nesting of a request header (a bundle's pairs: a list of [mb, attempt] lists)
    idle_timeout_s: float = 10.0  # longest wait for the next bytes of a request
    keepalive_s: float = 30.0  # longest wait for the next request on a stream after one was answered (a client's
    # kept stream, `node.net.streampool`; its idle_s is below this)
    max_pending_per_peer: int = 256  # contributions pushed by one peer and still held (more are refused); an
    # honest peer holds at most keep_steps x num_microbatches x attempts of them
    max_pending_total: int = 2048  # contributions pushed by peers and still held, all peers together
    guard: PeerGuardConfig = field(default_factory=lambda: PeerGuardConfig(max_streams_per_peer=16))  # scores,
    # bans and stream caps (a stage peer pushes every microbatch's contribution and pulls commits concurrently)

    def message_limits(self, max_blob: int = 0) -> msgio.MessageLimits:
        """msgio limits of a request header (the blob is checked against the store's vector size)."""
        return msgio.MessageLimits(max_header_bytes=self.max_header_bytes, max_body_bytes=max_blob,
                                   max_depth=self.max_depth, idle_timeout_s=self.idle_timeout_s).validate()


# -- flat gradients (pure) ---------------------------------------------------------------------------


def trainable(module: torch.nn.Module) -> list[torch.nn.Parameter]:
    """Parameters that receive gradients, in a fixed order."""
    return [p for p in module.parameters() if p.requires_grad]


def take_grads(module: torch.nn.Module) -> torch.Tensor:
    """The module's accumulated gradients as one flat fp32 vector; the gradients are reset to None."""
    parts = []
    for p in trainable(module):
        parts.append(p.grad.detach().reshape(-1).float() if p.grad is not None else torch.zeros(p.numel()))
        p.grad = None
    return torch.cat(parts) if parts else torch.zeros(0)


def set_grads(module: torch.nn.Module, flat: torch.Tensor) -> None:
    """Install a flat gradient vector (inverse of take_grads)."""
    params = trainable(module)
    n = sum(p.numel() for p in params)
    if flat.numel() != n:
        raise AveragingError(f"gradient vector has {flat.numel()} values, the stage has {n} parameters")
    off = 0
    for p in params:
        p.grad = flat[off: off + p.numel()].reshape(p.shape).to(p.dtype).clone()
        off += p.numel()


def combine(vectors: list[torch.Tensor], num_microbatches: int, method: str = "mean",
            codec: ContributionCodec | None = None, counts: list[int] | None = None) -> torch.Tensor:
    """Combine the committed contributions of a step: one per microbatch, or (counts) bundles of counts[i]
    microbatches each (every microbatch's gradient already scaled by 1/M).

    Each contribution times M / count estimates the step's gradient; their aggregate (by default the mean weighted
    by count, so the result is the sum of the contributions when every microbatch is covered: with one per
    microbatch, a plain mean) is the update. The robust methods weigh every contribution's estimate alike.
    Compressed contributions are decoded first (the robust aggregate runs on the decoded low-rank gradients); one
    that fails to decode is left out like a non-finite one.
    """
    if not vectors:
        raise AveragingError("no contributions to combine")
    counts = counts or [1] * len(vectors)
    if len(counts) != len(vectors) or min(counts) < 1:
        raise AveragingError(f"{len(vectors)} contributions with microbatch counts {counts}")
    if codec is not None and codec.compressed:
        dense, kept = [], []
        for v, k in zip(vectors, counts, strict=True):
            try:
                dense.append(codec.decode(v))
                kept.append(k)
            except AveragingError:
                continue
        if not dense:
            raise AveragingError("no contribution of the step decodes")
        vectors, counts = dense, kept
    updates = [v * (num_microbatches / k) for v, k in zip(vectors, counts, strict=True)]
    weights = [float(k) for k in counts] if len(set(counts)) > 1 else None  # bundles of unequal size: by share
    return aggregate(updates, AggregationConfig(method=method), weights)


# -- contribution encodings --------------------------------------------------------------------------


def _words(values: torch.Tensor) -> torch.Tensor:
    """bf16 values packed two per 4-byte word (a float32 view, zero-padded to an even count)."""
    v = values.to(torch.bfloat16)
    if v.numel() % 2:
        v = torch.cat([v, torch.zeros(1, dtype=torch.bfloat16)])
    return v.view(torch.int16).view(torch.float32).clone()


def _unwords(words: torch.Tensor, count: int) -> torch.Tensor:
    """Inverse of _words: the first `count` bf16 values as float32."""
    return words.contiguous().view(torch.int16).view(torch.bfloat16)[:count].to(torch.float32)


class ContributionCodec:
    """How one stage's contributions travel: `dense` fp32 values, `dense-bf16` values (every replica,
    the sender too, combines the rounded values), or `powersgd` rank-r factors in bf16 (`bits` 16) or as
    int8 codes (`bits` 8) or 4-bit codes two to a byte (`bits` 4) with one bf16 scale per factor column.

    `words` is the length of a contribution's flat 4-byte-word vector (what the store holds and the
    protocol moves); `encode` is stateful (PowerSGD's error feedback and warm-started Q belong to the
    replica that computed the microbatch), `decode` and `check` are pure.
    """

    def __init__(self, shapes: list[tuple[int, ...]], method: str = "dense", rank: int = 4, seed: int = 0,
                 bits: int = 16, iterations: int = 1, ranks: list[int | None] | None = None) -> None:
        """ranks: a PowerSGD rank per shape (None: `rank`), e.g. the spec's powersgd_block_rank for the blocks'
        matrices (`for_module`)."""
        if method not in REPLICA_AVERAGING:
            raise AveragingError(f"replica_averaging={method!r}: use one of {', '.join(REPLICA_AVERAGING)}")
        if bits not in POWERSGD_BITS:
            raise AveragingError(f"powersgd_bits={bits!r}: use one of {', '.join(map(str, POWERSGD_BITS))}")
        self.method = method  # the spec's replica_averaging
        self.bits = bits  # the spec's powersgd_bits: 16 (bf16 factors), 8 or 4 (int8 / int4 codes + bf16 column scales)
        self.size = sum(int(torch.Size(s).numel()) for s in shapes)  # dense values (the stage's trainable params)
        self.layout: PowerSGDLayout | None = None
        self.code_bytes = 0  # powersgd_bits 8 / 4: bytes the factor codes fill at the head of a contribution
        self.encoder: PowerSGDEncoder | None = None
        if method == "powersgd":
            try:
                self.layout = PowerSGDLayout.build(shapes, rank, ranks)
            except GradCompressError as exc:
                raise AveragingError(str(exc)) from exc
            try:
                self.encoder = PowerSGDEncoder(self.layout, seed=seed, wire_dtype=torch.bfloat16, iterations=iterations)
            except GradCompressError as exc:
                raise AveragingError(f"powersgd_iterations: {exc}") from exc
            self.values = self.layout.wire_size  # factor values of one contribution
            own = sorted({e.rank for e in self.layout.entries if e.compressed} - {rank})
            name = f"powersgd-r{rank}" + "".join(f"+r{r}" for r in own)  # the ranks in use ride in the tag
            if bits in (8, 4):  # the codes (int4: two to a byte), then the bf16 scales
                self.code_bytes = self.values if bits == 8 else (self.values + 1) // 2
                self.words = (self.code_bytes + 2 * self.layout.scale_count + 3) // 4
                self.tag = f"{name}-int{bits}"  # rides in push headers and pull answers
            else:
                self.words = (self.values + 1) // 2  # bf16 values, two per word
                self.tag = f"{name}-bf16"
        elif method == "dense-bf16":
            self.values = self.size
            self.words = (self.size + 1) // 2  # bf16 values, two per word
            self.tag = "dense-bf16"
        else:
            self.values = self.words = self.size
            self.tag = "dense"

    @classmethod
    def for_module(cls, module: torch.nn.Module, method: str = "dense", rank: int = 4,
                   seed: int = 0, bits: int = 16, iterations: int = 1, block_rank: int = 0) -> ContributionCodec:
        """The codec of a stage module's trainable parameters; block_rank (> 0) is the PowerSGD rank of the
        transformer blocks' matrices (`sharding.optimizers.is_muon_param`: Muon's under the muon recipe)."""
        named = [(n, p) for n, p in module.named_parameters() if p.requires_grad]  # trainable()'s order
        ranks: list[int | None] = [block_rank if block_rank > 0 and is_muon_param(n, p) else None for n, p in named]
        return cls([tuple(p.shape) for _, p in named], method, rank, seed, bits, iterations, ranks)

    @property
    def compressed(self) -> bool:
        """True unless contributions travel as the dense fp32 gradient itself (they need encoding and decoding)."""
        return self.method != "dense"

    @property
    def ratio(self) -> float:
        """Bytes of a dense contribution per byte of an encoded one."""
        return self.size / self.words

    def encode(self, vec: torch.Tensor) -> torch.Tensor:
        """The words of this replica's contribution `vec` (dense: itself)."""
        if self.method == "dense-bf16":
            return _words(vec.reshape(-1))
        if self.encoder is None:
            return vec
        if self.bits == 16:
            return _words(self.encoder.encode(vec.reshape(-1)))
        codes, scales = self.encoder.encode_quantized(vec.reshape(-1), self.bits)
        packed = codes.view(torch.uint8) if self.bits == 8 else pack_nibbles(codes)
        raw = torch.zeros(4 * self.words, dtype=torch.uint8)  # codes, the bf16 scales, zero padding
        raw[: self.code_bytes] = packed
        raw[self.code_bytes: self.code_bytes + 2 * scales.numel()] = scales.to(torch.bfloat16).view(torch.uint8)
        return raw.view(torch.float32)

    def _sized(self, words: torch.Tensor) -> torch.Tensor:
        """`words` unless they are not one contribution of this encoding (AveragingError)."""
        if words.dim() != 1 or words.numel() != self.words:
            raise AveragingError(f"{self.tag} contribution has shape {tuple(words.shape)}, expected ({self.words},)")
        return words

    def _finite(self, values: torch.Tensor) -> torch.Tensor:
        """`values` unless they hold NaN/Inf (AveragingError)."""
        if not bool(torch.isfinite(values).all()):
            bad = int((~torch.isfinite(values)).sum())
            raise AveragingError(f"{self.tag} contribution holds {bad} non-finite value(s) (NaN/Inf)")
        return values

    def _factors(self, words: torch.Tensor) -> torch.Tensor:
        """The fp32 PowerSGD wire vector of a contribution's words (AveragingError on a wrong size, NaN/Inf)."""
        assert self.layout is not None
        if self.bits == 16:
            return self._finite(_unwords(self._sized(words), self.values))
        raw = self._sized(words).contiguous().view(torch.uint8)  # codes are finite; their range and scales checked below
        n, k = self.code_bytes, self.layout.scale_count
        scales = raw[n: n + 2 * k].clone().view(torch.bfloat16).to(torch.float32)
        try:
            codes = raw[:n].view(torch.int8) if self.bits == 8 else unpack_nibbles(raw[:n], self.values)
            return dequantize_factors(self.layout, codes, scales, self.bits)
        except GradCompressError as exc:
            raise AveragingError(f"{self.tag} contribution: {exc}") from exc

    def check(self, words: torch.Tensor) -> None:
        """AveragingError unless `words` is one contribution of this encoding holding only finite values."""
        if self.method == "dense-bf16":
            self._finite(_unwords(self._sized(words), self.values))
        elif self.layout is None:
            self._finite(self._sized(words))
        else:
            self._factors(words)

    def decode(self, words: torch.Tensor) -> torch.Tensor:
        """Dense fp32 gradient of a contribution (AveragingError on a wrong size or NaN/Inf factors)."""
        if self.method == "dense-bf16":
            return self._finite(_unwords(self._sized(words), self.values))
        if self.layout is None:
            return words
        try:
            return powersgd_decode(self.layout, self._factors(words))
        except GradCompressError as exc:
            raise AveragingError(str(exc)) from exc


# -- the store ---------------------------------------------------------------------------------------


Pair = tuple[int, int]  # (microbatch, attempt)


@dataclass(frozen=True)
class Held:
    """One held contribution: the committed (mb, attempt) pairs it sums (one, or a replica's step bundle), its
    words, and the tail loss of each pair (None off the tail)."""

    covers: tuple[Pair, ...]  # sorted by microbatch; the first is its key in the store
    vec: torch.Tensor  # its words (ContributionCodec.words of them)
    losses: tuple[float | None, ...]  # one per covered pair


MAX_COVERS = 1 << 12  # most pairs one bundle may cover (a step's microbatches are far fewer)


def check_losses(losses: Any, count: int) -> list[float | None]:
    """`losses` as a bundle's tail losses: a list of `count` numbers or nulls (AveragingError otherwise)."""
    if not isinstance(losses, list) or len(losses) != count or any(
            x is not None and (isinstance(x, bool) or not isinstance(x, int | float)) for x in losses):
        raise AveragingError(f"a bundle's 'losses' must list a number or null for each of its {count} pairs")
    return [None if x is None else float(x) for x in losses]


def commit_pairs(pairs: list[Any], max_mb: int, max_attempt: int, error: type[Exception]) -> dict[int, int]:
    """A wire commit, [[mb, attempt], ...], as mb -> attempt: integer pairs within range, each microbatch once;
    `error` naming the first bad pair."""
    commit: dict[int, int] = {}
    for p in pairs:
        if not (isinstance(p, list) and len(p) == 2 and all(type(x) is int for x in p)
                and 0 <= p[0] <= max_mb and 0 <= p[1] <= max_attempt and p[0] not in commit):
            raise error(f"malformed commit pair {str(p)[:40]}: [microbatch, attempt] within range, each microbatch "
                        "once")
        commit[p[0]] = p[1]
    return commit


def check_claim(claim: Any, covers: tuple[Pair, ...]) -> dict[int, int] | None:
    """A bundle push's claimed commit (a leading head's: every microbatch of the step once, holding the bundle's
    pairs), None when absent; AveragingError naming what is wrong."""
    if claim is None:
        return None
    if not isinstance(claim, list) or not 0 < len(claim) <= MAX_COVERS:
        raise AveragingError(f"field 'commit' must list 1 to {MAX_COVERS} [microbatch, attempt] pairs")
    commit = commit_pairs(claim, (1 << 20) - 1, (1 << 20) - 1, AveragingError)
    if any(commit.get(mb) != a for mb, a in covers):
        raise AveragingError("a bundle's pairs must be in the commit it claims")
    return commit


def check_covers(covers: list[Pair]) -> tuple[Pair, ...]:
    """`covers` as a bundle's pairs: non-empty, at most MAX_COVERS, integer (mb, attempt) pairs in range, one per
    microbatch, sorted by microbatch (AveragingError naming what is wrong)."""
    if not covers or len(covers) > MAX_COVERS:
        raise AveragingError(f"a bundle covers 1 .. {MAX_COVERS} (mb, attempt) pairs, this one {len(covers)}")
    out = []
    for pair in covers:
        if (not isinstance(pair, list | tuple) or len(pair) != 2
                or any(isinstance(x, bool) or not isinstance(x, int) or not 0 <= x < 1 << 20 for x in pair)):
            raise AveragingError(f"a bundle's pair must be [mb, attempt] integers in [0, 2^20), got {str(pair)[:40]}")
        out.append((int(pair[0]), int(pair[1])))
    mbs = [mb for mb, _ in out]
    if mbs != sorted(set(mbs)):
        raise AveragingError("a bundle's pairs must name distinct microbatches in increasing order")
    return tuple(out)


class ContributionStore:
    """Contributions and commits of recent steps (this replica's and its stage peers').

    A contribution covers one (mb, attempt) pair, or under `replica_exchange = "step"` a bundle of them (the sum of
    one replica's committed microbatches of the step, `covers`); it is stored under its first pair."""

    def __init__(self, size: int, codec: ContributionCodec | None = None, exchange: str = "microbatch") -> None:
        if codec is not None and codec.words != size:
            raise AveragingError(f"store of {size} words for a codec of {codec.words}")
        self.codec = codec or ContributionCodec([(size,)])  # how contributions travel (dense by default)
        self.size = size  # 4-byte words per contribution vector (dense: the stage's trainable parameters)
        self.exchange = exchange  # the spec's replica_exchange: "microbatch" or "step" (bundles accepted)
        self.vecs: dict[int, dict[Pair, torch.Tensor]] = {}  # step -> first covered (mb, attempt) -> vector
        self.covers: dict[int, dict[Pair, tuple[Pair, ...]]] = {}  # step -> key -> pairs it covers (bundles only)
        self.losses: dict[int, dict[Pair, float]] = {}  # step -> covered (mb, attempt) -> tail loss
        self.commits: dict[int, dict[int, int]] = {}  # step -> mb -> committed attempt
        self.claims: dict[int, dict[str, dict[int, int]]] = {}  # step -> pushing peer -> the whole commit its
        # bundle's push header claimed (a leading head's, so a standby knows the step's commit before the delegates'
        # bundles come; the engine trusts only the leader's)
        self.wire_bytes = 0  # /pmn/avg/1.0.0 bytes this node's server read and wrote for this store (pushes
        # received, pull requests and answers): every contribution crossing between replicas is counted once
        self.pushes_in = 0  # contributions (a microbatch's, or a replica's step bundle) pushed to us and stored
        self.push_wire_bytes = 0  # the part of wire_bytes those pushes moved (request, blob and answer)
        self.changed = trio.Event()

    def _poke(self) -> None:
        self.changed.set()
        self.changed = trio.Event()

    def _check(self, step: int, vec: torch.Tensor) -> None:
        if vec.numel() != self.size or vec.dim() != 1:
            raise AveragingError(f"contribution of step {step} has {vec.numel()} values, expected {self.size}")

    def add(self, step: int, mb: int, attempt: int, vec: torch.Tensor, loss: float | None = None) -> None:
        """Keep one contribution of one pair (AveragingError on a wrong size; nothing stored then)."""
        self._check(step, vec)
        self.vecs.setdefault(step, {})[(mb, attempt)] = vec
        self.covers.get(step, {}).pop((mb, attempt), None)
        if loss is not None:
            self.losses.setdefault(step, {})[(mb, attempt)] = float(loss)
        self._poke()

    def add_bundle(self, step: int, covers: list[Pair] | tuple[Pair, ...], vec: torch.Tensor,
                   losses: Sequence[float | None] | None = None) -> None:
        """Keep one replica's step bundle (`replica_exchange = "step"`). AveragingError, nothing stored, when this
        stage exchanges per microbatch, the pairs are malformed (`check_covers`), the losses do not match them, the
        size is wrong, or it overlaps a held contribution of the step under another key (first come is kept)."""
        if self.exchange != "step":
            raise AveragingError("this stage exchanges one contribution per microbatch (replica_exchange = "
                                 "microbatch): a bundle is refused")
        pairs = check_covers(list(covers))
        if losses is not None:
            losses = check_losses(list(losses), len(pairs))
        self._check(step, vec)
        key = pairs[0]
        held = {p: k for k, ps in self.entries(step) for p in ps}
        clash = sorted({held[p] for p in pairs if p in held} - {key})
        if clash or (key in self.vecs.get(step, {}) and self._covers(step, key) != pairs):
            raise AveragingError(f"bundle of step {step} covering {list(pairs)[:8]} overlaps a held contribution "
                                 f"(key {clash[0] if clash else key})")
        self.vecs.setdefault(step, {})[key] = vec
        self.covers.setdefault(step, {})[key] = pairs
        for p, loss in zip(pairs, losses or [None] * len(pairs), strict=True):
            if loss is not None:
                self.losses.setdefault(step, {})[p] = float(loss)
        self._poke()

    def add_held(self, step: int, held: Held) -> None:
        """Keep a pulled contribution: a bundle under replica_exchange = "step", else one pair's (`add`)."""
        if self.exchange == "step":
            self.add_bundle(step, held.covers, held.vec, held.losses)
        else:
            self.add(step, *held.covers[0], held.vec, held.losses[0])

    def held(self, step: int, key: Pair) -> Held:
        """The contribution of `step` held under `key`, with the pairs it covers and their losses."""
        covers = self._covers(step, key)
        losses = self.losses.get(step, {})
        return Held(covers, self.vecs[step][key], tuple(losses.get(p) for p in covers))

    def _covers(self, step: int, key: Pair) -> tuple[Pair, ...]:
        return self.covers.get(step, {}).get(key, (key,))

    def entries(self, step: int) -> list[tuple[Pair, tuple[Pair, ...]]]:
        """(key, covered pairs) of every contribution held for `step`, in key order."""
        return [(k, self._covers(step, k)) for k in sorted(self.vecs.get(step, {}))]

    def pairs(self, step: int) -> list[Pair]:
        """Every (mb, attempt) pair a held contribution of `step` covers."""
        return [p for _, ps in self.entries(step) for p in ps]

    def attempts(self) -> list[int]:
        """Attempt ids of every pair held, all steps."""
        return [a for step in self.vecs for _, a in self.pairs(step)]

    def commit(self, step: int, commit: dict[int, int]) -> None:
        """Record the head's commit of `step` (first one wins; commits never change)."""
        if step not in self.commits:
            self.commits[step] = dict(commit)
            self._poke()

    def _chosen(self, step: int) -> list[Pair]:
        """Keys of the contributions a committed step combines: those whose pairs are all committed, in key order,
        each unless a pair of it is already covered (a duplicate pair; `add_bundle` refuses overlaps)."""
        commit = self.commits.get(step, {})
        taken: set[int] = set()
        out = []
        for key, ps in self.entries(step):
            if all(commit.get(mb) == a for mb, a in ps) and not taken & {mb for mb, _ in ps}:
                taken.update(mb for mb, _ in ps)
                out.append(key)
        return out

    def missing(self, step: int) -> list[int]:
        """Committed microbatches of `step` no held contribution covers."""
        covered = {mb for k in self._chosen(step) for mb, _ in self._covers(step, k)}
        return sorted(mb for mb in self.commits.get(step, {}) if mb not in covered)

    def committed(self, step: int) -> list[Held]:
        """Each committed contribution present, in microbatch order of its first pair."""
        return [self.held(step, key) for key in self._chosen(step)]

    def claim(self, step: int, peer: str, commit: dict[int, int]) -> None:
        """Record the commit of `step` that `peer` claimed with a bundle it pushed."""
        self.claims.setdefault(step, {})[peer] = dict(commit)
        self._poke()

    def prune(self, keep_from: int) -> None:
        """Forget steps before `keep_from`."""
        for d in (self.vecs, self.covers, self.losses, self.commits, self.claims):
            for s in [s for s in d if s < keep_from]:
                del d[s]  # type: ignore[attr-defined]


# -- wire messages -----------------------------------------------------------------------------------


async def write_msg(stream: Any, header: dict[str, Any], blob: bytes = b"") -> None:
    """4-byte header length, JSON header (with the blob length), then the blob."""
    await msgio.write_json(stream, {**header, "blob": len(blob)}, blob)


async def read_msg_header(stream: Any, limits: msgio.MessageLimits) -> tuple[dict[str, Any], int]:
    """The JSON header of a message (an object) and the blob length it declares, blob not read."""
    header = await msgio.read_json(stream, limits, AveragingError, "message header")
    if not isinstance(header, dict):
        raise AveragingError(f"malformed message header: expected an object, got {type(header).__name__}")
    size = header.get("blob")
    if isinstance(size, bool) or not isinstance(size, int) or size < 0:
        raise AveragingError(f"malformed message header: 'blob' must be an integer >= 0, got {size!r}")
    return header, size


async def read_msg(stream: Any, max_blob: int, limits: msgio.MessageLimits | None = None
                   ) -> tuple[dict[str, Any], bytes]:
    """Inverse of write_msg (AveragingError on oversize or malformed input, before the blob is read)."""
    lim = limits or msgio.MessageLimits(max_header_bytes=MAX_HEADER, max_body_bytes=max_blob, max_depth=8,
                                        idle_timeout_s=3600.0)
    header, size = await read_msg_header(stream, lim)
    if size > max_blob:
        raise AveragingError(f"message blob of {size} bytes exceeds {max_blob}")
    return header, await msgio.read_exact(stream, size, AveragingError, lim.idle_timeout_s) if size else b""


def vec_bytes(vec: torch.Tensor) -> bytes:
    """fp32 little-endian bytes of a flat vector."""
    return vec.detach().to(torch.float32).contiguous().numpy().tobytes()


def bytes_vec(raw: bytes, size: int) -> torch.Tensor:
    """Inverse of vec_bytes (AveragingError on a wrong length)."""
    if len(raw) != 4 * size:
        raise AveragingError(f"vector of {len(raw)} bytes, expected {4 * size}")
    return torch.frombuffer(bytearray(raw), dtype=torch.float32)


# -- the service -------------------------------------------------------------------------------------


class _Counted:
    """A stream that counts the bytes read from and written to it (what `/pmn/avg` moves, headers included)."""

    def __init__(self, stream: Any) -> None:
        self.stream = stream
        self.count = 0  # bytes read + written
        self.store: ContributionStore | None = None  # the store the request named, once known
        self.stored = False  # the request was a push whose contribution was stored
        self._first = b""  # the first byte of the next request, read while waiting for it

    async def read(self, n: int | None = None) -> bytes:
        if self._first:
            data, self._first = self._first, b""
        else:
            data = bytes(await self.stream.read(n))
        self.count += len(data)
        return data

    async def next_request(self, keepalive_s: float) -> bool:
        """Wait up to `keepalive_s` for the first byte of another request on this stream; False when none came
        (idle) or the client ended the stream."""
        with trio.move_on_after(keepalive_s):
            try:
                self._first = bytes(await self.stream.read(1))
            except Exception:  # the client closed or reset it
                return False
        return bool(self._first)

    async def write(self, data: bytes) -> None:
        await self.stream.write(data)
        self.count += len(data)

    async def close(self) -> None:
        await self.stream.close()


class AveragingService:
    """Serves `/pmn/avg/1.0.0` for whatever stage the node serves now (`target()` gives it)."""

    def __init__(self, host: Any, spec_hash: str, target: Callable[[int], ContributionStore | None],
                 timeout_s: float, policy: AccessPolicy | None = None, limits: AvgLimits | None = None,
                 scores: PeerScores | None = None) -> None:
        self.host = host
        self.spec_hash = spec_hash  # hex model spec hash; requests for another model are refused
        self.target = target  # stage -> the newest store this node kept for it (None if it never served it)
        self.timeout_s = timeout_s  # bound on one exchange
        self.limits = limits or AvgLimits()
        self.gate = ProtocolGate(AVG, policy, self.limits.guard, scores)  # policy, bans, stream caps
        self.pushed: dict[str, deque[tuple[int, int, int, int]]] = {}  # peer -> (stage, step, mb, attempt) it pushed
        host.set_stream_handler(AVG_PROTOCOL, self._handle)

    def _held(self, peer: str) -> int:
        """Contributions `peer` pushed that a store still holds (forgotten ones are dropped from the count)."""
        q = self.pushed.get(peer)
        if not q:
            return 0
        kept: deque[tuple[int, int, int, int]] = deque()
        for key in q:
            store = self.target(key[0])
            if store is not None and (key[2], key[3]) in store.vecs.get(key[1], {}):
                kept.append(key)
        if kept:
            self.pushed[peer] = kept
        else:
            del self.pushed[peer]
        return len(kept)

    def _admit_push(self, peer: str) -> None:
        if self._held(peer) >= self.limits.max_pending_per_peer:
            raise AveragingError(f"{self.limits.max_pending_per_peer} contributions of this peer are already held")
        if sum(len(q) for q in self.pushed.values()) >= self.limits.max_pending_total:
            for p in list(self.pushed):
                self._held(p)
            if sum(len(q) for q in self.pushed.values()) >= self.limits.max_pending_total:
                raise AveragingError("too many pushed contributions are held: retry later")

    async def _handle(self, stream: Any) -> None:
        """Serve requests on one stream, each bounded by the exchange timeout, until the client ends it or sends
        no next request within `AvgLimits.keepalive_s` (a client keeps streams open: `node.net.streampool`)."""
        try:
            async with self.gate.serve(stream) as peer:
                try:
                    counted = _Counted(stream)
                    while True:
                        with trio.fail_after(self.timeout_s + 5):
                            try:
                                await self._exchange(counted, peer)
                            finally:
                                self._credit(counted)
                        if not await counted.next_request(self.limits.keepalive_s):
                            break  # (a peer banned meanwhile: the gate cancels this loop and resets the stream)
                    await stream.close()
                except (AveragingError, trio.TooSlowError) as exc:
                    self.gate.refuse(peer, type(exc).__name__)
                    try:
                        await write_msg(stream, {"error": str(exc)})
                    except Exception:
                        pass
                    await reset_quietly(stream)
                except NotAuthorizedError:
                    try:
                        await write_msg(stream, {"error": "not authorized"})
                    except Exception:
                        pass
                    await reset_quietly(stream)
        except PeerRefusedError:
            return
        except Exception:  # a misbehaving or vanished peer only loses its own exchange
            await reset_quietly(stream)

    def _credit(self, counted: _Counted) -> None:
        """Add an exchange's bytes to the store of the stage it named (if it got that far), and start counting the
        stream's next request."""
        if counted.store is not None:
            counted.store.wire_bytes += counted.count
            if counted.stored:
                counted.store.pushes_in += 1
                counted.store.push_wire_bytes += counted.count
        counted.count, counted.store, counted.stored = 0, None, False

    async def _exchange(self, stream: Any, peer: Any) -> None:
        """One request: header (bounded), authorization for its stage, then the blob only of a valid push."""
        header, size = await read_msg_header(stream, self.limits.message_limits())
        stage = header.get("stage")
        if isinstance(stage, bool) or not isinstance(stage, int):
            raise AveragingError(f"field 'stage' must be an integer, got {type(stage).__name__}")
        await self.gate.authorize(peer, stage)
        store = self.target(stage)
        if isinstance(stream, _Counted):
            stream.store = store
        if header.get("spec_hash") != self.spec_hash or store is None:
            await write_msg(stream, {"error": f"this peer holds no contributions of stage {stage} of that model"})
            return
        op = header.get("op")
        if op == "push":
            step = msgio.int_field(header, "step", 0, 1 << 40, AveragingError)
            mb = msgio.int_field(header, "mb", 0, 1 << 20, AveragingError)
            attempt = msgio.int_field(header, "attempt", 0, 1 << 20, AveragingError)
            loss = header.get("loss")
            if loss is not None and (isinstance(loss, bool) or not isinstance(loss, int | float)):
                raise AveragingError("field 'loss' must be a number or null")
            covers = header.get("covers")
            losses = header.get("losses")
            if covers is not None:  # a step bundle: checked before its blob is read
                pairs = check_covers(covers if isinstance(covers, list) else [])
                if pairs[0] != (mb, attempt):
                    raise AveragingError(f"a bundle's first pair {list(pairs[0])} is not its mb/attempt {[mb, attempt]}")
                bundle_losses = check_losses(losses, len(pairs))
                claimed = check_claim(header.get("commit"), pairs)
                if store.exchange != "step":
                    raise AveragingError("this stage exchanges one contribution per microbatch (replica_exchange = "
                                         "microbatch): a bundle is refused")
            enc = header.get("enc", "dense")
            if enc != store.codec.tag:
                raise AveragingError(f"contribution encoded as {str(enc)[:40]!r}, this stage averages {store.codec.tag}")
            if size != 4 * store.size:
                raise AveragingError(f"a contribution is {4 * store.size} bytes, this push declares {size}")
            key = peer.pretty()
            self._admit_push(key)
            blob = await msgio.read_exact(stream, size, AveragingError, self.limits.idle_timeout_s)
            vec = bytes_vec(blob, store.size)
            if store.codec.compressed:
                store.codec.check(vec)  # NaN/Inf in a factor: refused and counted, nothing stored
            if covers is not None:
                store.add_bundle(step, pairs, vec, bundle_losses)
                if claimed is not None:
                    store.claim(step, key, claimed)
            else:
                store.add(step, mb, attempt, vec, None if loss is None else float(loss))
            self.pushed.setdefault(key, deque()).append((stage, step, mb, attempt))
            await write_msg(stream, {"ok": True})
            if isinstance(stream, _Counted):
                stream.stored = True
        elif op == "pull":
            if size:
                raise AveragingError(f"a pull carries no blob, this one declares {size} bytes")
            step = msgio.int_field(header, "step", 0, 1 << 40, AveragingError)
            wait_s = header.get("wait_s", 0)
            if isinstance(wait_s, bool) or not isinstance(wait_s, int | float):
                raise AveragingError("field 'wait_s' must be a number")
            await self._answer_pull(stream, store, step, max(0.0, float(wait_s)))
        else:
            raise AveragingError(f"unknown op {str(op)[:32]!r}")

    async def _answer_pull(self, stream: Any, store: ContributionStore, step: int, wait_s: float) -> None:
        with trio.move_on_after(min(wait_s, self.timeout_s)):
            while step not in store.commits:
                await store.changed.wait()
        if step in store.commits:
            items = store.committed(step)
            commit: list[list[int]] | None = sorted([mb, a] for mb, a in store.commits[step].items())
        else:  # no commit here yet: everything we hold for the step (the asker knows which attempts count)
            items = [store.held(step, key) for key in sorted(store.vecs.get(step, {}))]
            commit = None
        blob = b"".join(vec_bytes(h.vec) for h in items)
        answer: dict[str, Any] = {"commit": commit, "have": [[*h.covers[0], h.losses[0]] for h in items],
                                  "enc": store.codec.tag}
        if store.exchange == "step":  # each contribution's pairs and their losses
            answer["covers"] = [[list(p) for p in h.covers] for h in items]
            answer["losses"] = [list(h.losses) for h in items]
        await write_msg(stream, answer, blob)


async def _request(host: Any, addr: str, header: dict[str, Any], blob: bytes, max_blob: int,
                   timeout_s: float, pool: StreamPool | None = None) -> tuple[dict[str, Any], bytes]:
    """One request and its answer, on a stream of `pool` (kept open for the next) or on one of its own."""
    info = parse_peer_addr(addr)

    async def exchange(stream: Any) -> tuple[tuple[dict[str, Any], bytes], bool]:
        await write_msg(stream, header, blob)
        reply, data = await read_msg(stream, max_blob)
        return (reply, data), "error" not in reply  # a refusing server resets the stream

    with trio.fail_after(timeout_s):
        if pool is None:
            reply, data = await request_once(host, info, AVG_PROTOCOL, exchange)
        else:
            reply, data = await pool.request(info, exchange)
    if "error" in reply:
        raise AveragingError(f"peer {info.peer_id.pretty()} refused: {reply['error']}")
    return reply, data


async def push(host: Any, addr: str, spec_hash: str, stage: int, step: int, mb: int, attempt: int,
               vec: torch.Tensor, loss: float | None, timeout_s: float, enc: str = "dense",
               bundle: Held | None = None, claim: dict[int, int] | None = None, pool: StreamPool | None = None) -> None:
    """Give one contribution (in encoding `enc`, the store codec's tag) to a stage peer; `bundle`: a step bundle
    (its first pair is mb, attempt); `claim`: with a bundle, the whole commit of the step (a leading head's);
    `pool`: on a kept stream (a push is idempotent: the same contribution again replaces itself)."""
    header: dict[str, Any] = {"op": "push", "spec_hash": spec_hash, "stage": stage, "step": step, "mb": mb,
                              "attempt": attempt, "loss": loss}
    if bundle is not None:
        header["covers"] = [list(p) for p in bundle.covers]
        header["losses"] = list(bundle.losses)
        if claim is not None:
            header["commit"] = sorted([mb, a] for mb, a in claim.items())
    if enc != "dense":  # dense pushes keep the header they always had
        header["enc"] = enc
    await _request(host, addr, header, vec_bytes(vec), 0, timeout_s, pool)


async def pull(host: Any, addr: str, spec_hash: str, stage: int, step: int, size: int, wait_s: float,
               timeout_s: float, codec: ContributionCodec | None = None, pool: StreamPool | None = None
               ) -> tuple[dict[int, int] | None, list[Held]]:
    """A stage peer's commit of `step` (None if it has none within wait_s) and its contributions of the step
    (the committed ones, or all it holds when it has no commit), each with the pairs it covers.

    With `codec`, an answer in another encoding, with malformed bundle pairs or holding a non-finite compressed
    contribution raises AveragingError (the caller counts it against that peer) and nothing of it is kept."""
    reply, data = await _request(host, addr, {"op": "pull", "spec_hash": spec_hash, "stage": stage, "step": step,
                                              "wait_s": wait_s}, b"", 4 * size * 1024, timeout_s + wait_s, pool)
    commit = None if reply.get("commit") is None else {int(mb): int(a) for mb, a in reply["commit"]}
    if codec is not None and reply.get("enc", "dense") != codec.tag:
        raise AveragingError(f"pull answer encoded as {str(reply.get('enc'))[:40]!r}, this stage averages {codec.tag}")
    have = reply.get("have", [])
    if len(data) != 4 * size * len(have):
        raise AveragingError(f"pull answer holds {len(data)} bytes for {len(have)} vectors of {size}")
    covers, losses = reply.get("covers"), reply.get("losses")
    if covers is not None and (not isinstance(covers, list) or not isinstance(losses, list)
                               or len(covers) != len(have) or len(losses) != len(have)):
        raise AveragingError("pull answer's 'covers' and 'losses' must list one entry per contribution")
    out = []
    for i, (mb, a, loss) in enumerate(have):
        vec = bytes_vec(data[4 * size * i: 4 * size * (i + 1)], size)
        if codec is not None and codec.compressed:
            codec.check(vec)
        if covers is None:
            out.append(Held(((int(mb), int(a)),), vec, (None if loss is None else float(loss),)))
            continue
        pairs = check_covers(covers[i] if isinstance(covers[i], list) else [])
        out.append(Held(pairs, vec, tuple(check_losses(losses[i] if isinstance(losses, list) else None, len(pairs)))))
    return commit, out
