"""`pmn demo --json` end to end (embedded chain, and anvil), and the holder/researcher commands on anvil."""

from __future__ import annotations

import json
import shlex
from pathlib import Path
from typing import Any

import pytest
from eth_account import Account

from tests.contracts.anvil_support import anvil_process
from tests.pmn.conftest import assert_clean_error, run_pmn

pytestmark = [pytest.mark.network, pytest.mark.timeout(400)]

SHORT = """
steps = 8
epoch_length = 4
microbatches = 2
microbatch_size = 2
inference_requests = 1
audit_rate = 0.2
max_new_tokens = 8
eval_every = 4
eval_batches = 2
"""


def _demo(tmp_path: Path, *extra: str, config: str = "") -> dict[str, Any]:
    cfg = tmp_path / "demo.toml"
    cfg.write_text(SHORT + config)
    proc = run_pmn("demo", "--json", "--config", str(cfg), "--data-dir", str(tmp_path / "run"), *extra, timeout=360)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _check(out: dict[str, Any], left_to_claim: int = 0, replicas: int = 1, epochs: int = 2) -> None:
    """left_to_claim: the stage whose revenue the demo left for the holder's own `pmn claim` (kept runs);
    replicas: node processes per stage; epochs: epochs settled."""
    nodes = out["nodes"]
    assert [n["stage"] for n in nodes] == [s for s in range(3) for _ in range(replicas)]
    assert out["epochs_settled"] == epochs
    for n in nodes:
        assert n["compute_units"] > 0
        assert n["shares"] == n["compute_units"]  # one share per verified compute unit, exactly
        assert n["peer_id"].startswith("12D3KooW") and n["address"].startswith("0x")
    total = sum(n["shares"] for n in nodes)
    for n in nodes:
        assert n["fraction"] == pytest.approx(n["shares"] / total, rel=1e-12)
    assert sum(n["fraction"] for n in nodes) == pytest.approx(1.0, abs=1e-9)
    claimed = sum(n["revenue_claimed_wei"] for n in nodes)
    assert 0 < claimed <= out["revenue_deposited_wei"]
    unclaimed = 0 if not left_to_claim else int(out["revenue_deposited_wei"] * nodes[0]["fraction"])
    if left_to_claim:
        assert nodes[0]["revenue_claimed_wei"] == 0
    assert abs(out["revenue_deposited_wei"] - claimed - unclaimed) <= len(nodes)  # rounding dust only
    assert out["loss_end"] < out["loss_start"]
    # the last evaluation of the validation split (after the last step): the tail's, or the leading head's record of it
    assert 0 < out["val_loss"] < out["loss_start"]
    assert len(out["inference_text"]) > 0
    # attesters re-executed a sample of hops fetched over /pmn/audit/1.0.0; honest nodes pass every one
    assert out["spot_checks"]["checked"] > 0 and out["spot_checks"]["failed"] == 0


def test_demo_json_on_embedded_chain(tmp_path: Path) -> None:
    out = _demo(tmp_path)
    _check(out)
    # the published receipts files are what `pmn ledger verify` recomputes roots from
    for f in out["receipts_files"]:
        assert Path(f).exists() and json.loads(Path(f).read_bytes())


def test_demo_with_replicated_stages_credits_every_replica(tmp_path: Path) -> None:
    # 3 stages x 2 replicas: PowerSGD int4 between replicas, the async schedule, stage-0 work delegated; every
    # replica signs and countersigns its hops, is spot-checked and is minted shares for its verified compute
    # (16 steps: a tail replica's loss is the mean of its own microbatches, one of the step's two, so a short run's
    # start and end are far apart only once the learning rate has warmed up)
    # (one microbatch in flight per sender and downstream replica: every replica gets work, and so is credited)
    out = _demo(tmp_path, "--replicas", "2", "--steps", "16", config="replica_max_inflight = 1\n")
    _check(out, replicas=2, epochs=4)
    assert len({n["address"] for n in out["nodes"]}) == 6


def test_demo_on_anvil_then_holder_commands(tmp_path: Path) -> None:
    with anvil_process() as url:
        out = _demo(tmp_path, "--chain-url", url)
        _check(out, left_to_claim=1)
        # an external chain outlives the demo: its files stay, and the printed holder commands run as printed
        assert out["kept_dir"] == str(tmp_path / "run")
        ran = {}
        for line in out["holder_commands"]:
            argv = shlex.split(line)
            assert argv[0] == "pmn"
            proc = run_pmn(*argv[1:])
            assert proc.returncode == 0, (line, proc.stderr)
            ran[argv[1]] = proc.stdout
        assert {"shares", "claim", "ledger", "models"} <= set(ran)
        assert "claimed" in ran["claim"] and "matches" in ran["ledger"]
        assert int(ran["claim"].split()[1]) > 0  # stage 0's revenue, left for this command
        deployment = str(tmp_path / "run" / "deployment.json")
        model = str(out["model_id"])
        holder = out["nodes"][1]["address"]
        shares = run_pmn("shares", "--model", model, "--holder", holder, "--json", "--rpc-url", url,
                         "--deployment", deployment)
        assert shares.returncode == 0, shares.stderr
        report = json.loads(shares.stdout.strip().splitlines()[-1])
        assert report["balance"] == out["nodes"][1]["shares"]
        assert report["claimed_wei"] == out["nodes"][1]["revenue_claimed_wei"]
        assert [h["epoch"] for h in report["history"]] == [0, 1]  # from the ledger's LeafClaimed events
        assert sum(h["units"] for h in report["history"]) == out["nodes"][1]["compute_units"]
        models = run_pmn("models", "--json", "--rpc-url", url, "--deployment", deployment)
        assert models.returncode == 0 and json.loads(models.stdout)[0]["status"] == "Training"
        for epoch, f in enumerate(out["receipts_files"]):
            ok = run_pmn("ledger", "verify", "--model", model, "--epoch", str(epoch), "--receipts", f,
                         "--rpc-url", url, "--deployment", deployment)
            assert ok.returncode == 0 and "matches" in ok.stdout, ok.stderr
        # the other epoch's file does not verify against this epoch's root
        bad = run_pmn("ledger", "verify", "--model", model, "--epoch", "0", "--receipts", out["receipts_files"][1],
                      "--rpc-url", url, "--deployment", deployment)
        assert_clean_error(bad)
        assert_clean_error(run_pmn("shares", "--model", "99", "--holder", holder, "--rpc-url", url,
                                   "--deployment", deployment), "unknown model id 99")


def test_commands_with_the_rpc_down_or_bad_input(tmp_path: Path) -> None:
    from contracts.chain import connect, test_accounts
    from contracts.deploy import deploy_all

    w3 = connect(None)
    admin = test_accounts(w3)[0]
    dep = tmp_path / "deployment.json"
    deploy_all(w3, admin, [admin.address], 1).save(dep)  # a real deployment file, of a chain now out of reach
    down = "http://127.0.0.1:9"
    env = {"PMN_RPC_RETRIES": "2", "PMN_RPC_BACKOFF_S": "0.01", "PMN_OUTBOX_WAIT_S": "1"}
    keystore = tmp_path / "holder.json"
    keystore.write_text(json.dumps(Account.encrypt(Account.create().key, "x")))
    # a claim is recorded in the holder's outbox and stays queued (a re-run sends it): the error names the chain
    claim = ("claim", "--model", "1", "--keystore", str(keystore), "--outbox-dir", str(tmp_path / "outbox"))
    for args in (("models",), ("shares", "--model", "1", "--holder", "0x" + "11" * 20), claim):
        proc = run_pmn(*args, "--rpc-url", down, "--deployment", str(dep), env={**env, "PMN_PASSWORD": "x"})
        assert_clean_error(proc, down)
    assert_clean_error(proc, "is queued", "re-running `pmn claim --model 1`")
    bad_spec = tmp_path / "spec.toml"
    bad_spec.write_text("[model]\nn_heads = 3\n")
    assert_clean_error(run_pmn("propose", str(bad_spec), "--dry-run"), "n_heads")
    bad_spec.write_text("[model\n")
    assert_clean_error(run_pmn("propose", str(bad_spec), "--dry-run"), "not valid TOML")
    assert_clean_error(run_pmn("demo", "--stages", "2"), "at least 3 stages")
    assert_clean_error(run_pmn("demo", "--replicas", "0"), "--replicas must be >= 1")


def test_summary_fits_100_columns_with_a_loss_chart_and_readable_units() -> None:
    import io

    from rich.console import Console

    from pmn.demo import print_summary

    node = {"peer_id": "12D3KooW" + "x" * 44, "address": "0x" + "ab" * 20, "compute_units": 1_434_451_968,
            "shares": 1_434_451_968, "fraction": 0.4691358024691358, "revenue_claimed_wei": 4_691_358_024_691_358}
    result = {"model_id": 1, "loss_start": 5.484, "loss_end": 2.1, "val_loss": 2.345, "epochs_settled": 2,
              "revenue_deposited_wei": 2 * 10**16, "nodes": [{**node, "stage": s} for s in range(3)],
              "losses": [5.5 - 0.02 * i for i in range(200)], "inference_texts": ["def f(x):\n    return x"],
              "kept_dir": "/tmp/d", "holder_commands": ["pmn shares --model 1 --holder 0xab --rpc-url u --deployment d"]}
    out = io.StringIO()
    print_summary(Console(file=out, width=100, color_system=None), result)
    lines = out.getvalue().splitlines()
    table = [x for x in lines if x.startswith(("│", "┃", "┏", "┡", "└"))]
    assert max(len(x) for x in lines if not x.startswith("  pmn ")) <= 100
    assert sum(1 for x in table if x.startswith("│")) == 3  # one line per node: nothing wrapped
    assert "1.4 G" in out.getvalue() and "46.91 %" in out.getvalue() and "0.004691 ETH" in out.getvalue()
    assert "training loss (tail stage) over 200 steps" in out.getvalue() and "█" in out.getvalue()
    assert "pmn shares --model 1" in out.getvalue()
    assert "loss 5.48 → 2.10 (validation 2.35)" in out.getvalue()
