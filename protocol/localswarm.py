"""An in-process pipeline whose every hop is signed, countersigned and stored, with injectable cheaters.

Used by the audit benchmark and the settlement tests. Each stage is a real `sharding` stage trained
with its own optimiser; each boundary crossing goes through the wire codec, and each hop produces an
EIP-712 receipt signed by the sender, checked and countersigned by the receiver, and stored in both
nodes' sqlite stores. Cheating is injected into the stage code itself: a node can send random
activations for a fraction of its forward hops, and a node can inflate its self-reported work by
fabricating receipts no neighbour countersigned (the same two cheats as node processes over libp2p:
`node.testing.adversary`, caught by the network attester in `node.services.audit`).
It also keeps what an attester fetches for a spot check: each stage's parameters at each step and each
hop's payload and input.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from pathlib import Path

import torch
from eth_account.signers.local import LocalAccount

from protocol.errors import ProtocolError
from protocol.receipts import (
    BACKWARD,
    FORWARD,
    Domain,
    KeyRegistry,
    Receipt,
    SignedReceipt,
    countersign,
    payload_digest,
    sign_receipt,
)
from protocol.spotcheck import (
    HopInput,
    SpotCheckConfig,
    SpotCheckResult,
    check_hop,
    sample_hops,
    window_bytes,
)
from protocol.store import ReceiptStore, StoreConfig
from sharding.codecs import get_codec
from sharding.config import ModelConfig
from sharding.data import Corpus, load_corpus
from sharding.partition import partition
from sharding.stage import build_stage
from sharding.stagespec import StageSpec
from sharding.train import OptimConfig, make_optimizer, optimizer_step


@dataclass
class Behaviour:
    """How one node deviates from the protocol (the default is honest)."""

    random_fraction: float = 0.0  # fraction of its forward hops whose activation is replaced by noise
    inflate: int = 1  # self-reported work multiplier: fabricates inflate-1 uncountersigned receipts per hop sent
    seed: int = 0  # RNG seed of the cheating choices


@dataclass
class LocalSwarmConfig:
    """The in-process swarm's model, schedule and model id."""

    model: ModelConfig  # architecture
    num_stages: int = 3  # pipeline depth (one node per stage)
    codec: str = "dense"  # boundary codec name
    microbatches: int = 2  # microbatches per optimizer step
    microbatch_size: int = 2  # sequences per microbatch
    epoch_length: int = 2  # optimizer steps per accounting epoch (epoch = step // epoch_length)
    model_id: int = 1  # on-chain model id written into receipts
    corpus: str = "synthetic"  # sharding.load_corpus source
    optim: OptimConfig = field(default_factory=OptimConfig)  # per-stage optimiser settings


@dataclass(frozen=True)
class _HopData:
    payload: bytes  # bytes sent
    window: torch.Tensor  # (B, T+1) token window
    input_payload: bytes | None  # activation the sender received (None at the head)


class LocalSwarm:
    """One node per stage in this process; see the module docstring."""

    def __init__(self, config: LocalSwarmConfig, keys: list[LocalAccount], domain: Domain, registry: KeyRegistry,
                 data_dir: Path, behaviours: dict[int, Behaviour] | None = None,
                 corpus: Corpus | None = None) -> None:
        if len(keys) != config.num_stages:
            raise ValueError(f"keys: need one key per stage ({config.num_stages}), got {len(keys)}")
        if config.epoch_length < 1:
            raise ValueError("LocalSwarmConfig.epoch_length must be >= 1 (optimizer steps per epoch)")
        self.config = config
        self.keys = keys
        self.domain = domain
        self.specs: list[StageSpec] = partition(config.model, config.num_stages)
        self.codec = get_codec(config.codec, config.model)
        self.corpus = corpus or load_corpus(config.corpus)
        self.modules = [build_stage(config.model, s) for s in self.specs]
        self.optimizers = [make_optimizer(m, config.optim) for m in self.modules]
        self.stores = [
            ReceiptStore(StoreConfig(Path(data_dir) / f"node{k}"), domain, registry) for k in range(config.num_stages)
        ]
        self.behaviours = behaviours or {}
        self._rng = {k: random.Random(b.seed) for k, b in self.behaviours.items()}
        self.states: dict[tuple[int, int], dict[str, torch.Tensor]] = {}  # (stage, step) -> params at that step
        self.hops: dict[tuple[int, ...], _HopData] = {}
        self.bad_hops: set[tuple[int, ...]] = set()  # keys of hops whose payload was faked
        self.self_reported: dict[str, int] = {k.address: 0 for k in keys}  # receipts each node claims to have sent
        self.refused = 0  # hops the receiver refused to countersign
        self.losses: list[float] = []

    def close(self) -> None:
        """Close the stores."""
        for s in self.stores:
            s.close()

    @property
    def tokens_per_hop(self) -> int:
        """Tokens a hop carries: microbatch_size * seq_len."""
        return self.config.microbatch_size * self.config.model.seq_len

    def _hop(self, step: int, mb: int, stage: int, direction: int, payload: bytes, window: torch.Tensor,
             input_payload: bytes | None) -> None:
        """Sender signs, receiver checks and countersigns, both store; the inflating sender adds fabrications."""
        cfg = self.config
        to = stage + 1 if direction == FORWARD else stage - 1
        wb = window_bytes(window, cfg.model) if direction == FORWARD else b""
        receipt = Receipt(cfg.model_id, step // cfg.epoch_length, step, mb, stage, direction,
                          self.keys[stage].address, self.keys[to].address, payload_digest(payload, wb),
                          self.tokens_per_hop)
        signed = sign_receipt(receipt, self.domain, self.keys[stage])
        self.hops[receipt.key] = _HopData(payload, window, input_payload)
        self.self_reported[receipt.sender] += 1
        try:
            # the receiver checks the token count against the frame it actually got before countersigning
            if receipt.tokens != window[:, :-1].numel():
                raise ProtocolError(f"tokens {receipt.tokens} != {window[:, :-1].numel()} received")
            cosigned = countersign(signed, self.keys[to])
            self.stores[to].add(cosigned, require_cosigned=True)
            self.stores[stage].add(cosigned, require_cosigned=True)
        except ProtocolError:
            self.refused += 1
        behaviour = self.behaviours.get(stage)
        if behaviour is not None and behaviour.inflate > 1:
            for j in range(1, behaviour.inflate):
                fake = Receipt(cfg.model_id, receipt.epoch, step, mb + j * 100_000, stage, direction,
                               receipt.sender, receipt.receiver, receipt.payload_digest, receipt.tokens)
                self.stores[stage].add(sign_receipt(fake, self.domain, self.keys[stage]))
                self.self_reported[receipt.sender] += 1

    def _cheats(self, stage: int) -> bool:
        b = self.behaviours.get(stage)
        return b is not None and b.random_fraction > 0 and self._rng[stage].random() < b.random_fraction

    def train_step(self, step: int) -> float:
        """One optimizer step over all microbatches; returns the mean tail loss."""
        cfg = self.config
        n = cfg.num_stages
        for k, m in enumerate(self.modules):
            self.states[(k, step)] = {name: t.detach().clone() for name, t in m.state_dict().items()}
        total = 0.0
        for mb in range(cfg.microbatches):
            window = self.corpus.batch("train", step, mb, cfg.microbatch_size, cfg.model.seq_len, cfg.optim.data_seed)
            ids, targets = window[:, :-1], window[:, 1:]
            outs: list[torch.Tensor] = []
            inputs: list[torch.Tensor | None] = [None]
            received: bytes | None = None
            loss = None
            for k in range(n):
                h_in = inputs[k]
                if k == n - 1:
                    loss = self.modules[k](ids, h_in, targets)
                    break
                out = self.modules[k](ids, h_in)
                outs.append(out)
                sent = torch.randn_like(out) if self._cheats(k) else out.detach()
                payload = self.codec.encode_activation(sent, ids)
                self._hop(step, mb, k, FORWARD, payload, window, received)
                if not torch.equal(sent, out.detach()):
                    self.bad_hops.add((cfg.model_id, step // cfg.epoch_length, step, mb, k, FORWARD))
                received = payload
                inputs.append(self.codec.decode_activation(payload, ids).requires_grad_(True))
            assert loss is not None
            (loss / cfg.microbatches).backward()
            total += float(loss.detach())
            for k in range(n - 1, 0, -1):
                h_in = inputs[k]
                assert h_in is not None and h_in.grad is not None
                grad_payload = self.codec.encode_gradient(h_in.grad, ids)
                fwd_in = self.hops[(cfg.model_id, step // cfg.epoch_length, step, mb, k - 1, FORWARD)].payload
                self._hop(step, mb, k, BACKWARD, grad_payload, window, fwd_in)
                outs[k - 1].backward(self.codec.decode_gradient(grad_payload, ids))
        for m, opt in zip(self.modules, self.optimizers, strict=True):
            optimizer_step(m, opt, step, cfg.optim)
        self.losses.append(total / cfg.microbatches)
        return self.losses[-1]

    def train_epoch(self, epoch: int) -> None:
        """Train every step of `epoch`."""
        for step in range(epoch * self.config.epoch_length, (epoch + 1) * self.config.epoch_length):
            self.train_step(step)

    def gathered(self, epoch: int) -> list[SignedReceipt]:
        """What an attester collects: every receipt of `epoch` in every node's store (duplicates included)."""
        return [s for store in self.stores for s in store.epoch_receipts(self.config.model_id, epoch)]

    def hop_input(self, signed: SignedReceipt) -> HopInput:
        """What an attester fetches to re-execute a hop: payload, window, input and the stage's state."""
        r = signed.receipt
        data = self.hops[r.key]
        return HopInput(signed, data.payload, data.window, self.states[(r.stage, r.step)], data.input_payload)

    def checkable(self, signed: SignedReceipt) -> bool:
        """Hops a spot check re-executes: forward hops of non-tail stages and the tail's backward hop."""
        r = signed.receipt
        tail = self.config.num_stages - 1
        return (r.direction == FORWARD and r.stage < tail) or (r.direction == BACKWARD and r.stage == tail)

    def check(self, signed: SignedReceipt, check: SpotCheckConfig) -> SpotCheckResult:
        """Re-execute one hop deterministically and compare."""
        spec = self.specs[signed.receipt.stage]
        return check_hop(self.config.model, spec, self.config.codec, self.hop_input(signed), check,
                         grad_scale=1.0 / self.config.microbatches)

    def audit(self, receipts: list[SignedReceipt], check: SpotCheckConfig) -> list[SpotCheckResult]:
        """Sample co-signed hops at the audit rate and re-execute the checkable ones."""
        unique = {s.receipt.key: s for s in receipts if s.cosigned}
        sampled = sample_hops([unique[k] for k in sorted(unique)], check)
        return [self.check(s, check) for s in sampled if self.checkable(s)]
