"""What the status page shows, as one JSON-ready dict built from what nodes already record.

A node's part comes from its data directory (`status.json`, `progress.jsonl`, `receipts.sqlite`), so
the same code serves one node's own page and the demo's page of every stage. On-chain figures
(terms, shares, claimable revenue) are passed in by whoever holds a chain connection.

Shape of a page snapshot (every key always present; unknown values are null):

    {"title", "time", "model": {"name", "spec_hash", "model_id", "stages", "params", "terms": {...} | null},
     "nodes": [{"stage", "peer_id", "address", "state", "step", "steps_total", "loss", "val_loss", "tokens_per_s",
                "peers", "receipts_cosigned", "receipts_pending", "compute_units", "shares", "fraction",
                "claimable_wei", "reachability"}],
     "stages": [{"stage", "peers": [peer ids], "tokens_per_s", "reachability"}],
     "series": [{"stage", "step": [...], "time": [...], "loss": [...], "val_loss": [...], "tokens_per_s": [...]}]}
"""

from __future__ import annotations

import json
import sqlite3
import time
from collections.abc import Iterable
from contextlib import closing
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from node.observability.status import PROGRESS_FILE, node_status

RECEIPTS_FILE = "receipts.sqlite"  # protocol.store.StoreConfig.filename


@dataclass(frozen=True)
class SnapshotLimits:
    """Bounds on what one snapshot carries."""

    history: int = 2000  # most recent steps per stage in the curves
    sqlite_timeout_s: float = 1.0  # wait for a writer's lock on the receipt store before showing the last counts


def _tail_lines(path: Path, n: int) -> list[str]:
    """The last `n` lines of a text file, reading only its end (progress files grow with every step)."""
    if not path.exists():
        return []
    with path.open("rb") as fh:
        fh.seek(0, 2)
        size = fh.tell()
        block, data = 64 * 1024, b""
        while size > 0 and data.count(b"\n") <= n:
            take = min(block, size)
            size -= take
            fh.seek(size)
            data = fh.read(take) + data
    lines = data.decode("utf-8", errors="replace").splitlines()
    if size > 0:
        lines = lines[1:]  # the first line read may be cut
    return [x for x in lines if x.strip()][-n:]


def progress_tail(data_dir: Path, n: int) -> list[dict[str, Any]]:
    """The last `n` step records of a node (a torn last line, still being written, is skipped)."""
    out = []
    for line in _tail_lines(data_dir / PROGRESS_FILE, n):
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(rec, dict):
            out.append(rec)
    return out


def receipt_counts(data_dir: Path, timeout_s: float = 1.0) -> tuple[int, int]:
    """(co-signed, pending) receipts in a node's store; (0, 0) without a store or while it is locked."""
    path = data_dir / RECEIPTS_FILE
    if not path.exists():
        return 0, 0
    try:
        with closing(sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=timeout_s)) as db:
            row = db.execute("SELECT COUNT(receiver_signature), COUNT(*) - COUNT(receiver_signature) "
                             "FROM receipts").fetchone()
    except sqlite3.Error:
        return 0, 0
    return int(row[0]), int(row[1])


def _num(value: Any) -> float | None:
    return float(value) if isinstance(value, int | float) and not isinstance(value, bool) else None


def node_part(data_dir: str | Path, limits: SnapshotLimits = SnapshotLimits(),
              chain: dict[str, Any] | None = None) -> tuple[dict[str, Any], dict[str, Any]]:
    """(node row, its curves) of the node whose data directory is `data_dir`.

    chain: on-chain figures of the node's address (`shares`, `fraction`, `claimable_wei`), and
    `units_per_cosigned` (compute units one co-signed receipt of this stage stands for) when known.
    """
    path = Path(data_dir).expanduser()
    st = node_status(path)
    records = progress_tail(path, limits.history)
    cosigned, pending = receipt_counts(path, limits.sqlite_timeout_s)
    chain = chain or {}
    stage = st.get("stage")
    per = chain.get("units_per_cosigned")
    last = records[-1] if records else {}
    val = [v for v in (_num(r.get("val_loss")) for r in records) if v is not None]
    row = {
        "stage": stage, "peer_id": st.get("peer_id"), "address": st.get("address"), "state": st.get("state"),
        "step": st.get("step", last.get("step")), "steps_total": st.get("steps_total"),
        "loss": _num(st.get("loss")), "val_loss": val[-1] if val else None,  # the latest evaluation's (tail)
        "tokens_per_s": _num(st.get("tokens_per_s", last.get("tokens_per_s"))),
        "peers": st.get("peers"), "receipts_cosigned": cosigned, "receipts_pending": pending,
        "compute_units": int(cosigned * per) if isinstance(per, int | float) else None,
        "shares": chain.get("shares"), "fraction": chain.get("fraction"), "claimable_wei": chain.get("claimable_wei"),
        "reachability": st.get("reachability"),  # filled by the reachability check when a node reports one
    }
    series = {"stage": stage, "step": [r.get("step") for r in records], "time": [r.get("end_time") for r in records],
              "loss": [_num(r.get("loss")) for r in records], "val_loss": [_num(r.get("val_loss")) for r in records],
              "tokens_per_s": [_num(r.get("tokens_per_s")) for r in records]}
    return row, series


def stage_map(nodes: Iterable[dict[str, Any]], stages: int,
              announced: Iterable[tuple[int, str, float]] = ()) -> list[dict[str, Any]]:
    """One row per stage: the peers serving it (rows of `nodes` plus `(stage, peer_id, tokens_per_s)` heard
    from discovery) and their summed throughput (None while none reported one)."""
    out: list[dict[str, Any]] = [{"stage": s, "peers": [], "tokens_per_s": None, "reachability": None}
                                 for s in range(stages)]
    seen: set[str] = set()
    rows = [(n.get("stage"), n.get("peer_id"), n.get("tokens_per_s")) for n in nodes]
    for stage, peer, tok_s in [*rows, *announced]:
        if not isinstance(stage, int) or not 0 <= stage < stages or not peer or peer in seen:
            continue
        seen.add(peer)
        out[stage]["peers"].append(peer)
        if tok_s:  # 0 = not reported (an announcement carries throughput only in replicated mode)
            out[stage]["tokens_per_s"] = (out[stage]["tokens_per_s"] or 0.0) + float(tok_s)
    return out


def page(title: str, model: dict[str, Any], parts: list[tuple[dict[str, Any], dict[str, Any]]],
         announced: Iterable[tuple[int, str, float]] = ()) -> dict[str, Any]:
    """The whole snapshot: model facts, node rows, the stage map and the curves of every node."""
    nodes = [p[0] for p in parts]
    stages = int(model.get("stages") or 0) or 1 + max((n["stage"] for n in nodes if isinstance(n["stage"], int)),
                                                      default=0)
    base = {"name": None, "spec_hash": None, "model_id": None, "stages": stages, "params": None, "terms": None}
    return {"title": title, "time": time.time(), "model": {**base, **model}, "nodes": nodes,
            "stages": stage_map(nodes, stages, announced), "series": [p[1] for p in parts]}
