"""Golden per-step losses of tiny configs: the regression gate every change must pass.

Regenerate (only for an intended change of the numbers): `python -m sharding.regression --write`.

The subspace run is chaotic at the 1e-6 level: a last-bit difference between CPU kernel families (AVX2
vs AVX-512 dispatch in ATen and MKL) flips one bf16 rounding of the boundary codec around step 20 and
the losses then drift apart by up to ~0.04 by step 50. So the file holds the base record (`runs`) and,
per kernel family that differs from it, its own record (`cpu_records[<capability>]`, written with
`--write --cpu-record` on such a machine). A machine is checked against its family's record to
GOLDEN_ATOL, and every family record must stay within CROSS_CPU_ATOL of the base, so a new record
cannot hide a change of the model.
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
GOLDEN_ATOL = 5e-4  # tolerance within one CPU kernel family / BLAS build; the same machine reproduces bit-exactly
CROSS_CPU_ATOL = 0.1  # largest per-step gap allowed between a kernel family's record and the base record


def cpu_capability() -> str:
    """The kernel family torch dispatches to on this machine (e.g. "AVX2", "AVX512", "DEFAULT")."""
    import torch

    return str(torch.backends.cpu.get_cpu_capability())


def cpu_vendor() -> str:
    """The CPU vendor of this machine as /proc/cpuinfo names it ("GenuineIntel", "AuthenticAMD"; "" elsewhere)."""
    try:
        with open("/proc/cpuinfo", encoding="ascii", errors="replace") as f:
            for line in f:
                if line.startswith("vendor_id"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return ""


def cpu_record_key() -> str:
    """The key of this machine's golden record: the kernel family, plus "-AMD" on AMD CPUs (the BLAS takes
    other code paths there, so the same family rounds differently)."""
    return cpu_capability() + ("-AMD" if cpu_vendor() == "AuthenticAMD" else "")


def expected_runs(stored: dict[str, Any], key: str) -> dict[str, Any]:
    """The golden runs this machine must reproduce: the record stored under its key (`cpu_record_key`), else
    its kernel family's record, else the base."""
    records = stored.get("cpu_records", {})
    record = records.get(key, records.get(key.split("-")[0]))
    runs: dict[str, Any] = record["runs"] if record is not None else stored["runs"]
    return runs


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
    parser.add_argument("--cpu-record", action="store_true",
                        help="with --write: store this machine's runs as its record only (cpu_record_key)")
    args = parser.parse_args(argv)
    record = run_golden()
    if args.write and args.cpu_record:
        stored = json.loads(GOLDEN_PATH.read_text())
        stored.setdefault("cpu_records", {})[cpu_record_key()] = {"runs": record["runs"]}
        GOLDEN_PATH.write_text(json.dumps(stored, indent=1) + "\n")
    elif args.write:
        GOLDEN_PATH.parent.mkdir(parents=True, exist_ok=True)
        GOLDEN_PATH.write_text(json.dumps(record, indent=1) + "\n")
    for name, run in record["runs"].items():
        print(f"{name}: first {run['losses'][0]:.4f} last {run['losses'][-1]:.4f}")


if __name__ == "__main__":
    main()
