"""`pmn node status` on a data dir whose receipt store holds real EIP-712 receipts written through protocol.store.

The end-to-end check against a data dir produced by a real swarm is in test_infer_cli.py (it shares that swarm).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from eth_account import Account

from node.observability.status import append_progress, write_status
from protocol.accounting import compute_units
from protocol.receipts import BACKWARD, FORWARD, Domain, Receipt, StaticKeyRegistry, countersign, sign_receipt
from protocol.store import ReceiptStore, StoreConfig
from sharding.config import PRESETS
from sharding.partition import partition
from tests.pmn.conftest import assert_clean_error, run_pmn

pytestmark = [pytest.mark.timeout(120)]

MODEL = "tiny-subspace"
KEYS = [Account.from_key(bytes([i + 1]) * 32) for i in range(3)]  # stage 0, 1, 2
DOMAIN = Domain(31337, "0x" + "ab" * 20)
TOKENS = 8


def _hop(model_id: int, epoch: int, step: int, mb: int, stage: int, direction: int, tokens: int = TOKENS,
         cosigned: bool = True):
    to = stage + 1 if direction == FORWARD else stage - 1
    r = Receipt(model_id, epoch, step, mb, stage, direction, KEYS[stage].address, KEYS[to].address,
                os.urandom(32), tokens)
    signed = sign_receipt(r, DOMAIN, KEYS[stage])
    return countersign(signed, KEYS[to]) if cosigned else signed


def _middle_node(data_dir: Path) -> None:
    """Stage 1 of 3: steps 0 and 1 fully co-signed (one hop of step 1 carries fewer tokens); step 2 has a hop
    not yet co-signed, step 3 is missing its backward hop in."""
    registry = StaticKeyRegistry([k.address for k in KEYS])
    hops = [(0, FORWARD), (1, BACKWARD), (1, FORWARD), (2, BACKWARD)]  # every hop naming stage 1
    with ReceiptStore(StoreConfig(data_dir=data_dir), DOMAIN, registry) as store:
        for step in (0, 1):
            for stage, d in hops:
                tokens = 6 if (step, stage, d) == (1, 2, BACKWARD) else TOKENS
                store.add(_hop(1, step // 2, step, 0, stage, d, tokens))
        for stage, d in hops:  # step 2: the forward hop out is still waiting for its countersignature
            store.add(_hop(1, 1, 2, 0, stage, d, cosigned=(stage, d) != (1, FORWARD)))
        for stage, d in hops[:3]:  # step 3: the backward hop in never arrived
            store.add(_hop(1, 1, 3, 0, stage, d))
    write_status(data_dir, {"state": "serving", "stage": 1, "peer_id": "12D3KooWTest", "address": KEYS[1].address,
                            "step": 3, "loss": 4.5, "tokens_per_s": 120.0, "peers": 2})
    for step, secs in ((0, 1.0), (1, 3.0)):
        append_progress(data_dir, {"step": step, "stage": 1, "loss": None, "tokens": 16, "seconds": secs,
                                   "tokens_per_s": 16 / secs})


def test_status_reports_credited_and_pending_compute(tmp_path: Path) -> None:
    _middle_node(tmp_path)
    config = PRESETS[MODEL]
    spec = partition(config, 3)[1]
    proc = run_pmn("node", "status", "--data-dir", str(tmp_path), "--model", MODEL, "--stages", "3", "--json")
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    assert report["stage"] == 1 and report["peers"] == 2 and report["address"] == KEYS[1].address
    assert report["tokens_per_s"] == 120.0
    assert report["tokens_per_s_mean"] == pytest.approx(32 / 4.0)
    assert report["steps_recorded"] == 2
    # steps 0 and 1 are credited, step 1 for the smallest token count among its hops
    assert report["credited_microbatches"] == 2
    assert report["credited_units"] == compute_units(config, spec, TOKENS) + compute_units(config, spec, 6)
    # steps 2 and 3 are pending: one hop not co-signed, one hop missing
    assert report["pending_microbatches"] == 2
    assert report["pending_units"] == 2 * compute_units(config, spec, TOKENS)
    assert report["receipts_cosigned"] == 4 + 4 + 3 + 3 and report["receipts_pending"] == 1
    assert report["receipts_invalid"] == 0
    assert [(e["epoch"], e["credited_microbatches"], e["pending_microbatches"]) for e in report["epochs"]] == \
        [(0, 2, 0), (1, 0, 2)]
    text = run_pmn("node", "status", "--data-dir", str(tmp_path), "--model", MODEL, "--stages", "3")
    assert text.returncode == 0, text.stderr
    assert f"{report['credited_units']} units" in text.stdout.replace("\n", " ")
    assert "compute pending" in text.stdout


def test_status_of_an_idle_node_and_bad_input(tmp_path: Path) -> None:
    idle = tmp_path / "idle"
    idle.mkdir()
    proc = run_pmn("node", "status", "--data-dir", str(idle), "--json")
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout)
    assert report["state"] == "never started" and report["credited_units"] == 0 and report["pending_units"] == 0
    assert not (idle / "node_key.hex").exists()  # status never creates a key
    node = tmp_path / "node"
    _middle_node(node)
    before = (node / "receipts.sqlite").read_bytes()
    assert_clean_error(run_pmn("node", "status", "--data-dir", str(node), "--model", MODEL, "--stages", "2"),
                       "--stages")
    assert_clean_error(run_pmn("node", "status", "--data-dir", str(node), "--model", "no-such-model"),
                       "no-such-model")
    assert_clean_error(run_pmn("node", "status", "--data-dir", str(node), "--stages", "0"), "--stages")
    assert (node / "receipts.sqlite").read_bytes() == before
