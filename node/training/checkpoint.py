"""Per-stage checkpoints: safetensors (weights + AdamW state) and a manifest with sha256 hashes."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path
from typing import Any

from safetensors.torch import load_file, save_file

from node.errors import CheckpointError
from node.training.stagestate import install_stage_tensors, stage_tensors
from node.training.worker import StageWorker

MANIFEST = "manifest.json"
FORMAT = 1


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def stage_dir(data_dir: str | Path, stage: int) -> Path:
    """Where the checkpoints of `stage` live."""
    return Path(data_dir).expanduser() / "checkpoints" / f"stage{stage}"


def save_checkpoint(worker: StageWorker, data_dir: str | Path, keep: int = 2) -> Path:
    """Save the worker's state after its last completed step; returns the checkpoint directory."""
    root = stage_dir(data_dir, worker.spec.index)
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"step{worker.next_step:08d}"
    tmp = root / f".tmp-step{worker.next_step:08d}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    weights, optim_tensors, param_groups = stage_tensors(worker)
    save_file(weights, str(tmp / "model.safetensors"))
    save_file(optim_tensors, str(tmp / "optim.safetensors"))
    manifest: dict[str, Any] = {
        "format": FORMAT,
        "spec_hash": worker.config.spec_hash().hex(),
        "stage": worker.spec.index,
        "num_stages": worker.spec.num_stages,
        "codec": worker.codec.name,
        "next_step": worker.next_step,
        "param_groups": param_groups,
        "files": {name: _sha256(tmp / name) for name in ("model.safetensors", "optim.safetensors")},
    }
    (tmp / MANIFEST).write_text(json.dumps(manifest, indent=1, sort_keys=True))
    shutil.rmtree(final, ignore_errors=True)
    os.replace(tmp, final)
    (root / "LATEST.tmp").write_text(final.name)
    os.replace(root / "LATEST.tmp", root / "LATEST")
    old = sorted(p for p in root.iterdir() if p.is_dir() and p.name.startswith("step"))
    for p in old[:-keep] if keep > 0 else []:
        shutil.rmtree(p, ignore_errors=True)
    return final


def latest_checkpoint(data_dir: str | Path, stage: int) -> Path | None:
    """The newest checkpoint directory of `stage`, or None."""
    root = stage_dir(data_dir, stage)
    pointer = root / "LATEST"
    if not pointer.exists():
        return None
    path = root / pointer.read_text().strip()
    return path if path.exists() else None


def checkpoint_at(data_dir: str | Path, stage: int, next_step: int) -> Path | None:
    """The checkpoint of `stage` taken when `next_step` was the next step, or None."""
    path = stage_dir(data_dir, stage) / f"step{next_step:08d}"
    return path if (path / MANIFEST).exists() else None


def checkpoint_steps(data_dir: str | Path, stage: int) -> list[int]:
    """The next steps of the complete checkpoints of `stage` held in `data_dir`, ascending."""
    root = stage_dir(data_dir, stage)
    if not root.is_dir():
        return []
    return sorted(int(p.name[4:]) for p in root.iterdir()
                  if p.is_dir() and p.name.startswith("step") and p.name[4:].isdigit() and (p / MANIFEST).exists())


ABANDONED = "abandoned"  # beside a stage's checkpoints: the ones a rollback abandoned, one folder per generation


def _abandoned_key(p: Path) -> tuple[int, int] | None:
    """(generation, n) of an abandoned folder named gen<g> or gen<g>.<n> (n >= 2: abandoned again), else None."""
    gen, _, n = p.name.removeprefix("gen").partition(".")
    if not p.name.startswith("gen") or not gen.isdigit() or (n and not n.isdigit()):
        return None
    return int(gen), int(n or 1)


def abandoned_folders(data_dir: str | Path, stage: int) -> list[Path]:
    """The folders of abandoned checkpoints of `stage`, oldest generation first."""
    base = stage_dir(data_dir, stage) / ABANDONED
    if not base.is_dir():
        return []
    keyed = [(k, p) for p in base.iterdir() if p.is_dir() and (k := _abandoned_key(p)) is not None]
    return [p for _, p in sorted(keyed)]


def abandon_checkpoints_after(data_dir: str | Path, stage: int, next_step: int, gen: int,
                              keep_gens: int = 2) -> list[int]:
    """Move the checkpoints of `stage` taken after `next_step` (a rollback abandons them; they belong to rollback
    generation `gen`) into `abandoned/gen<gen>/` beside them (`gen<gen>.<n>` when that folder exists: a
    restarted node abandons a generation again), keep only the newest `keep_gens` abandoned folders (0 = all),
    and point LATEST at the newest checkpoint left (removed when none is); returns the steps moved. Nothing
    else is deleted: a restore is explicit (`checkpoint_at`)."""
    root = stage_dir(data_dir, stage)
    moved = [s for s in checkpoint_steps(data_dir, stage) if s > next_step]
    if moved:
        base = root / ABANDONED
        dest, n = base / f"gen{gen}", 1
        while dest.exists():
            n += 1
            dest = base / f"gen{gen}.{n}"
        tmp = base / f".tmp-{dest.name}"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        for s in moved:
            os.replace(root / f"step{s:08d}", tmp / f"step{s:08d}")
        os.replace(tmp, dest)
        folders = abandoned_folders(data_dir, stage)
        for p in folders[:-keep_gens] if keep_gens > 0 else []:
            shutil.rmtree(p, ignore_errors=True)
    left = checkpoint_steps(data_dir, stage)
    if left:
        (root / "LATEST.tmp").write_text(f"step{left[-1]:08d}")
        os.replace(root / "LATEST.tmp", root / "LATEST")
    elif (root / "LATEST").exists():
        (root / "LATEST").unlink()
    return moved


def load_checkpoint(worker: StageWorker, path: str | Path) -> int:
    """Restore weights, AdamW state and the step counter; returns the next step. Verifies every hash."""
    path = Path(path)
    try:
        manifest = json.loads((path / MANIFEST).read_text())
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"{path}: unreadable manifest ({exc})") from exc
    want = {"spec_hash": worker.config.spec_hash().hex(), "stage": worker.spec.index,
            "num_stages": worker.spec.num_stages, "codec": worker.codec.name}
    for key, value in want.items():
        if manifest.get(key) != value:
            raise CheckpointError(f"{path}: checkpoint {key}={manifest.get(key)!r}, this node has {value!r}")
    for name, digest in manifest["files"].items():
        if _sha256(path / name) != digest:
            raise CheckpointError(f"{path / name}: sha256 does not match the manifest")
    try:
        install_stage_tensors(worker, load_file(str(path / "model.safetensors")),
                              load_file(str(path / "optim.safetensors")), manifest["param_groups"])
    except (RuntimeError, ValueError, KeyError) as exc:
        raise CheckpointError(f"{path}: state does not fit stage {worker.spec.index}: {exc}") from exc
    worker.next_step = int(manifest["next_step"])
    return worker.next_step
