"""What an experiment-2 campaign keeps in the repository (`--sync`, `--publish`), and how a new machine starts from
it: the distilled parts, the trained stack in bfloat16, the eval folders, each copied atomically with this machine's
paths named by place, so the committed files resume anywhere.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path
from typing import Any


def part_files(part: Path) -> list[Path]:
    """A distilled part and what resumes it: the rows, the rejected rows, the manifest (the cache is optional)."""
    return [part, part.with_name(part.name + ".rejected.jsonl"), part.with_name(part.name + ".manifest.json")]


def portable(text: str, places: dict[str, str]) -> str:
    """`text` with this machine's paths named by what they are (`places`: path -> name, the longest path first),
    each only as a whole path or a path's start: `../shared/data` names a place, `x../shared/database` does not."""
    for path in sorted(places, key=len, reverse=True):
        text = re.sub(rf"(?<![\w.~/-]){re.escape(path)}(?![\w.-])", lambda _m, name=places[path]: name, text)
    return text


def name_places(ledger: Path, places: dict[str, str]) -> None:
    """Rewrite a ledger written before paths were named by place (its settings would differ from today's only in
    how the teacher's path is spelt, and the ledger would refuse to resume)."""
    from fslm.files import atomic_write_text

    if ledger.is_file():
        text = ledger.read_text(encoding="utf-8")
        if portable(text, places) != text:
            atomic_write_text(ledger, portable(text, places))


def sync_files(part: Path, folder: Path, places: dict[str, str]) -> None:
    """Copy a distilled part's files into `folder` (atomically each, so a commit never sees half a file), the
    manifest's machine paths named by `places` (the resume check compares no paths)."""
    from fslm.files import atomic_write_text

    folder.mkdir(parents=True, exist_ok=True)
    for f in part_files(part):
        if f.is_file():
            text = f.read_text(encoding="utf-8")
            atomic_write_text(folder / f.name, text if f.suffix == ".jsonl" else portable(text, places))


def seed_from(folder: Path, part: Path) -> None:
    """Start a part from `folder`'s copy when OUT has none yet: a new machine resumes from what was committed."""
    if part.exists() or not (folder / part.name).is_file():
        return
    for f in part_files(part):
        source = folder / f.name
        if source.is_file():
            f.write_bytes(source.read_bytes())
    print(f"resuming {part.name} from {folder}", file=sys.stderr)


def syncing(view: Any, act: Any, every: float = 300.0) -> Any:
    """The progress view, plus `act()` (a copy to --sync) at most every `every` seconds."""
    import time

    last = time.monotonic()

    def handler(event: Any) -> None:
        nonlocal last
        view(event)
        if time.monotonic() - last >= every:
            act()
            last = time.monotonic()

    return handler


EVAL_FOLDERS = ("eval", "eval-gate", "eval-teacher", "eval-ablate")
STACK_FILES = ("stack.yaml", "README.md")


def adapters_to_bf16(adapters: Path) -> list[str]:
    """Store each adapter's float32 weights in bfloat16, in place: half the bytes to keep, copy to --sync and commit
    (6 adapters, ~59 MB), and the eval then runs on exactly the synced bytes. LoRA factors lose nothing that shows:
    PEFT and the GGUF export read them back as float32 (bfloat16 is the top half of a float32)."""
    import torch
    from safetensors.torch import load_file, save

    from fslm.files import atomic_write_bytes

    done = []
    for weights in sorted(adapters.glob("*/adapter_model.safetensors")):
        tensors = load_file(weights)
        if not any(t.dtype == torch.float32 for t in tensors.values()):
            continue
        halved = {k: t.to(torch.bfloat16) if t.dtype == torch.float32 else t for k, t in tensors.items()}
        atomic_write_bytes(weights, save(halved, metadata={"format": "pt"}))
        done.append(weights.parent.name)
    return done


def sync_stack(stack: Path, folder: Path, places: dict[str, str]) -> None:
    """The trained stack into `folder`: stack.yaml (machine paths named by `places`), the model card, every adapter
    folder, so a new machine evaluates the same adapters instead of training again."""
    from fslm.files import atomic_write_text

    folder.mkdir(parents=True, exist_ok=True)
    for name in STACK_FILES:
        if (stack / name).is_file():
            atomic_write_text(folder / name, portable((stack / name).read_text(encoding="utf-8"), places))
    sync_tree(stack / "adapters", folder / "adapters", places)


def seed_stack(folder: Path, stack: Path) -> None:
    """Start OUT's stack from `folder`'s trained one when OUT has no trained adapter yet (a new machine); stack.yaml
    keeps the place names sync_stack gave its paths (they only say where the training data was)."""
    import shutil

    if not any(folder.glob("adapters/*/adapter_model.safetensors")) or any(
        stack.glob("adapters/*/adapter_model.safetensors")
    ):
        return
    stack.mkdir(parents=True, exist_ok=True)
    for name in STACK_FILES:
        if (folder / name).is_file():
            shutil.copyfile(folder / name, stack / name)
    shutil.copytree(folder / "adapters", stack / "adapters", dirs_exist_ok=True)
    print(f"resuming the trained stack from {folder}", file=sys.stderr)


def sync_tree(source: Path, folder: Path, places: dict[str, str]) -> None:
    """Copy a folder's files (an eval's, the adapters) into `folder`, each atomically; JSON and reports with machine paths named by
    `places` (stage texts byte for byte: a resumed eval reads them back)."""
    from fslm.files import atomic_write_bytes, atomic_write_text

    for f in sorted(p for p in source.rglob("*") if p.is_file()):
        target = folder / f.relative_to(source)
        target.parent.mkdir(parents=True, exist_ok=True)
        if f.suffix in (".json", ".md"):
            atomic_write_text(target, portable(f.read_text(encoding="utf-8"), places))
        else:
            atomic_write_bytes(target, f.read_bytes())


BORROWABLE = ("eval/systems/base.json", "eval-teacher/systems/base.json")  # rows that read no adapter


def borrow_rows(folder: Path, out: Path) -> dict[str, str]:
    """Copy another campaign's rows that read no adapter (BORROWABLE) into OUT where OUT has none; returns each
    copied row's key, so the summary can tell a reused row (same key after the eval) from one computed anew."""
    borrowed = {}
    for rel in BORROWABLE:
        source, target = folder / rel, out / rel
        if source.is_file() and not target.exists():
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(source.read_bytes())
            borrowed[rel] = json.loads(source.read_text(encoding="utf-8")).get("key", "")
            print(f"borrowing {rel} from {folder}", file=sys.stderr)
    return borrowed


def seed_tree(folder: Path, target: Path) -> None:
    """Start an eval folder from `folder`'s copy when OUT has none: its rows resume where the copy stopped (a row is
    reused by its key, hashes of data and adapters, not by any path)."""
    import shutil

    if folder.is_dir() and not target.exists():
        shutil.copytree(folder, target)
        print(f"resuming {target.name} from {folder}", file=sys.stderr)


def publish(out: Path, ledger: dict[str, Any], args: argparse.Namespace, places: dict[str, str]) -> None:
    """Copy the small outputs where they are committed (machine paths named by `places`): results JSON to
    docs/results/, distilled data to data/."""
    repo = args.publish_root
    results = repo / "docs" / "results" / "exp2" / args.regime
    data = repo / "data" / f"exp2-{args.regime}"
    copies = {f: results / f.name for f in (out / "ledger.json", out / "summary.md")}
    for folder in (*EVAL_FOLDERS, "diagnosis"):  # each folder's results (per item) and report; the rows stay in --sync
        source = out / folder
        if not source.is_dir() and args.sync is not None:
            source = args.sync / folder  # the diagnosis writes into --sync's folder, so a new machine resumes it
        for f in source.glob("*"):
            if f.suffix in (".json", ".md", ".png"):
                copies[f] = results / folder / f.name
    for f in [out / "train.jsonl", out / "train.jsonl.manifest.json", *out.glob("distilled-*.jsonl*")]:
        if not f.name.endswith((".cache.jsonl", ".lock")):
            copies[f] = data / f.name
    for source, target in copies.items():
        target.parent.mkdir(parents=True, exist_ok=True)
        if source.suffix == ".png":
            target.write_bytes(source.read_bytes())
            continue
        text = source.read_text(encoding="utf-8")  # rows stay byte for byte (their manifests hold their sha256)
        target.write_text(text if source.suffix == ".jsonl" else portable(text, places), encoding="utf-8")
    print(f"published: {results}, {data}")
