"""The node's flags are derived from NodeConfig: every field has one, with the dataclass default, and a
configuration is built once, file < PMN_* environment < flags."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from node.cli import SHORT_FLAGS, build_parser, leaves, parse_config
from node.config import NodeConfig


def _all_fields(obj: object, prefix: str = "") -> dict[str, object]:
    out: dict[str, object] = {}
    for f in dataclasses.fields(obj):  # type: ignore[arg-type]
        value = getattr(obj, f.name)
        if dataclasses.is_dataclass(value):
            out.update(_all_fields(value, f"{prefix}{f.name}."))
        else:
            out[prefix + f.name] = value
    return out


def test_every_field_has_a_flag_defaulting_to_the_dataclass_default() -> None:
    defaults = _all_fields(NodeConfig())
    parser = build_parser()
    by_dest = {a.dest: a for a in parser._actions}
    assert set(defaults) <= set(by_dest), set(defaults) - set(by_dest)
    for path, value in defaults.items():
        action = by_dest[path]
        assert action.default == value, path
        assert action.help, f"{path} has no help (its field comment)"
        assert "--" + path.replace(".", "-").replace("_", "-") in action.option_strings
    assert parse_config([], env={}) == NodeConfig()
    assert set(SHORT_FLAGS) <= set(defaults)  # no short name for a field that is gone
    assert by_dest["runtime.step_retries"].default == NodeConfig().runtime.step_retries == 3  # no drift


def test_precedence_is_file_then_environment_then_flags(tmp_path: Path) -> None:
    f = tmp_path / "node.toml"
    f.write_text('model = "tiny"\ncapacity = 2\n[runtime]\nsteps = 5\nstep_retries = 7\ncodec = "bf16"\n'
                 '[discovery.dht]\nenabled = false\n')
    env = {"PMN_RUNTIME_STEPS": "6", "PMN_CAPACITY": "3", "PMN_LISTEN": "/ip4/127.0.0.1/tcp/5,/ip4/127.0.0.1/tcp/6",
           "PMN_REPLICAS_ENABLED": "true"}
    argv = ["--config", str(f), "--steps", "8", "--listen", "/ip4/127.0.0.1/tcp/9", "--dht", "--no-replicated"]
    cfg = parse_config(argv, env)
    assert cfg.runtime.steps == 8  # file 5 < env 6 < flag 8
    assert cfg.capacity == 3  # file 2 < env 3
    assert cfg.runtime.step_retries == 7 and cfg.runtime.codec == "bf16"  # file only
    assert cfg.listen == ["/ip4/127.0.0.1/tcp/9"]  # a flag replaces the list, it does not append to it
    assert cfg.discovery.dht.enabled is True and cfg.replicas.enabled is False
    assert parse_config(["--config", str(f)], env).listen == ["/ip4/127.0.0.1/tcp/5", "/ip4/127.0.0.1/tcp/6"]
    assert parse_config(["--config", str(f)], {}).runtime.steps == 5
    # the long and the short names of a field set the same thing
    assert parse_config(["--runtime-frame-timeout-s", "3"], {}) == parse_config(["--frame-timeout", "3"], {})


def test_bad_file_or_environment_names_the_field(tmp_path: Path) -> None:
    f = tmp_path / "node.toml"
    f.write_text("[runtime]\nstepz = 1\n")
    with pytest.raises(ValueError, match="runtime.stepz"):
        parse_config(["--config", str(f)], {})
    with pytest.raises(ValueError, match="PMN_RUNTIME_STEPS"):
        parse_config([], {"PMN_RUNTIME_STEPS": "many"})
    with pytest.raises(ValueError, match="does not exist"):
        parse_config(["--config", str(tmp_path / "none.toml")], {})


def test_leaves_cover_nested_sections_once() -> None:
    paths = [leaf.path for leaf in leaves()]
    assert len(paths) == len(set(paths))
    assert "discovery.dht.enabled" in paths and "chain.rpc_url" in paths
    flags = [flag for leaf in leaves() for flag in leaf.flags]
    assert len(flags) == len(set(flags))


def test_a_negative_start_quorum_is_refused_by_name() -> None:
    cfg = parse_config(["--replicas-start-quorum", "-1"], {})
    with pytest.raises(ValueError, match="replicas.start_quorum must be >= 0, got -1"):
        cfg.validate()
    parse_config(["--replicas-start-quorum", "3"], {}).validate()


def test_replicas_on_chain_need_their_assigned_stage_and_no_rebalancing() -> None:
    chain = ["--replicated", "--rpc-url", "http://127.0.0.1:1", "--deployment", "d.json", "--model-id", "1"]
    for argv, why in ((chain, "set stage to it"), ([*chain, "--stage", "1", "--rebalance-period", "30"],
                                                   "rebalance_period_s = 0")):
        with pytest.raises(ValueError, match=why):
            parse_config(argv, {}).validate()
    parse_config([*chain, "--stage", "1"], {}).validate()
    parse_config(["--replicated", "--rebalance-period", "30"], {}).validate()  # off chain a node may move
