from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from pmn.config import HolderConfig, OperatorConfig, load_config, render_example
from pmn.errors import ConfigError


def test_toml_then_env_override(tmp_path: Path) -> None:
    f = tmp_path / "op.toml"
    f.write_text('rpc_url = "http://a:1"\nmetrics_port = 9100\nbootstrap = ["/ip4/1.2.3.4/tcp/1"]\n')
    cfg = load_config(OperatorConfig, f, env={"PMN_METRICS_PORT": "9200", "PMN_LISTEN": "/ip4/127.0.0.1/tcp/5,/ip4/127.0.0.1/tcp/6"})
    assert cfg.rpc_url == "http://a:1"
    assert cfg.metrics_port == 9200
    assert cfg.bootstrap == ["/ip4/1.2.3.4/tcp/1"]
    assert cfg.listen == ["/ip4/127.0.0.1/tcp/5", "/ip4/127.0.0.1/tcp/6"]


def test_bad_config_names_the_field(tmp_path: Path) -> None:
    f = tmp_path / "h.toml"
    f.write_text("rpc_retries = 'many'\n")
    with pytest.raises(ConfigError, match="rpc_retries"):
        load_config(HolderConfig, f, env={})
    f.write_text("rpc_url = \n")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_config(HolderConfig, f, env={})
    f.write_text("colour = 1\n")
    with pytest.raises(ConfigError, match="unknown field"):
        load_config(HolderConfig, f, env={})


def test_examples_document_every_field_and_parse(tmp_path: Path) -> None:
    for cls in (OperatorConfig, HolderConfig):
        text = render_example(cls)
        f = tmp_path / f"{cls.__name__}.toml"
        f.write_text(text)
        assert load_config(cls, f, env={}) == cls()
        body = [line for line in text.splitlines()[3:] if line]
        comments = [line for line in body if line.startswith("# ")]
        assert len(comments) == len(body) // 2 and all(len(c) > 4 for c in comments)


def test_every_command_help_has_an_example() -> None:
    from pmn.cli import build_parser

    parser = build_parser()
    stack = [parser]
    seen = 0
    while stack:  # every command and command group, the root included
        p = stack.pop()
        seen += 1
        assert p.epilog and "example:" in p.epilog, p.prog
        example = p.epilog.split("example:", 1)[1]
        assert all(line.strip().startswith(("pmn ", "PMN_")) or line.startswith("    ")
                   for line in example.strip().splitlines()), p.prog  # the example runs `pmn`
        actions = [a for a in p._actions if a.__class__.__name__ == "_SubParsersAction"]
        if actions:
            choices = actions[0].choices
            assert isinstance(choices, dict)  # a _SubParsersAction maps command names to parsers
            stack.extend(choices.values())
    assert seen >= 21
    assert examples_parse() >= 21


def examples_parse() -> int:
    """Every example command line in every epilog parses with the real parser (flags and values exist)."""
    import shlex

    from pmn.cli import build_parser

    stack = [build_parser()]
    n = 0
    while stack:
        p = stack.pop()
        assert p.epilog is not None
        text = p.epilog.split("example:", 1)[1].replace("\\\n", " ")
        for line in text.strip().splitlines():
            words = shlex.split(line.split("#", 1)[0])
            words = words[words.index("pmn") + 1:]
            ns = build_parser().parse_args(words)
            assert callable(ns.func), line
            n += 1
        actions = [a for a in p._actions if a.__class__.__name__ == "_SubParsersAction"]
        if actions:
            choices = actions[0].choices
            assert isinstance(choices, dict)  # a _SubParsersAction maps command names to parsers
            stack.extend(choices.values())
    return n


def test_root_help_names_the_demo() -> None:
    out = subprocess.run([sys.executable, "-m", "pmn.cli", "--help"], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert "pmn demo" in out.stdout


def test_committed_role_files_match_the_dataclasses() -> None:
    from pmn.config import ResearcherConfig

    root = Path(__file__).resolve().parents[2] / "configs"
    for name, cls in (("operator", OperatorConfig), ("researcher", ResearcherConfig), ("holder", HolderConfig)):
        assert (root / f"{name}.toml").read_text() == render_example(cls), f"regenerate configs/{name}.toml"
