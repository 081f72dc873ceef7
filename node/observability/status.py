"""Node status: a JSON file the daemon rewrites after every change, readable by `pmn node status`."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

STATUS_FILE = "status.json"  # current state: peer id, addrs, stage, step, loss, peers, state
PROGRESS_FILE = "progress.jsonl"  # one JSON line per completed step


def write_status(data_dir: str | Path, status: dict[str, Any]) -> None:
    """Atomically replace the status file."""
    path = Path(data_dir).expanduser() / STATUS_FILE
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(status, indent=1, sort_keys=True))
    os.replace(tmp, path)


def append_progress(data_dir: str | Path, record: dict[str, Any]) -> None:
    """Append one step record."""
    with (Path(data_dir).expanduser() / PROGRESS_FILE).open("a") as fh:
        fh.write(json.dumps(record, sort_keys=True) + "\n")


def read_progress(data_dir: str | Path) -> list[dict[str, Any]]:
    """All step records of a node (empty if it never completed a step)."""
    path = Path(data_dir).expanduser() / PROGRESS_FILE
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def node_status(data_dir: str | Path) -> dict[str, Any]:
    """The last status a node wrote in `data_dir` (`{"state": "never started"}` if none)."""
    path = Path(data_dir).expanduser() / STATUS_FILE
    if not path.exists():
        return {"state": "never started", "data_dir": str(Path(data_dir).expanduser())}
    return dict(json.loads(path.read_text()))
