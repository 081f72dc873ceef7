"""Issue 20 item 4: the chain's RPC endpoint goes away mid-epoch and comes back on the same port, state kept.

A real swarm (three node processes, libp2p on loopback) trains a model registered on a real anvil through
the demo's loop. While the tail stage is in the middle of epoch 0, anvil is stopped (`--state`: it dumps its
chain); it stays down for at least `outage_s` and until the settlement has tried to write a root and kept it
queued, then starts again on the same port with the same chain. The nodes never stop training (their hop
receipts keep going into their stores), the queued root goes out after recovery, and on chain every root,
leaf claim, fee payment and revenue claim is there exactly once, with shares equal to the credited units.

The issue's outage is 60 s; here it is a parameter (OUTAGE_S: 5 s by default, `PMN_OUTAGE_S=60` for the
issue's) because the test shares a 2-core machine: what is checked does not depend on the length, only on the chain being down while
training goes on and while writes are queued.
"""

from __future__ import annotations

import os
import sqlite3
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any

import pytest

from contracts.chain import connect, disconnect
from contracts.client import ProtocolContracts
from contracts.deploy import Deployment
from node.observability.status import read_progress
from pmn.demo import Demo, DemoConfig
from tests.contracts.anvil_support import RestartableAnvil, free_port, restartable_anvil
from tests.pmn.conftest import assert_clean_error, run_pmn
from tests.waiting import wait_until

pytestmark = [pytest.mark.network, pytest.mark.timeout(600)]

# minimum time the RPC stays down: the 60 s, shortened for a shared 2-core machine (PMN_OUTAGE_S=60 for it)
OUTAGE_S = float(os.environ.get("PMN_OUTAGE_S", "5"))
STEPS = int(os.environ.get("PMN_OUTAGE_STEPS", "12"))  # training steps, three epochs (more: training spans the outage)
STOP_AT_STEP = STEPS // 6  # the tail stage's step at which the RPC goes away: the middle of epoch 0
WAIT_S = 400.0  # bound on each wait of the outage driver

CONFIG = DemoConfig(steps=STEPS, epoch_length=STEPS // 3, microbatches=2, microbatch_size=2, inference_requests=1,
                    audit_rate=0.2, max_new_tokens=8, outbox_retry_interval_s=0.2, outbox_max_backoff_s=1.0,
                    outbox_call_timeout_s=2.0, chain_outage_timeout_s=WAIT_S)


def _tail_step(demo: Demo) -> int:
    if len(demo.nodes) < CONFIG.stages:
        return -1
    progress = read_progress(demo.nodes[-1].data_dir)
    return int(progress[-1]["step"]) if progress else -1


def _queued_after_failure(path: Path) -> int:
    """Writes the outbox holds queued after a failed attempt (read-only look at its file)."""
    if not path.exists():
        return 0
    try:
        with sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=1) as db:
            return int(db.execute("SELECT COUNT(*) FROM outbox WHERE state='queued' AND error IS NOT NULL")
                       .fetchone()[0])
    except sqlite3.Error:
        return 0


class Outage(threading.Thread):
    """Stops anvil mid-epoch 0 and starts it again once `outage_s` passed and a write was held back."""

    def __init__(self, demo: Demo, anvil: RestartableAnvil, outage_s: float) -> None:
        super().__init__(daemon=True)
        self.demo, self.anvil, self.outage_s = demo, anvil, outage_s
        self.seen: dict[str, Any] = {}
        self.error: BaseException | None = None
        self.cancel = threading.Event()  # the test ended early: restart now

    def run(self) -> None:
        try:
            wait_until(lambda: self.cancel.is_set() or _tail_step(self.demo) >= STOP_AT_STEP, WAIT_S,
                       f"the tail stage to reach step {STOP_AT_STEP}")
            self.seen["step_at_stop"] = _tail_step(self.demo)
            self.anvil.stop()
            down_at = time.monotonic()
            outbox = self.demo.root / "chain-outbox.sqlite"
            wait_until(lambda: self.cancel.is_set() or (time.monotonic() - down_at >= self.outage_s
                                                        and _queued_after_failure(outbox) > 0),
                       WAIT_S, "a chain write held back by the outage", detail=lambda: _tail_step(self.demo))
            self.seen["step_at_restart"] = _tail_step(self.demo)
            self.seen["queued_at_restart"] = _queued_after_failure(outbox)
            self.seen["down_s"] = time.monotonic() - down_at
        except BaseException as exc:  # re-raised by the test
            self.error = exc
        finally:
            self.anvil.start()


def _events(client: ProtocolContracts, contract: Any, name: str) -> list[Any]:
    ev = getattr(contract.events, name)()
    return list(client.tx.retry(lambda: ev.get_logs(from_block=0)))


@pytest.mark.parametrize("outage_s", [OUTAGE_S])
def test_training_and_settlement_survive_a_chain_outage(tmp_path: Path, outage_s: float) -> None:
    with restartable_anvil(tmp_path / "anvil") as anvil:
        (tmp_path / "run").mkdir()
        demo = Demo(CONFIG, tmp_path / "run", anvil.url, console=None)
        outage = Outage(demo, anvil, outage_s)
        outage.start()
        try:
            out = demo.run()
        except BaseException:
            outage.cancel.set()
            outage.join(timeout=60)
            if outage.error is not None:  # the driver failed first: its error says why
                raise outage.error from None
            raise
        outage.cancel.set()
        outage.join(timeout=60)
        assert not outage.is_alive()
        if outage.error is not None:
            raise outage.error
        seen = outage.seen
        # training went on while the chain was down: the tail stage finished its steps during the outage
        assert seen["step_at_restart"] > seen["step_at_stop"] >= STOP_AT_STEP
        assert seen["step_at_restart"] == CONFIG.steps - 1 and seen["down_s"] >= outage_s
        assert seen["queued_at_restart"] >= 1  # the first root waited in the outbox, on disk
        print(f"outage: down {seen['down_s']:.1f} s, tail step {seen['step_at_stop']} -> {seen['step_at_restart']}, "
              f"{seen['queued_at_restart']} write(s) queued at restart")

        # the demo's own account of it
        assert out["epochs_settled"] == CONFIG.steps // CONFIG.epoch_length
        for n in out["nodes"]:
            assert n["compute_units"] > 0 and n["shares"] == n["compute_units"]

        # on chain, read through a fresh connection: each write exactly once
        deployment = Deployment.load(tmp_path / "run" / "deployment.json")
        w3 = connect(anvil.url)
        try:
            client = ProtocolContracts(w3, deployment)
            mid = out["model_id"]
            roots = _events(client, client.ledger, "EpochRootSubmitted")
            assert Counter((e["args"]["modelId"], e["args"]["epoch"]) for e in roots) == {
                (mid, epoch): 1 for epoch in range(out["epochs_settled"])}
            # every epoch has a root with units; the last ones were trained while the chain was down
            assert all(client.epoch_info(mid, e).total_units > 0 for e in range(out["epochs_settled"]))
            claims = _events(client, client.ledger, "LeafClaimed")
            nodes = [n["address"] for n in out["nodes"]]
            assert Counter((e["args"]["epoch"], e["args"]["node"]) for e in claims) == {
                (epoch, node): 1 for epoch in range(out["epochs_settled"]) for node in nodes}
            token = client.token(mid)
            deposits = _events(client, token, "RevenueDeposited")
            assert len(deposits) == CONFIG.inference_requests
            assert len({bytes(e["args"]["requestId"]) for e in deposits}) == CONFIG.inference_requests
            assert sum(int(e["args"]["amount"]) for e in deposits) == out["revenue_deposited_wei"]
            paid = _events(client, token, "RevenueClaimed")
            assert Counter(e["args"]["account"] for e in paid) == {a: 1 for a in nodes}
            # balances agree with the events: shares = claimed units, revenue paid once, dust only left
            for n in out["nodes"]:
                assert client.balance_of(mid, n["address"]) == n["shares"]
                assert client.claimed(mid, n["address"]) == n["revenue_claimed_wei"] > 0
            total = sum(n["revenue_claimed_wei"] for n in out["nodes"])
            assert 0 <= out["revenue_deposited_wei"] - total <= len(nodes)
            assert client.total_supply(mid) == sum(n["shares"] for n in out["nodes"])
        finally:
            disconnect(w3)


def test_dead_rpc_at_start_is_one_line_naming_the_url(tmp_path: Path) -> None:
    url = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    proc = run_pmn("demo", "--json", "--chain-url", url, "--data-dir", str(tmp_path / "run"), timeout=120)
    assert_clean_error(proc, url, "unavailable after", "Connection refused")
    assert not (tmp_path / "run" / "chain-outbox.sqlite").exists()  # nothing was recorded for a chain never reached
