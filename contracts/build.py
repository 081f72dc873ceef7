"""Compile every contracts/src/**/*.sol with solc-js (through node) into deterministic JSON artifacts.

`python -m contracts.build [--check]`; `build(check=True)` compares a fresh compile with the committed
artifacts without writing and raises `BuildError` listing the differences.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from contracts.errors import ArtifactError, BuildError

PACKAGE_DIR = Path(__file__).resolve().parent
SRC_DIR = PACKAGE_DIR / "src"
BUILD_DIR = PACKAGE_DIR / "build"
DRIVER = PACKAGE_DIR / "solc_driver.js"


@dataclass(frozen=True)
class CompilerSettings:
    """Pinned compiler settings (part of every artifact)."""

    evm_version: str = "cancun"  # supported by eth-tester's py-evm (Prague) and anvil
    optimizer_runs: int = 200  # optimizer is always on; runs tunes deploy vs call cost
    via_ir: bool = False  # legacy pipeline: faster to compile, enough here
    node_binary: str = "node"  # Node.js executable that runs solc_driver.js
    timeout_s: float = 300.0  # wall-clock limit for one compile
    exclude_dirs: tuple[str, ...] = field(default=("interfaces",))  # sources compiled but not emitted


def _sources() -> dict[str, dict[str, str]]:
    files = sorted(SRC_DIR.rglob("*.sol"))
    if not files:
        raise BuildError(f"no Solidity sources under {SRC_DIR}")
    return {p.relative_to(SRC_DIR).as_posix(): {"content": p.read_text()} for p in files}


def compile_sources(settings: CompilerSettings | None = None) -> dict[str, dict[str, Any]]:
    """Compile all sources; return artifacts keyed by contract name (only contracts with bytecode)."""
    s = settings or CompilerSettings()
    if shutil.which(s.node_binary) is None:
        raise BuildError(f"node executable {s.node_binary!r} not found; install Node.js 18+ to compile")
    if not (PACKAGE_DIR / "node_modules" / "solc").is_dir():
        raise BuildError(f"solc-js missing: run `npm ci` in {PACKAGE_DIR}")
    std_input = {
        "language": "Solidity",
        "sources": _sources(),
        "settings": {
            "evmVersion": s.evm_version,
            "viaIR": s.via_ir,
            "optimizer": {"enabled": True, "runs": s.optimizer_runs},
            "outputSelection": {"*": {"*": ["abi", "evm.bytecode.object", "evm.deployedBytecode.object"]}},
        },
    }
    proc = subprocess.run(
        [s.node_binary, str(DRIVER)],
        input=json.dumps(std_input),
        capture_output=True,
        text=True,
        timeout=s.timeout_s,
        cwd=PACKAGE_DIR,
    )
    if proc.returncode != 0:
        raise BuildError(f"solc driver failed (exit {proc.returncode}): {proc.stderr.strip()[-2000:]}")
    wrapped = json.loads(proc.stdout)
    out = wrapped["output"]
    errors = [e for e in out.get("errors", []) if e.get("severity") == "error"]
    if errors:
        raise BuildError("compilation failed:\n" + "\n".join(e.get("formattedMessage", str(e)) for e in errors))
    artifacts: dict[str, dict[str, Any]] = {}
    for source_name, contracts in sorted(out.get("contracts", {}).items()):
        if source_name.split("/")[0] in s.exclude_dirs or source_name.startswith("@"):
            continue
        for name, data in sorted(contracts.items()):
            bytecode = data["evm"]["bytecode"]["object"]
            if not bytecode:
                continue
            if name in artifacts:
                raise BuildError(f"duplicate contract name {name} in {source_name}")
            artifacts[name] = {
                "contractName": name,
                "sourceName": source_name,
                "compiler": {
                    "solc": wrapped["solcVersion"],
                    "evmVersion": s.evm_version,
                    "optimizerRuns": s.optimizer_runs,
                    "viaIR": s.via_ir,
                },
                "abi": data["abi"],
                "bytecode": "0x" + bytecode,
                "deployedBytecode": "0x" + data["evm"]["deployedBytecode"]["object"],
            }
    return artifacts


def _render(artifact: dict[str, Any]) -> str:
    return json.dumps(artifact, indent=2, sort_keys=True) + "\n"


def build(check: bool = False, settings: CompilerSettings | None = None,
          artifacts: dict[str, dict[str, Any]] | None = None) -> list[str]:
    """Compile; return the names of artifacts that differ from contracts/build/ (missing, changed or stale).

    Without `check` those files are (re)written and stale ones removed; with `check=True` nothing is
    written. An empty list means the committed artifacts equal a fresh compile. `artifacts` (from
    `compile_sources`) skips the compile.
    """
    if artifacts is None:
        artifacts = compile_sources(settings)
    rendered = {f"{name}.json": _render(a) for name, a in artifacts.items()}
    existing = {p.name: p for p in BUILD_DIR.glob("*.json")} if BUILD_DIR.is_dir() else {}
    changed = sorted(f for f, text in rendered.items() if f not in existing or existing[f].read_text() != text)
    stale = sorted(set(existing) - set(rendered))
    if not check:
        BUILD_DIR.mkdir(exist_ok=True)
        for fname in changed:
            (BUILD_DIR / fname).write_text(rendered[fname])
        for fname in stale:
            existing[fname].unlink()
    return [f.removesuffix(".json") for f in sorted(changed + stale)]


def check_artifacts(settings: CompilerSettings | None = None) -> None:
    """Raise BuildError naming every committed artifact that differs from a fresh compile."""
    differing = build(check=True, settings=settings)
    if differing:
        raise BuildError(
            "committed artifacts differ from a fresh compile (run `pmn contracts build`): " + ", ".join(differing)
        )


_CACHE: dict[str, dict[str, Any]] = {}


def load_artifact(name: str) -> dict[str, Any]:
    """Return the committed artifact of contract `name` (abi, bytecode, ...)."""
    if name not in _CACHE:
        path = BUILD_DIR / f"{name}.json"
        if not path.is_file():
            raise ArtifactError(f"no artifact for contract {name!r} at {path}; run `pmn contracts build`")
        try:
            data = json.loads(path.read_text())
            _ = data["abi"], data["bytecode"]
        except (ValueError, KeyError) as exc:
            raise ArtifactError(f"artifact {path} is malformed: {exc}") from exc
        _CACHE[name] = data
    return _CACHE[name]


def main(argv: list[str] | None = None) -> int:
    """Command-line entry: compile, or check with --check."""
    parser = argparse.ArgumentParser(prog="python -m contracts.build", description=__doc__)
    parser.add_argument("--check", action="store_true", help="compare with committed artifacts; write nothing")
    args = parser.parse_args(argv)
    try:
        names = build(check=args.check)
    except BuildError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    if args.check and names:
        print("differ from a fresh compile: " + ", ".join(names), file=sys.stderr)
        return 1
    print(("rewrote: " + ", ".join(names)) if names else "artifacts up to date")
    return 0


if __name__ == "__main__":
    sys.exit(main())
