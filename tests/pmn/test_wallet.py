from __future__ import annotations

import json
from pathlib import Path

from eth_account import Account

from tests.pmn.conftest import assert_clean_error, run_pmn


def test_wallet_new_show_and_check(tmp_path: Path) -> None:
    pw = tmp_path / "pw"
    pw.write_text("correct horse\n")
    ks = tmp_path / "op.json"
    proc = run_pmn("wallet", "new", "--keystore", str(ks), "--password-file", str(pw))
    assert proc.returncode == 0, proc.stderr
    address = proc.stdout.split("address ")[1].split()[0]
    data = json.loads(ks.read_text())
    assert data["crypto"]["kdf"] == "scrypt"  # the standard Web3 Secret Storage format
    key = Account.decrypt(data, "correct horse")
    assert Account.from_key(key).address == address
    assert key.hex() not in proc.stdout and key.hex().removeprefix("0x") not in proc.stdout
    shown = run_pmn("wallet", "show", "--keystore", str(ks), "--check", "--password-file", str(pw))
    assert shown.returncode == 0 and address in shown.stdout


def test_wallet_wrong_password_and_missing_file(tmp_path: Path) -> None:
    pw = tmp_path / "pw"
    pw.write_text("right")
    ks = tmp_path / "op.json"
    assert run_pmn("wallet", "new", "--keystore", str(ks), "--password-file", str(pw)).returncode == 0
    before = ks.read_bytes()
    bad = tmp_path / "bad"
    bad.write_text("wrong")
    assert_clean_error(run_pmn("wallet", "show", "--keystore", str(ks), "--check", "--password-file", str(bad)),
                       "wrong password")
    assert ks.read_bytes() == before
    assert_clean_error(run_pmn("wallet", "show", "--keystore", str(tmp_path / "nope.json")), "no keystore")
    assert_clean_error(run_pmn("wallet", "new", "--keystore", str(ks), "--password-file", str(pw)), "already exists")
    assert ks.read_bytes() == before
