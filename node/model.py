"""Which model a node trains: a sharding preset name or a JSON ModelConfig file (the one resolver).

`pmn node start` builds on it (it also accepts a spec TOML and hands the node its architecture as JSON).
"""

from __future__ import annotations

import json
from pathlib import Path

from sharding import PRESETS, ModelConfig


def load_model_config(model: str) -> ModelConfig:
    """A preset name or a path to a JSON ModelConfig.

    ValueError names the choices when `model` is neither, and the file when it is not a ModelConfig.
    """
    if model in PRESETS:
        return PRESETS[model]
    path = Path(model).expanduser()
    if not path.exists():
        raise ValueError(f"model {model!r} is neither a preset ({', '.join(sorted(PRESETS))}) nor a file")
    try:
        return ModelConfig.from_dict(json.loads(path.read_text())).validate()
    except (ValueError, TypeError) as exc:
        raise ValueError(f"{path} is not a ModelConfig JSON file: {exc}") from None
