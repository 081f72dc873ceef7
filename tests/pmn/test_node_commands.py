"""Bad input to the commands not covered elsewhere (operator, tooling, simulations, usage errors), run as a
user would: one line on stderr, non-zero exit, no traceback. `pmn infer` errors are in test_infer_cli.py,
`pmn node status` errors in test_node_status.py, wallet errors in test_wallet.py, chain commands with
the RPC down in test_demo.py."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.pmn.conftest import assert_clean_errors

pytestmark = [pytest.mark.network, pytest.mark.timeout(240)]


def test_operator_errors(tmp_path: Path) -> None:
    n = str(tmp_path / "n")
    bad_stages, bad_schedule, onchain = tmp_path / "stages.toml", tmp_path / "schedule.toml", tmp_path / "op.toml"
    bad_stages.write_text("[training]\nstages = 0\n")
    bad_schedule.write_text('[training]\nschedule = "linear"\n')
    onchain.write_text('rpc_url = "http://127.0.0.1:9"\n')
    assert_clean_errors([
        (("node", "status", "--data-dir", str(tmp_path / "none")), ("no node data",)),
        (("infer", "--model", "1", "hello"), ("--bootstrap",)),
        (("node", "start", "--data-dir", n, "--stage", "7"), ("stage 7",)),
        (("node", "start", "--data-dir", n, "--model", "no-such-model"), ("no-such-model",)),
        (("node", "start", "--data-dir", n, "--model", str(bad_stages)), ("stages",)),
        (("node", "start", "--data-dir", n, "--model", str(bad_schedule)), ("schedule",)),
        (("node", "start", "--config", str(onchain), "--data-dir", n), ("model_id",)),
        (("node", "start", "--config", str(tmp_path / "missing.toml")), ("does not exist",)),
        (("swarm", "--stages", "0"), ("--stages",)),
    ])
    assert not (tmp_path / "n" / "receipts.sqlite").exists()


def test_tooling_and_usage_errors(tmp_path: Path) -> None:
    out = str(tmp_path / "deployment.json")
    assert_clean_errors([
        (("contracts", "deploy", "--out", out, "--quorum", "2"), ("--quorum",)),
        (("contracts", "deploy", "--out", out, "--validator", "0x12"), ("--validator",)),
        (("contracts", "deploy", "--out", out), ("--rpc-url",)),
        (("contracts", "build", "--frob"), ("unrecognized arguments: --frob",)),
        (("simulate", "wan", "--preset", "nope"), ("nope",)),
        (("simulate", "incentives", "--frob"), ("--frob",)),
        (("ledger", "verify", "--model", "1", "--epoch", "0"), ("--receipts",)),
        (("shares", "--model", "x"), ("invalid int value", "pmn shares --help")),
        (("node", "frob"), ("invalid choice",)),
        (("demo", "--config", str(tmp_path / "missing.toml")), ("does not exist",)),
        ((), ("COMMAND",)),
    ])
    assert not Path(out).exists()


def test_node_start_builds_the_node_config_once(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """`pmn node start` builds a NodeConfig from operator config < flags and starts the node with it
    (the node itself is tested in tests/node)."""
    import node.cli
    from node.config import NodeConfig
    from pmn.cli import main

    seen: list[NodeConfig] = []

    def fake_start(cfg: NodeConfig) -> int:
        seen.append(cfg)
        return 0

    monkeypatch.setattr(node.cli, "start", fake_start)
    monkeypatch.setenv("PMN_CAPACITY", "2")
    assert main(["node", "start", "--data-dir", str(tmp_path / "n"), "--model", "tiny", "--replicated",
                 "--no-dht", "--steps", "7"]) == 0
    assert main(["node", "start", "--data-dir", str(tmp_path / "n"), "--model", "tiny", "--capacity", "4"]) == 0
    with_flags, without = seen
    assert with_flags.replicas.enabled and not with_flags.discovery.dht.enabled and with_flags.runtime.steps == 7
    assert not without.replicas.enabled and without.discovery.dht.enabled
    assert without.runtime.steps == NodeConfig().runtime.steps
    assert with_flags.data_dir == str(tmp_path / "n")
    assert with_flags.num_stages == 3  # the operator config's default, not NodeConfig's
    assert (with_flags.capacity, without.capacity) == (2, 4)  # PMN_CAPACITY, then the flag over it
