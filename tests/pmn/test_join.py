"""`pmn node join`: an operator puts a fresh node on chain for the model the auto rule picks (node key
registered with stake, stage assigned), a second run changes nothing, and what cannot be joined is refused in
one line (embedded py-evm served over HTTP; the real `pmn` process)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from contracts.chain import disconnect
from pmn.demo import Demo, DemoConfig
from pmn.wallet import create_keystore
from tests.pmn.conftest import assert_clean_error, run_pmn

pytestmark = [pytest.mark.timeout(300)]

SMALL = DemoConfig(stages=2, steps=2, epoch_length=2, microbatches=2, microbatch_size=2, inference_requests=0,
                   validators=2, quorum=2)
PASSWORD = "correct horse"


def test_join_registers_the_node_and_assigns_the_chosen_stage_once(tmp_path: Path) -> None:
    demo = Demo(SMALL, tmp_path / "demo", None, None)
    (tmp_path / "demo").mkdir()
    try:
        demo.setup_chain()
        demo.propose()
        client = demo.client
        keystore = tmp_path / "operator.json"
        operator = create_keystore(keystore, PASSWORD).address
        client.tx.transact(demo.funder, to=operator, value=10**18)  # stake and gas
        (tmp_path / "pw").write_text(PASSWORD)
        chain = ["--rpc-url", demo.rpc_url, "--deployment", str(demo.deployment_path), "--keystore", str(keystore),
                 "--password-file", str(tmp_path / "pw")]
        data_dir = tmp_path / "node"

        out = run_pmn("node", "join", "--model", "auto", "--data-dir", str(data_dir), "--json", *chain)
        assert out.returncode == 0, out.stderr
        first = json.loads(out.stdout.strip().splitlines()[-1])
        assert (first["model_id"], first["registered"], first["assigned"]) == (demo.model_id, True, True)
        node = first["node_key"]
        info = client.node_info(node)
        assert (info.status, info.operator) == ("Active", operator)
        assert info.stake_wei >= client.stake_required(1) + client.stake_per_stage()
        assert client.stage_of(demo.model_id, node) == first["stage"] == 0  # nobody serves a stage yet: stage 0
        assert f"--model {demo.model_id} --stage 0" in first["start"]

        again = run_pmn("node", "join", "--model", str(demo.model_id), "--data-dir", str(data_dir), *chain)
        assert again.returncode == 0, again.stderr
        assert "already registered" in again.stdout and "already assigned" in again.stdout
        assert client.node_info(node).stake_wei == info.stake_wei  # nothing paid twice

        other = run_pmn("node", "join", "--model", str(demo.model_id), "--stage", "1", "--data-dir", str(data_dir),
                        *chain)
        assert_clean_error(other, "already serves stage 0", node)
        assert client.stage_of(demo.model_id, node) == 0
        missing = run_pmn("node", "join", "--model", "9", "--data-dir", str(data_dir), *chain)
        assert_clean_error(missing, "model 9 does not exist")
        bad_stage = run_pmn("node", "join", "--model", str(demo.model_id), "--stage", "5",
                            "--data-dir", str(tmp_path / "node2"), *chain)
        assert_clean_error(bad_stage, "--stage 5", "stages 0..1")
        assert not (tmp_path / "node2" / "node_key.hex").exists()  # refused before any key or stake
    finally:
        if demo.stop_chain is not None:
            demo.stop_chain()
        if hasattr(demo, "w3"):
            disconnect(demo.w3)
