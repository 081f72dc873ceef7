"""A cheating node, as a process: the normal daemon with one deviation, for audit tests and benchmarks.

`python -m node.testing.adversary --behaviour lazy|inflate [--fraction F] [--seed S] <python -m node.daemon args>`

- `lazy`: for a fraction F of its microbatches the stage sends random activations instead of its
  output (the tail: a random gradient) — work it skipped, signed like real work. Spot checks catch it.
- `inflate`: the node claims 10x its work: for every hop it sent and its neighbour countersigned it
  also stores nine receipts signed by itself alone (as if it had sent ten). Only co-signed hops are
  credited, so it gains nothing.

Nothing else differs from `node.daemon` (same arguments, ready line, receipts, services).
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch
from eth_utils import keccak

from node.context import NodeContext
from protocol.errors import ProtocolError
from protocol.receipts import SignedReceipt, sign_receipt

BEHAVIOURS = ("lazy", "inflate")


@dataclass(frozen=True)
class Cheat:
    """How the node deviates."""

    behaviour: str  # "lazy" (random activations) or "inflate" (claims 10x its work)
    fraction: float = 1.0  # lazy: fraction of microbatches whose output is replaced by noise
    inflate: int = 10  # inflate: work claimed per hop actually done
    seed: int = 0  # seed of which microbatches are faked

    def validate(self) -> Cheat:
        """Raise ValueError naming a bad field."""
        if self.behaviour not in BEHAVIOURS:
            raise ValueError(f"--behaviour {self.behaviour!r}: choose one of {', '.join(BEHAVIOURS)}")
        if not 0.0 < self.fraction <= 1.0:
            raise ValueError(f"--fraction {self.fraction!r}: must be in (0, 1]")
        if self.inflate < 2:
            raise ValueError(f"Cheat.inflate={self.inflate!r}: must be >= 2")
        return self

    def fakes(self, step: int, mb: int) -> bool:
        """Deterministic choice of the microbatches a lazy node fakes."""
        h = keccak(json.dumps([self.seed, step, mb]).encode())
        return int.from_bytes(h[:8], "big") < self.fraction * 2**64


def make_lazy(worker: Any, cheat: Cheat) -> None:
    """Replace the worker's outgoing payload by noise on the chosen microbatches (the graph stays real)."""
    honest_forward: Callable[..., Any] = worker.forward
    honest_backward: Callable[..., Any] = worker.backward
    gen = torch.Generator().manual_seed(cheat.seed)
    shape = (worker.microbatch_size, worker.config.seq_len, worker.config.d_model)

    def forward(step: int, mb: int, window: torch.Tensor, h_in: torch.Tensor | None) -> Any:
        out = honest_forward(step, mb, window, h_in)
        if worker.spec.is_last or not cheat.fakes(step, mb):
            return out
        return worker.codec.encode_activation(torch.randn(shape, generator=gen), window[:, :-1])

    def backward(step: int, mb: int, grad_out: torch.Tensor | None) -> Any:
        ids = worker._stash[(step, mb)].ids if (step, mb) in worker._stash else None
        out = honest_backward(step, mb, grad_out)
        if out is None or not worker.spec.is_last or ids is None or not cheat.fakes(step, mb):
            return out
        return worker.codec.encode_gradient(torch.randn(shape, generator=gen), ids)

    worker.forward = forward
    worker.backward = backward


def make_inflating(receipts: Any, cheat: Cheat) -> None:
    """After each co-signed hop it sent, store `inflate - 1` receipts signed by itself alone."""
    keep: Callable[[SignedReceipt], None] = receipts.on_cosigned
    receipts.claimed = 0  # receipts this node claims to have sent (co-signed and fabricated)

    def inflated(signed: SignedReceipt) -> None:
        keep(signed)
        receipts.claimed += 1
        r = signed.receipt
        if r.sender.lower() != receipts.account.address.lower():
            return
        for j in range(1, cheat.inflate):
            fake = replace(r, microbatch=r.microbatch + j * 100_000)
            try:
                receipts.store.add(sign_receipt(fake, receipts.domain, receipts.account))
                receipts.claimed += 1
            except ProtocolError:
                pass

    receipts.on_cosigned = inflated


class CheatService:
    """The node service that turns the node lazy (inflation is wired on the receipt hook)."""

    def __init__(self, cheat: Cheat) -> None:
        self.cheat = cheat

    async def start(self, ctx: NodeContext) -> None:
        if self.cheat.behaviour == "lazy":
            if ctx.worker is None:
                raise ValueError("--behaviour lazy needs the pipeline runner (a stage worker at start)")
            make_lazy(ctx.worker, self.cheat)
        print(json.dumps({"event": "adversary", "behaviour": self.cheat.behaviour, "fraction": self.cheat.fraction}),
              file=sys.stderr, flush=True)

    def close(self) -> None:
        """Nothing to release."""


def build_parser() -> argparse.ArgumentParser:
    """The adversary's own arguments; everything else goes to node.daemon's parser."""
    p = argparse.ArgumentParser(prog="python -m node.testing.adversary", add_help=False)
    p.add_argument("--behaviour", required=True, choices=BEHAVIOURS, help="lazy or inflate")
    p.add_argument("--fraction", type=float, default=1.0, help="lazy: fraction of microbatches faked")
    p.add_argument("--cheat-seed", type=int, default=0, help="seed of which microbatches are faked")
    return p


def spawn_adversary(stage: int, data_dir: Path, args: list[str], cheat_args: list[str]) -> Any:
    """Start an adversary node process like `node.testing.swarm.spawn_node` (then `node.testing.swarm.await_ready` it)."""
    import subprocess

    from node.testing.swarm import REPO_ROOT, NodeProcess, node_env

    data_dir.mkdir(parents=True, exist_ok=True)
    env = node_env()
    cmd = [sys.executable, "-m", "node.testing.adversary", *cheat_args, "--stage", str(stage), "--data-dir", str(data_dir),
           "--no-progress", *args]
    with (data_dir / "stderr.log").open("ab") as log:
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=log, env=env, cwd=str(REPO_ROOT))
    return NodeProcess(stage=stage, data_dir=data_dir, proc=proc)


def main(argv: list[str] | None = None) -> int:
    """Run the node with the chosen deviation; errors print one JSON line (as node.daemon's), exit code 1."""
    from node.cli import parse_config, report_error
    from node.daemon import run_node
    from node.services.chain_link import services_for

    try:
        mine, rest = build_parser().parse_known_args(argv)
        cheat = Cheat(mine.behaviour, mine.fraction, seed=mine.cheat_seed).validate()
        cfg = parse_config(rest)
        cfg.validate()
        receipts, services = services_for(cfg)
        if cheat.behaviour == "inflate":
            if receipts is None:
                raise ValueError("--behaviour inflate needs --rpc-url (it inflates its stored receipts)")
            make_inflating(receipts, cheat)
        return run_node(cfg, receipts=receipts, services=[*services, CheatService(cheat)])
    except Exception as exc:  # config, chain and node errors: one line, no traceback
        return report_error(exc)


if __name__ == "__main__":
    sys.exit(main())
