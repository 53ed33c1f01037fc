"""`fslm init`: write a new stack directory from a recipe and a base model."""

from __future__ import annotations

from pathlib import Path

from pydantic import Field

from fslm import models
from fslm.card import write_model_card
from fslm.config import StackConfig, dump_yaml, parse_config
from fslm.errors import FslmError
from fslm.options import Options, Result
from fslm.recipes import DEFAULT_RECIPE, load_recipe
from fslm.stackdir import StackDir


class InitOptions(Options):
    """What `fslm init` can be told besides the directory; the CLI's flags and defaults come from here."""

    recipe: str = Field(DEFAULT_RECIPE, description="Shipped recipe name or path to a recipe YAML.")
    base: str = Field(models.DEFAULT_BASE, description="Base model: alias, local HF directory, .gguf file or hub id.")
    force: bool = Field(False, description="Overwrite an existing stack.yaml.")


class InitResult(Result):
    """The new stack directory and its manifest."""

    directory: Path
    config: StackConfig


def init(directory: str | Path, options: InitOptions | None = None) -> InitResult:
    """Create a stack directory: stack.yaml for `options.base` with the stages of `options.recipe`, adapters/,
    and the model card."""
    options = options or InitOptions()
    stack_dir = StackDir(directory)
    root = stack_dir.root
    if root.exists() and not root.is_dir():
        raise FslmError(f"{root}: exists and is not a directory")
    if stack_dir.exists() and not options.force:
        raise FslmError(
            f"{root}: already holds a stack ({stack_dir.manifest.name}); pass --force to overwrite its manifest"
        )
    if root.is_dir() and not stack_dir.exists() and any(root.iterdir()):
        raise FslmError(f"{root}: directory is not empty; choose a new or empty directory")

    data = load_recipe(options.recipe)
    ref = models.resolve(options.base, root)
    arch = models.architecture(ref)
    data = {
        "name": root.resolve().name,
        "description": data.get("description", ""),
        "recipe": data.get("name", options.recipe),
        "base": {"model": options.base},
        "lora": {
            "r": 16,
            "alpha": 32,
            # PEFT's default too: drawing dropout masks took a quarter of a CPU training step (docs/train.md, Speed)
            "dropout": 0.0,
            "target_modules": models.lora_targets(arch),
            **data.get("lora", {}),
        },
        "stages": data["stages"],
    }
    # Round-trip through the same parser users' files go through, so a bad recipe is reported like a bad manifest.
    config = parse_config(dump_yaml(data), source=f"recipe {options.recipe}")
    stack_dir.adapters.mkdir(parents=True, exist_ok=True)
    stack_dir.save(config)
    write_model_card(root, config)
    return InitResult(directory=root, config=config)
