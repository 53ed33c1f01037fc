"""The stack directory on disk: one owner for its layout, so no step spells a path of it on its own.

    DIR/
    ├── stack.yaml          the manifest (fslm.config)
    ├── README.md           the model card (fslm.card)
    ├── adapters/<name>/    one PEFT LoRA folder per trained stage, and per baseline (single, multitask)
    ├── gguf/               `fslm export`: base.gguf, <name>.lora.gguf, manifest.json
    ├── .fslm-train/        `fslm train`: checkpoints and the resumable run's state
    └── .fslm-cache/        content-addressed caches (the student's own earlier-stage outputs)

A stage is *trained* when `adapters/<stage>/adapter_config.json` exists; a stage without a folder runs on the bare
base, and a folder with only one of the two PEFT files is an error wherever the stack loads (`adapter_problem`).
Baselines (`single`: one adapter answering directly; `multitask`: one adapter trained on every stage's targets and
the direct answer) are adapters of the same directory, kept beside the stages and recorded in `baselines:`.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from fslm.config import MANIFEST, StackConfig, StageTraining, load_config, save_config, update_config
from fslm.errors import FslmError
from fslm.files import recover_dir, sha256_file

ADAPTERS = "adapters"
GGUF = "gguf"
GGUF_MANIFEST = "manifest.json"
TRAIN_STATE = ".fslm-train"
CACHE = ".fslm-cache"
CARD = "README.md"
ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"

SINGLE = "single"  # one adapter: instruction -> answer, no intermediate stages
MULTITASK = "multitask"  # one adapter trained on every stage's targets and the direct answer, answers directly
BASELINES = (SINGLE, MULTITASK)


class StackDir:
    """Paths and facts of one stack directory; cheap to create, reads nothing until asked."""

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)

    def __repr__(self) -> str:
        return f"StackDir({str(self.root)!r})"

    def __fspath__(self) -> str:
        return str(self.root)

    # --- the manifest -------------------------------------------------------------------------------

    @property
    def manifest(self) -> Path:
        return self.root / MANIFEST

    @property
    def card(self) -> Path:
        return self.root / CARD

    def exists(self) -> bool:
        return self.manifest.is_file()

    def load(self) -> StackConfig:
        return load_config(self.root)

    def save(self, config: StackConfig) -> Path:
        return save_config(config, self.root)

    # --- adapters -----------------------------------------------------------------------------------

    @property
    def adapters(self) -> Path:
        return self.root / ADAPTERS

    def adapter(self, name: str) -> Path:
        """`adapters/<name>/`, for a stage or a baseline (whether or not it exists); restored first when a replacement
        of it was killed between its two renames (fslm.files.recover_dir), so a stage never silently loses it."""
        path = self.adapters / name
        recover_dir(path)
        return path

    def weights(self, name: str) -> Path:
        return self.adapter(name) / ADAPTER_WEIGHTS

    def is_trained(self, name: str) -> bool:
        """A stage or baseline has a PEFT adapter (written whole by an atomic directory swap)."""
        return (self.adapter(name) / ADAPTER_CONFIG).is_file()

    def trained_stages(self, config: StackConfig) -> list[str]:
        return [s.name for s in config.stages if self.is_trained(s.name)]

    def adapter_problem(self, name: str) -> str | None:
        """Why `adapters/<name>/` is there but is no usable adapter (half of a PEFT folder), or None: a stage with
        such a folder must not quietly run on the bare base while `fslm info` counts its weights."""
        path = self.adapter(name)
        config, weights = (path / ADAPTER_CONFIG).is_file(), (path / ADAPTER_WEIGHTS).is_file()
        if config == weights:
            return None
        if weights:
            what = f"{path}: has {ADAPTER_WEIGHTS} but no {ADAPTER_CONFIG}"
        else:  # PEFT would fall back to a pickled adapter_model.bin; fslm never loads one
            what = (
                f"{path / ADAPTER_WEIGHTS}: missing; adapter weights are read only from safetensors (a pickled "
                "adapter_model.bin is never loaded)"
            )
        return (
            f"{what}, so it is not a usable adapter; train it again (fslm train {self.root} --data "
            f"D{_train_flag(name)}) or remove the folder to run {name!r} on the bare base"
        )

    def check_adapters(self, config: StackConfig) -> None:
        """FslmError for the first stage whose adapter folder is half there (`adapter_problem`)."""
        for name in config.stage_names:
            problem = self.adapter_problem(name)
            if problem:
                raise FslmError(problem)

    def require_baseline(self, name: str) -> Path:
        """The baseline's adapter folder, or a message saying how to train it."""
        if name not in BASELINES:
            raise FslmError(f"unknown baseline {name!r} (known: {', '.join(BASELINES)})")
        problem = self.adapter_problem(name)
        if problem:
            raise FslmError(problem)
        if not self.is_trained(name):
            raise FslmError(
                f"{self.adapter(name)}: missing, so system {name!r} cannot run; train it with "
                f"`fslm train {self.root} --data D --{name}`"
            )
        return self.adapter(name)

    # --- training records -----------------------------------------------------------------------------

    def training(self, config: StackConfig, name: str) -> StageTraining | None:
        """What `fslm train` recorded for a stage or a baseline."""
        if name in BASELINES:
            return config.baselines.get(name)
        return config.stage(name).training

    def record_training(self, name: str, training: StageTraining) -> None:
        """Write a training record into stack.yaml in place: the rest of the file, the user's comments included,
        stays as it is (round-trip YAML, re-read first so edits made meanwhile survive)."""
        record = training.model_dump(mode="json", exclude_none=True)
        config = self.load()
        if name not in BASELINES:
            index = config.stage_names.index(config.stage(name).name)

        def edit(document: Any) -> None:
            if name in BASELINES:
                if "baselines" not in document:
                    document["baselines"] = {}
                document["baselines"][name] = record
                metadata = document.get("metadata") or {}
                if name == SINGLE and "single_training" in metadata:  # the pre-baselines place of this record
                    del metadata["single_training"]
            else:
                document["stages"][index]["training"] = record

        update_config(self.root, edit)

    def training_files(self, config: StackConfig) -> set[str]:
        """Every data file a stage or baseline of this stack was trained on (for contamination checks)."""
        records = [s.training for s in config.stages] + list(config.baselines.values())
        return {t.data_file for t in records if t is not None and t.data_file}

    # --- other artefacts ------------------------------------------------------------------------------

    @property
    def gguf(self) -> Path:
        return self.root / GGUF

    def gguf_adapter(self, name: str) -> Path:
        return self.gguf / f"{name}.lora.gguf"

    @property
    def gguf_manifest(self) -> Path:
        return self.gguf / GGUF_MANIFEST

    def export_problem(self, config: StackConfig | None = None) -> str | None:
        """Why the GGUF export cannot run the stack as it is now, or None when it can: a readable manifest made for
        this base model, the base file, and for every trained stage its exported file, made from today's weights."""
        config = config or self.load()
        if not self.gguf_manifest.is_file():
            return "no GGUF export"
        try:
            info = json.loads(self.gguf_manifest.read_text(encoding="utf-8"))
            base, adapters = self.gguf / info["base"]["file"], info.get("adapters", {})
            exported_for = info["base"].get("model")
        except (ValueError, KeyError, TypeError, AttributeError) as e:
            return f"{self.gguf_manifest}: unreadable ({e})"
        if not base.is_file():
            return f"{base} is missing"
        if exported_for is not None and exported_for != config.base.model:
            return f"exported for base {exported_for!r}, stack.yaml says {config.base.model!r}"
        for name in self.trained_stages(config):
            entry = adapters.get(name) if isinstance(adapters, dict) else None
            if not isinstance(entry, dict) or not (self.gguf / str(entry.get("file", ""))).is_file():
                return f"stage {name!r} has an adapter but no GGUF export of it"
            weights = self.weights(name)
            if entry.get("source_sha256") and weights.is_file() and sha256_file(weights) != entry["source_sha256"]:
                return f"{weights} changed since the export"
        return None

    @property
    def train_state(self) -> Path:
        return self.root / TRAIN_STATE

    @property
    def student_cache(self) -> Path:
        return self.root / CACHE / "student.jsonl"


def _train_flag(name: str) -> str:
    """The `fslm train` flag that trains this adapter."""
    return f" --{name}" if name in BASELINES else f" --stages {name}"
