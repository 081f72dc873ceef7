"""Golden per-step losses of tiny configs: the regression gate every change must pass.

Regenerate (only for an intended change of the numbers): `python -m sharding.regression --write`.
"""

from __future__ import annotations

import argparse
import json
from dataclasses import asdict
from pathlib import Path
from typing import Any

from .config import PRESETS
from .data import load_corpus
from .pipeline import LocalPipeline
from .train import OptimConfig, train_reference

GOLDEN_PATH = Path(__file__).parent / "golden" / "tiny_50_steps.json"
GOLDEN_STEPS = 50  # optimizer steps per golden run
GOLDEN_CORPUS = "synthetic:0"  # platform-independent corpus (the stdlib differs between Pythons)
GOLDEN_OPTIM = OptimConfig(lr=3e-3, warmup_steps=5, decay_steps=50)
GOLDEN_MICROBATCHES = 2  # microbatches per step
GOLDEN_MICROBATCH_SIZE = 4  # sequences per microbatch
GOLDEN_ATOL = 5e-4  # tolerance for other CPUs / BLAS builds; the same machine reproduces bit-exactly


def run_golden() -> dict[str, Any]:
    """Run both golden configurations and return the record written to GOLDEN_PATH."""
    corpus = load_corpus(GOLDEN_CORPUS)
    dense = train_reference(
        PRESETS["tiny"], GOLDEN_OPTIM, GOLDEN_STEPS, GOLDEN_MICROBATCHES, GOLDEN_MICROBATCH_SIZE, corpus
    )
    pipe = LocalPipeline(PRESETS["tiny-subspace"], 2, "subspace", GOLDEN_OPTIM)
    sub = [pipe.train_step(s, corpus, GOLDEN_MICROBATCHES, GOLDEN_MICROBATCH_SIZE) for s in range(GOLDEN_STEPS)]
    return {
        "corpus": GOLDEN_CORPUS,
        "corpus_manifest_hash": corpus.manifest_hash.hex(),
        "optim": asdict(GOLDEN_OPTIM),
        "microbatches": GOLDEN_MICROBATCHES,
        "microbatch_size": GOLDEN_MICROBATCH_SIZE,
        "runs": {
            "tiny/reference": {"config": PRESETS["tiny"].to_dict(), "losses": dense},
            "tiny-subspace/2-stages/subspace": {
                "config": PRESETS["tiny-subspace"].to_dict(),
                "losses": sub,
            },
        },
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--write", action="store_true", help="overwrite the stored golden file")
    args = parser.parse_args(argv)
    record = run_golden()
    if args.write:
        GOLDEN_PATH.parent.mkdir(parents=True, exist_ok=True)
        GOLDEN_PATH.write_text(json.dumps(record, indent=1) + "\n")
    for name, run in record["runs"].items():
        print(f"{name}: first {run['losses'][0]:.4f} last {run['losses'][-1]:.4f}")


if __name__ == "__main__":
    main()
