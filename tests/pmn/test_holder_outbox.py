"""Issue 20 item 4 (the holder's side): `pmn infer`'s fee payment and `pmn claim` go through a durable chain
outbox, against a real anvil stopped and started again on the same port with its chain kept.

`pmn claim` while the RPC is down stops with one line naming the queued claim; once anvil is back, the next
`pmn claim` sends it, and the chain has exactly one RevenueClaimed for the holder, of the whole accrued
revenue. The fee payment of `pmn infer` (pmn/holder_outbox.py `HolderOutbox.pay`, what `pmn infer` runs
before generating) is recorded with its request id before it is sent: while the RPC is down it stays
queued, and the next run pays that same request id, once; a payment whose answer is lost is found on chain,
not sent again; an unused payment is reused, a used one is not.
"""

from __future__ import annotations

import json
import os
import sqlite3
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
from eth_account import Account
from eth_account.signers.local import LocalAccount

from pmn.config import HolderConfig
from pmn.holder_outbox import HolderOutbox, OutboxQueuedError, OutboxRefusal
from tests.contracts.anvil_support import FlakyProxy, RestartableAnvil
from tests.contracts.conftest import Env
from tests.pmn.conftest import assert_clean_error, run_pmn

pytestmark = [pytest.mark.network, pytest.mark.timeout(300)]

FEE = 10**12  # the fee of the models Env.propose registers
WAIT_S = 3.0  # outbox_wait_s of the commands here: how long one command waits for a chain that is down
OUTBOX = {"outbox_wait_s": WAIT_S, "outbox_retry_interval_s": 0.1, "outbox_max_backoff_s": 0.5,
          "outbox_call_timeout_s": 1.0}


def _model_with_holder(env: Env) -> tuple[int, LocalAccount]:
    """A model whose only share holder is operators[0] (shares exist: the model takes fees)."""
    model_id = env.propose()
    holder = env.operators[0]
    env.settle_and_claim(model_id, 0, {env.new_node(holder).address: 9})
    return model_id, holder


def _events(env: Env, model_id: int, name: str) -> list[Any]:
    ev = getattr(env.pc.token(model_id).events, name)()
    return list(env.pc.tx.retry(lambda: ev.get_logs(from_block=0)))


def _queued(path: Path, kind: str) -> int:
    with sqlite3.connect(f"file:{path}?mode=ro", uri=True) as db:
        n = db.execute("SELECT COUNT(*) FROM outbox WHERE state='queued' AND kind=?", (kind,)).fetchone()[0]
    db.close()
    return int(n)


def test_claim_during_an_outage_is_queued_then_sent_exactly_once(tmp_path: Path, anvil: RestartableAnvil,
                                                                    chain: Env) -> None:
    env = chain
    model_id, holder = _model_with_holder(env)
    for _ in range(3):
        env.pc.deposit_revenue(env.payer, model_id, FEE, os.urandom(32))
    accrued = env.pc.claimable(model_id, holder.address)
    assert 0 <= 3 * FEE - accrued <= 3  # the only holder: every fee accrues to it (rounding dust aside)
    deployment, keystore, password = tmp_path / "deployment.json", tmp_path / "holder.json", tmp_path / "pw"
    env.pc.deployment.save(deployment)
    password.write_text("holder password")
    keystore.write_text(json.dumps(Account.encrypt(holder.key, "holder password")))
    outbox_dir = tmp_path / "outbox"
    args = ("claim", "--model", str(model_id), "--rpc-url", anvil.url, "--deployment", str(deployment),
            "--keystore", str(keystore), "--password-file", str(password), "--outbox-dir", str(outbox_dir))
    pmn_env = {f"PMN_{k.upper()}": str(v) for k, v in OUTBOX.items()} | {"PMN_RPC_RETRIES": "1"}
    outbox_file = outbox_dir / f"{holder.address.lower()}.sqlite"

    anvil.stop()
    down = run_pmn(*args, env=pmn_env)
    assert_clean_error(down, "revenue claim of model", "is queued", str(outbox_file), "re-running `pmn claim")
    assert _queued(outbox_file, "claim_revenue") == 1
    down = run_pmn(*args, env=pmn_env)  # still down: the same claim, still queued, not a second one
    assert_clean_error(down, "is queued")
    assert _queued(outbox_file, "claim_revenue") == 1

    anvil.start()
    up = run_pmn(*args, env=pmn_env)
    assert up.returncode == 0, up.stderr
    assert f"claimed {accrued} wei for {holder.address} (model {model_id})" in up.stdout
    assert _queued(outbox_file, "claim_revenue") == 0
    again = run_pmn(*args, env=pmn_env)  # nothing left: a clear error, no second claim
    assert_clean_error(again, "nothing to claim")

    claims = _events(env, model_id, "RevenueClaimed")
    assert Counter(e["args"]["account"] for e in claims) == {holder.address: 1}
    assert int(claims[0]["args"]["amount"]) == accrued
    assert env.pc.claimed(model_id, holder.address) == accrued and env.pc.claimable(model_id, holder.address) == 0


def _holder_config(url: str, tmp_path: Path) -> HolderConfig:
    return HolderConfig(rpc_url=url, outbox_dir=str(tmp_path / "outbox"), rpc_retries=1, **OUTBOX)  # type: ignore[arg-type]


def test_fee_paid_during_an_outage_is_resumed_and_paid_once(tmp_path: Path, anvil: RestartableAnvil,
                                                           chain: Env) -> None:
    env = chain
    model_id, _ = _model_with_holder(env)
    cfg = _holder_config(anvil.url, tmp_path)

    anvil.stop()
    with HolderOutbox(cfg, env.pc.deployment, env.payer) as outbox:
        with pytest.raises(OutboxQueuedError, match=r"request 0x[0-9a-f]{64} \(model \d+\) is queued") as err:
            outbox.pay(model_id, FEE)
        assert f"re-running `pmn infer --model {model_id}` resumes it" in str(err.value)
        assert "\n" not in str(err.value)
        entry = outbox.open_payment(model_id)
        assert entry is not None and entry.state == "queued"
        queued_id = bytes.fromhex(entry.payload["request_id"])
        assert f"0x{queued_id.hex()}" in str(err.value)

    anvil.start()
    with HolderOutbox(cfg, env.pc.deployment, env.payer) as outbox:  # a new run, after the chain came back
        paid = outbox.pay(model_id, FEE)
        assert paid.request_id == queued_id and paid.resumed and paid.fee_wei == FEE
        # its generation failed (nothing marked it used): the next run uses the same payment, pays nothing
        again = outbox.pay(model_id, FEE)
        assert (again.request_id, again.tx_hash) == (paid.request_id, paid.tx_hash) and again.resumed
        # served: the next run pays for a new request
        outbox.mark_used(model_id, paid.request_id, "served")
        fresh = outbox.pay(model_id, FEE)
        assert fresh.request_id != paid.request_id and not fresh.resumed

    deposits = _events(env, model_id, "RevenueDeposited")
    ours = Counter(bytes(e["args"]["requestId"]) for e in deposits if e["args"]["payer"] == env.payer.address)
    assert ours == {queued_id: 1, fresh.request_id: 1}
    by_request = {bytes(e["args"]["requestId"]): bytes(e["transactionHash"]) for e in deposits}
    assert by_request[queued_id] == paid.tx_hash and by_request[fresh.request_id] == fresh.tx_hash


def test_fee_payment_whose_answer_is_lost_is_found_not_paid_again(tmp_path: Path, anvil: RestartableAnvil,
                                                                  chain: Env) -> None:
    env = chain
    model_id, _ = _model_with_holder(env)
    proxy = FlakyProxy(anvil.url)
    try:
        cfg = _holder_config(proxy.url, tmp_path)
        with HolderOutbox(cfg, env.pc.deployment, env.payer) as outbox:
            proxy.swallow_method = "eth_sendRawTransaction"  # the payment reaches the chain, its answer does not
            paid = outbox.pay(model_id, FEE)
            entry = outbox.open_payment(model_id)
            assert entry is not None and entry.uncertain == 1 and entry.sent == 0 and entry.attempts == 1
        assert proxy.sends() == 1
    finally:
        proxy.close()
    deposits = [e for e in _events(env, model_id, "RevenueDeposited") if e["args"]["payer"] == env.payer.address]
    assert [(bytes(e["args"]["requestId"]), bytes(e["transactionHash"])) for e in deposits] == [
        (paid.request_id, paid.tx_hash)]


def test_refused_payment_is_a_clear_error_and_not_retried(tmp_path: Path, anvil: RestartableAnvil,
                                                          chain: Env) -> None:
    env = chain
    model_id = env.propose()  # no share holders yet: the revenue contract refuses fees
    cfg = _holder_config(anvil.url, tmp_path)
    with HolderOutbox(cfg, env.pc.deployment, env.payer) as outbox:
        with pytest.raises(OutboxRefusal, match="the chain refused the payment") as err:
            outbox.pay(model_id, FEE)
        assert "not retried" in str(err.value)
        assert outbox.open_payment(model_id) is None  # the next run pays for a new request id


def test_claim_whose_answer_is_lost_is_found_not_claimed_again(tmp_path: Path, anvil: RestartableAnvil,
                                                               chain: Env) -> None:
    env = chain
    model_id, holder = _model_with_holder(env)
    env.pc.deposit_revenue(env.payer, model_id, FEE, os.urandom(32))
    accrued = env.pc.claimable(model_id, holder.address)
    proxy = FlakyProxy(anvil.url)
    try:
        cfg = _holder_config(proxy.url, tmp_path)
        with HolderOutbox(cfg, env.pc.deployment, holder) as outbox:
            proxy.swallow_method = "eth_sendRawTransaction"  # the claim reaches the chain, its answer does not
            got = outbox.claim(model_id)
            assert got["amount_wei"] == accrued and got["found"] == "claimedOf grew"
            assert not outbox.queued_claim(model_id)
        assert proxy.sends() == 1
    finally:
        proxy.close()
    claims = _events(env, model_id, "RevenueClaimed")
    assert [(e["args"]["account"], int(e["args"]["amount"])) for e in claims] == [(holder.address, accrued)]
