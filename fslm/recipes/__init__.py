"""Recipes shipped with fslm: partial stack manifests (stages + prompts) that `fslm init` starts from."""

from __future__ import annotations

from importlib import resources
from typing import Any

import yaml

from fslm.errors import FslmError

DEFAULT_RECIPE = "paper4"


def available() -> list[str]:
    return sorted(p.name.removesuffix(".yaml") for p in resources.files(__name__).iterdir() if p.name.endswith(".yaml"))


def load_recipe(name: str) -> dict[str, Any]:
    """A recipe by name (shipped) or by path to a YAML file of the same shape."""
    from pathlib import Path

    path = Path(name)
    if path.suffix in (".yaml", ".yml") and path.is_file():
        text = path.read_text(encoding="utf-8")
    elif name in available():
        text = resources.files(__name__).joinpath(f"{name}.yaml").read_text(encoding="utf-8")
    else:
        raise FslmError(f"unknown recipe {name!r} (shipped: {', '.join(available())}; or give a path to a .yaml file)")
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise FslmError(f"recipe {name}: malformed YAML: {e}") from None
    if not isinstance(data, dict) or "stages" not in data:
        raise FslmError(f"recipe {name}: expected a mapping with a `stages` list")
    return data
