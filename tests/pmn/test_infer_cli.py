"""`pmn infer` end to end, run as a user would, against a real swarm serving paid inference.

One module-scoped swarm: the embedded chain served over JSON-RPC, the contracts deployed, a model proposed,
three node keys registered with stake, three node processes (--rpc-url/--deployment/--model-id/--linger)
trained for two steps and left serving. `pmn node status` is also checked on their data dirs here.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from node.testing.swarm import stop_nodes
from pmn.demo import Demo, DemoConfig
from protocol.accounting import accounting_function_hash
from tests.pmn.conftest import assert_clean_error, assert_clean_errors, run_pmn

pytestmark = [pytest.mark.network, pytest.mark.timeout(420)]

CFG = DemoConfig(steps=2, epoch_length=2, microbatches=2, microbatch_size=2, inference_fee_wei=10**15)
PAID = re.compile(r"paid (\d+) wei for request 0x([0-9a-f]{64}) in tx 0x([0-9a-f]{64})")


@pytest.fixture(scope="module")
def swarm(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    root = tmp_path_factory.mktemp("infer-swarm")
    demo = Demo(CFG, root, None, None)
    try:
        demo.setup_chain()
        demo.propose()
        demo.register_nodes()
        demo.train()
        demo.settle()  # shares exist: the revenue contract accepts fees only once someone holds them
        t = demo.proposal.terms  # a second model, proposed but never trained: it has no holders
        unsettled = demo.client.propose_model(
            demo.researcher, demo.proposal.content_hash(), t.metadata_uri, CFG.stages, accounting_function_hash(),
            t.epoch_length, t.challenge_window_s, demo.proposal.audit_rate_bps, t.inference_fee_wei)
        pw = root / "pw"
        pw.write_text("client password")
        ks = root / "client.json"
        made = run_pmn("wallet", "new", "--keystore", str(ks), "--password-file", str(pw))
        assert made.returncode == 0, made.stderr
        address = made.stdout.split("address ")[1].split()[0]
        demo.client.tx.transact(demo.funder, to=address, value=10**18)
        chain = ["--rpc-url", demo.rpc_url, "--deployment", str(demo.deployment_path)]
        head = demo.nodes[0].ready["addrs"][0]
        outbox = ["--outbox-dir", str(root / "outbox")]  # the client's chain outbox (not the user's ~/.pmn)
        yield {"demo": demo, "address": address, "unsettled": unsettled, "chain": chain, "head": head,
               "outbox_dir": root / "outbox", "keystore": ks, "password": pw,
               "pay": [*chain, *outbox, "--keystore", str(ks), "--password-file", str(pw), "--bootstrap", head]}
    finally:
        stop_nodes(demo.nodes)
        if demo.stop_chain is not None:
            demo.stop_chain()


def _revenue_balance(demo: Demo) -> int:
    return int(demo.w3.eth.get_balance(demo.client.token(demo.model_id).address))


def _infer_args(swarm: dict[str, Any], *args: str, model: int | None = None) -> tuple[str, ...]:
    m = swarm["demo"].model_id if model is None else model
    return ("infer", "--model", str(m), "--max-new-tokens", "8", "--timeout-s", "60", *args)


def _infer(swarm: dict[str, Any], *args: str, model: int | None = None) -> Any:
    return run_pmn(*_infer_args(swarm, *args, model=model))


def test_paid_request_streams_text_and_the_payment_serves_once(swarm: dict[str, Any]) -> None:
    demo: Demo = swarm["demo"]
    before = _revenue_balance(demo)
    proc = _infer(swarm, "def ", *swarm["pay"])
    assert proc.returncode == 0, proc.stderr
    fee, request_hex, tx_hex = PAID.search(proc.stderr).groups()  # type: ignore[union-attr]
    assert int(fee) == CFG.inference_fee_wei
    # the fee is on chain: deposited to the model's revenue contract, for this request, by the client
    assert _revenue_balance(demo) - before == CFG.inference_fee_wei
    payment = demo.client.payment(demo.model_id, bytes.fromhex(tx_hex))
    assert payment is not None and payment.amount_wei == CFG.inference_fee_wei
    assert payment.request_id == bytes.fromhex(request_hex) and payment.payer == swarm["address"]
    # the prompt, then the generated continuation
    out = proc.stdout.rstrip("\n")
    assert out.startswith("def ") and len(out) > len("def ")
    # the same payment again: refused by the head stage, with or without the request id
    replay = _infer(swarm, "def ", *swarm["chain"], "--bootstrap", swarm["head"], "--tx-hash", "0x" + tx_hex,
                    "--request-id", "0x" + request_hex)
    assert_clean_error(replay, "refused", "already served")
    replay = _infer(swarm, "def ", *swarm["chain"], "--bootstrap", swarm["head"], "--tx-hash", "0x" + tx_hex)
    assert_clean_error(replay, "already served")
    assert _revenue_balance(demo) - before == CFG.inference_fee_wei  # nothing more was paid
    # the outbox marked the request used when its first token came: the next run pays for a new one
    proc = _infer(swarm, "def ", *swarm["pay"])
    assert proc.returncode == 0, proc.stderr
    _, second_hex, _ = PAID.search(proc.stderr).groups()  # type: ignore[union-attr]
    assert second_hex != request_hex and "not paid again" not in proc.stderr
    assert _revenue_balance(demo) - before == 2 * CFG.inference_fee_wei


def test_a_payment_no_generation_used_is_reused_not_paid_again(swarm: dict[str, Any]) -> None:
    """An earlier run paid through the outbox, then its generation failed (here: it stopped after paying):
    the next `pmn infer` uses that payment and pays nothing."""
    from pmn.config import HolderConfig
    from pmn.holder_outbox import HolderOutbox
    from pmn.wallet import unlock_keystore

    demo: Demo = swarm["demo"]
    account = unlock_keystore(swarm["keystore"], swarm["password"].read_text())
    cfg = HolderConfig(rpc_url=demo.rpc_url, outbox_dir=str(swarm["outbox_dir"]))
    with HolderOutbox(cfg, demo.client.deployment, account) as outbox:
        earlier = outbox.pay(demo.model_id, CFG.inference_fee_wei)
    before = _revenue_balance(demo)
    proc = _infer(swarm, "def ", *swarm["pay"])
    assert proc.returncode == 0, proc.stderr
    fee, request_hex, tx_hex = PAID.search(proc.stderr).groups()  # type: ignore[union-attr]
    assert (request_hex, tx_hex) == (earlier.request_id.hex(), earlier.tx_hash.hex())
    assert "not paid again" in proc.stderr and int(fee) == CFG.inference_fee_wei
    assert proc.stdout.startswith("def ") and len(proc.stdout.rstrip("\n")) > len("def ")
    assert _revenue_balance(demo) == before  # this run paid nothing


def test_unpaid_and_underpaid_requests_are_refused_by_the_stages(swarm: dict[str, Any]) -> None:
    demo: Demo = swarm["demo"]
    plain = [*swarm["chain"], "--bootstrap", swarm["head"]]
    unpaid = _infer(swarm, "def ", *plain, "--tx-hash", "0x" + os.urandom(32).hex(),
                    "--request-id", "0x" + os.urandom(32).hex())
    assert_clean_error(unpaid, "refused", "not a revenue deposit")
    request_id = os.urandom(32)
    tx = demo.client.deposit_revenue(demo.client_account, demo.model_id, CFG.inference_fee_wei - 1, request_id)
    under = _infer(swarm, "def ", *plain, "--tx-hash", "0x" + tx.hex(), "--request-id", "0x" + request_id.hex())
    assert_clean_error(under, "refused", "below the fee")
    # a real payment presented for another request id
    other = _infer(swarm, "def ", *plain, "--tx-hash", "0x" + tx.hex(), "--request-id", "0x" + os.urandom(32).hex())
    assert_clean_error(other, "refused", "paid for request")


def test_bad_input_fails_before_anything_is_paid(swarm: dict[str, Any], tmp_path: Path) -> None:
    demo: Demo = swarm["demo"]
    before = _revenue_balance(demo)
    wrong = tmp_path / "wrong"
    wrong.write_text("not the password")
    pay = list(swarm["pay"])
    pay[pay.index("--password-file") + 1] = str(wrong)
    peer_id = swarm["head"].rsplit("/p2p/", 1)[1]
    down = [*swarm["pay"][:-1], f"/ip4/127.0.0.1/tcp/9/p2p/{peer_id}"]
    assert_clean_errors([
        (_infer_args(swarm, "def ", *swarm["pay"], model=99), ("unknown model id 99",)),
        (_infer_args(swarm, "def ", *swarm["pay"], model=swarm["unsettled"]), ("no share holders yet",)),
        (_infer_args(swarm, "def ", *swarm["pay"], "--max-new-tokens", "0"), ("--max-new-tokens",)),
        (_infer_args(swarm, "", *swarm["pay"]), ("empty prompt",)),
        # longer than the model's context: the head's free limits answer stops it before the fee is paid
        (_infer_args(swarm, "x" * 4096, *swarm["pay"]), ("shorten it", "nothing was paid")),
        (_infer_args(swarm, "def ", *swarm["chain"], "--bootstrap", "/ip4/127.0.0.1/tcp/1"), ("--bootstrap",)),
        (_infer_args(swarm, "def ", *swarm["chain"], "--bootstrap", swarm["head"], "--tx-hash", "0x12"),
         ("--tx-hash",)),
        (_infer_args(swarm, "def ", *pay), ("wrong password",)),
        # a stage peer that is not running: nothing is paid
        (_infer_args(swarm, "def ", *down, "--timeout-s", "10"), ("cannot reach", "nothing was paid")),
    ])
    assert _revenue_balance(demo) == before


def test_node_status_on_the_swarm_data_dirs(swarm: dict[str, Any]) -> None:
    """Compute credited by `pmn node status` equals what the attesters credit each node from all stores."""
    from protocol.epoch import EpochContext, build_epoch
    from protocol.receipts import StaticKeyRegistry

    demo: Demo = swarm["demo"]
    ctx = EpochContext(demo.model_id, 0, demo.proposal.model, tuple(demo.specs), demo.domain)
    totals = build_epoch(demo.gather(0), ctx, StaticKeyRegistry([i.address for i in demo.identities])).totals
    for n, ident in zip(demo.nodes, demo.identities, strict=True):
        proc = run_pmn("node", "status", "--data-dir", str(n.data_dir), "--model", str(demo.root / "model.json"),
                       "--stages", str(CFG.stages), "--json")
        assert proc.returncode == 0, proc.stderr
        report = json.loads(proc.stdout)
        assert report["stage"] == n.stage and report["address"] == ident.address
        assert report["state"] == "serving" and report["steps_recorded"] == CFG.steps
        assert report["peers"] >= 1 and report["tokens_per_s"] > 0
        assert report["credited_units"] == totals[ident.address] > 0
        assert report["credited_microbatches"] == CFG.steps * CFG.microbatches
        assert report["pending_units"] == 0 and report["receipts_pending"] == 0
