"""The committed artifacts are exactly what a fresh solc-js compile produces."""

from __future__ import annotations

import os
import shutil

import pytest

from contracts.build import BUILD_DIR, build, check_artifacts, compile_sources, load_artifact
from contracts.errors import ArtifactError, BuildError

NEEDS_NODE = pytest.mark.skipif(
    shutil.which("node") is None and os.environ.get("CI") != "true", reason="node not installed (allowed outside CI)"
)


@pytest.fixture(scope="module")
def fresh() -> dict:
    return compile_sources()


@NEEDS_NODE
def test_committed_artifacts_match_fresh_compile(fresh: dict) -> None:
    assert build(check=True, artifacts=fresh) == []
    assert {"ContributionLedger", "ModelRegistry", "NodeRegistry", "ShareToken", "ValidatorQuorum"} <= set(fresh)


@NEEDS_NODE
def test_check_reports_a_tampered_artifact(fresh: dict, tmp_path, monkeypatch) -> None:
    fake = tmp_path / "build"
    shutil.copytree(BUILD_DIR, fake)
    (fake / "ShareToken.json").write_text("{}\n")
    (fake / "Stale.json").write_text("{}\n")
    monkeypatch.setattr("contracts.build.BUILD_DIR", fake)
    (fake / "ModelRegistry.json").unlink()
    assert build(check=True, artifacts=fresh) == ["ModelRegistry", "ShareToken", "Stale"]
    assert (fake / "Stale.json").exists()  # check writes nothing
    monkeypatch.setattr("contracts.build.compile_sources", lambda settings=None: fresh)
    with pytest.raises(BuildError, match="ModelRegistry, ShareToken, Stale"):
        check_artifacts()
    assert build(artifacts=fresh) == ["ModelRegistry", "ShareToken", "Stale"]
    assert not (fake / "Stale.json").exists()
    assert build(check=True, artifacts=fresh) == []


def test_artifacts_pin_compiler_settings() -> None:
    art = load_artifact("ShareToken")
    assert art["compiler"]["evmVersion"] == "cancun"
    assert art["compiler"]["solc"].startswith("0.8.28")
    assert art["bytecode"].startswith("0x") and len(art["bytecode"]) > 100
    names = {e["name"] for e in art["abi"] if e["type"] == "error"}
    assert {"ShareTokenNothingToClaim", "ShareTokenNoSupply", "ReentrancyGuardReentrantCall"} <= names


def test_unknown_artifact_is_a_named_error() -> None:
    with pytest.raises(ArtifactError, match="NoSuchContract"):
        load_artifact("NoSuchContract")
