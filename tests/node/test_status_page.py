"""The status page: its snapshot from a node's files, its HTTP routes, and a real browser on a running swarm."""

from __future__ import annotations

import json
import math
import subprocess
import sys
import urllib.request
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from node.config import WebConfig
from node.observability.status import append_progress, write_status
from node.observability.web.snapshot import node_part, page
from node.services.status_page import StatusPageService
from node.testing.swarm import launch_swarm, stop_nodes
from tests.browser import Browser
from tests.ports import free_port_run
from tests.waiting import wait_until


def test_snapshot_reads_status_progress_and_skips_a_torn_line(tmp_path: Path) -> None:
    write_status(tmp_path, {"stage": 1, "peer_id": "12D3KooWX", "address": "0xabc", "state": "running", "step": 4,
                            "loss": 3.5, "tokens_per_s": 120.0})
    for step in range(5):
        append_progress(tmp_path, {"step": step, "loss": 4.0 - step * 0.1, "tokens_per_s": 100.0 + step,
                                    "end_time": 1.0 + step, **({"val_loss": 5.0 - step} if step % 2 else {})})
    with (tmp_path / "progress.jsonl").open("a") as fh:
        fh.write('{"step": 5, "lo')  # a writer caught mid-line
    row, series = node_part(tmp_path, chain={"shares": 10, "fraction": 0.5, "claimable_wei": 7,
                                              "units_per_cosigned": 3})
    assert row["step"] == 4 and row["loss"] == 3.5 and row["shares"] == 10 and row["compute_units"] == 0
    assert series["step"] == [0, 1, 2, 3, 4] and math.isclose(series["loss"][-1], 3.6)
    assert series["val_loss"] == [None, 4.0, None, 2.0, None] and row["val_loss"] == 2.0  # the latest evaluation
    snap = page("t", {"stages": 2}, [(row, series)], announced=[(0, "12D3KooWY", 50.0)])
    assert [s["peers"] for s in snap["stages"]] == [["12D3KooWY"], ["12D3KooWX"]]
    assert snap["stages"][1]["reachability"] is None  # filled once nodes report reachability
    json.dumps(snap)  # the page gets it as JSON


@pytest.mark.network
def test_browser_shows_live_steps_and_loss_of_a_running_swarm(tmp_path: Path) -> None:
    base = free_port_run(2)
    nodes = launch_swarm(tmp_path / "swarm", 2, ["--model", "tiny", "--steps", "400", "--microbatches", "2",
                                                 "--checkpoint-every", "0", "--eval-every", "3", "--eval-batches", "2"],
                         threads=[1, 1], status_base_port=base)
    browser = None
    try:
        url = nodes[1].ready["status_url"]  # the tail stage: it knows the loss
        assert url == f"http://127.0.0.1:{base + 1}/"
        with urllib.request.urlopen(url + "api/status", timeout=10) as r:
            assert json.load(r)["model"]["spec_hash"].startswith("0x")
        browser = Browser(tmp_path / "chromium")
        # its temporary files (the singleton socket) are in a directory of its own, removed on close (below)
        assert any(p.name.startswith("org.chromium.") for p in browser.tmp_dir.iterdir())
        tab = browser.page()
        try:
            tab.open(url)

            def shown_step() -> int | None:
                text = tab.text("#step")
                return int(text) if text and text.isdigit() else None

            first = wait_until(shown_step, 60, "the page to show a step")
            later = wait_until(lambda: (s := shown_step()) is not None and s > first and s, 60,
                               f"the shown step to advance past {first}", detail=shown_step)
            loss = wait_until(lambda: (t := tab.text("#loss")) and t != "–" and t, 30, "a loss value on the page")
            assert 0 < float(loss) < 20
            val = wait_until(lambda: (t := tab.text("#val-loss")) and t != "–" and t, 60,
                             "a validation loss value on the page")
            assert 0 < float(val) < 20
            # the stage map lists both stages' peers and the node table this node's row
            assert nodes[1].ready["peer_id"][:8] in (tab.text("#stages") or "")
            assert wait_until(lambda: tab.eval("document.querySelectorAll('#loss-chart canvas').length"), 30,
                              "the loss chart")
            shot = tab.screenshot(tmp_path / "status-page.png")
            print(f"screenshot: {shot}")
            assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and shot.stat().st_size > 10_000
            assert later > first
        finally:
            tab.close()
    finally:
        if browser is not None:
            browser.close()
        stop_nodes(nodes)
    assert browser is not None and not browser.tmp_dir.exists()


def test_an_off_chain_node_never_loads_web3_and_the_page_finds_a_chain_link() -> None:
    # the node's imports leave web3 out (about a second of every node start); the page finds the link it needs
    code = "import sys, node.daemon; print(sorted(m for m in ('web3', 'protocol.payments') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True)
    assert out.stdout.strip() == "[]"
    from protocol.payments import ChainLink

    fields: dict[str, Any] = dict(client=None, model_id=1, chain_id=1, ledger="0x0", epoch_length=4,
                                  inference_fee_wei=0, spec_hash=b"", keys=None, payments=None)
    link = ChainLink(**fields)
    services: Any = [SimpleNamespace(link="not a chain link"), SimpleNamespace(link=link)]
    assert StatusPageService(WebConfig(port=1), services).link is link
    assert StatusPageService(WebConfig(port=1), services[:1]).link is None
