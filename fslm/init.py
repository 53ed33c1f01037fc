"""`fslm init`: write a new stack directory from a recipe and a base model."""

from __future__ import annotations

from pathlib import Path

from fslm import models
from fslm.card import write_model_card
from fslm.config import ADAPTERS_DIR, MANIFEST, StackConfig, dump_yaml, parse_config, save_config
from fslm.errors import FslmError
from fslm.recipes import DEFAULT_RECIPE, load_recipe


def init_stack(
    directory: str | Path,
    recipe: str = DEFAULT_RECIPE,
    base: str = models.DEFAULT_BASE,
    force: bool = False,
) -> StackConfig:
    directory = Path(directory)
    if directory.exists() and not directory.is_dir():
        raise FslmError(f"{directory}: exists and is not a directory")
    if (directory / MANIFEST).exists() and not force:
        raise FslmError(f"{directory}: already holds a stack ({MANIFEST}); pass --force to overwrite its manifest")
    if directory.is_dir() and not (directory / MANIFEST).exists() and any(directory.iterdir()):
        raise FslmError(f"{directory}: directory is not empty; choose a new or empty directory")

    data = load_recipe(recipe)
    ref = models.resolve(base, directory)
    arch = models.architecture(ref)
    data = {
        "name": directory.resolve().name,
        "description": data.get("description", ""),
        "recipe": data.get("name", recipe),
        "base": {"model": base},
        "lora": {
            "r": 16,
            "alpha": 32,
            "dropout": 0.05,
            "target_modules": models.lora_targets(arch),
            **data.get("lora", {}),
        },
        "stages": data["stages"],
    }
    # Round-trip through the same parser users' files go through, so a bad recipe is reported like a bad manifest.
    config = parse_config(dump_yaml(data), source=f"recipe {recipe}")
    (directory / ADAPTERS_DIR).mkdir(parents=True, exist_ok=True)
    save_config(config, directory)
    write_model_card(directory, config)
    return config
