"""The stack's model card (README.md): what the stack is, its stages, and how each adapter was trained."""

from __future__ import annotations

from pathlib import Path

from fslm.config import StackConfig
from fslm.files import atomic_write_text
from fslm.stackdir import ADAPTERS, StackDir


def _cell(text: object) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def render_model_card(config: StackConfig, adapters: dict[str, bool]) -> str:
    lines = [
        "---",
        "library_name: peft",
        "tags: [fslm, lora, stacked-small-language-models]",
        "---",
        f"# {config.name}",
        "",
        config.description or "A stack of small language models built with fslm.",
        "",
        f"- **Base model**: `{config.base.model}` ({config.base.dtype})",
        f"- **Recipe**: `{config.recipe or 'custom'}` (stage prompts are fslm's own; arXiv 2410.15570 published none)",
        f"- **LoRA**: r={config.lora.r}, alpha={config.lora.alpha:g}, dropout={config.lora.dropout:g}, "
        f"targets: {', '.join(config.lora.target_modules)}",
        "",
        "## Stages",
        "",
        "| # | stage | reads | adapter | max new tokens | role |",
        "|---|---|---|---|---|---|",
    ]
    for i, s in enumerate(config.stages, 1):
        adapter = f"`{ADAPTERS}/{s.name}/`" if adapters.get(s.name) else "none (base model)"
        lines.append(
            f"| {i} | {s.name} | {', '.join(s.reads) or '-'} | {adapter} | {s.generation.max_new_tokens} | {_cell(s.role)} |"
        )
    trained = [(s.name, s.training) for s in config.stages if s.training is not None]
    trained += [(f"{name} (baseline)", t) for name, t in config.baselines.items()]
    if trained:
        lines += [
            "",
            "## Training",
            "",
            "| stage | examples | epochs | steps | train loss | val loss | seconds | data sha256 |",
            "|---|---|---|---|---|---|---|---|",
        ]
        for name, t in trained:

            def f(x: float | None) -> str:
                return "-" if x is None else f"{x:.4g}"

            lines.append(
                f"| {name} | {t.examples or '-'} | {f(t.epochs)} | {t.steps or '-'} | {f(t.train_loss)} | "
                f"{f(t.val_loss)} | {f(t.seconds)} | `{(t.data_sha256 or '-')[:12]}` |"
            )
    lines += [
        "",
        "## Use",
        "",
        "```bash",
        "fslm info .",
        'fslm run . "Give three tips for staying healthy."',
        "```",
        "",
    ]
    return "\n".join(lines)


def write_model_card(directory: str | Path, config: StackConfig) -> Path:
    stack_dir = StackDir(directory)
    adapters = {s.name: stack_dir.is_trained(s.name) for s in config.stages}
    atomic_write_text(stack_dir.card, render_model_card(config, adapters))
    return stack_dir.card
