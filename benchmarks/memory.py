"""Peak resident memory of a stack: the bare base model vs the same base with every stage's LoRA adapter attached.

Each measurement runs in its own fresh process (load + one short greedy run of every stage), so peak RSS
(`ru_maxrss`) covers loading and generation. Both figures include the Python/torch runtime.

    python benchmarks/memory.py [--base smollm2-135m-instruct] [--out benchmarks/results/memory.json]
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import subprocess
import sys
import tempfile
from pathlib import Path


def _child(directory: str) -> None:
    from fslm import Stack

    stack = Stack.load(directory)
    trace = stack.run("Give three tips for staying healthy.", max_new_tokens=8)
    peak_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    adapters = [s.adapter for s in trace.stages]
    print(json.dumps({"peak_rss_mib": peak_kib / 1024, "adapters": adapters}))


def _make_adapters(directory: str) -> None:
    """Write an r/targets-as-configured LoRA adapter for every stage (weights untrained: memory is the same)."""
    from peft import LoraConfig, get_peft_model

    from fslm import Stack

    stack = Stack.load(directory)
    lora = stack.config.lora
    for stage in stack.config.stage_names:
        cfg = LoraConfig(r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout, target_modules=lora.target_modules)
        model = get_peft_model(stack.backend.model, cfg, adapter_name=stage)
        model.save_pretrained(str(Path(directory) / "adapters"), selected_adapters=[stage])
        model.unload()  # back to the plain base for the next stage
    # PEFT writes non-default adapters into adapters/<name>/ under the given folder: check they are there.
    for stage in stack.config.stage_names:
        assert (Path(directory) / "adapters" / stage / "adapter_model.safetensors").is_file(), stage


def _run(*args: str) -> dict:
    out = subprocess.run([sys.executable, __file__, *args], check=True, capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--base", default="smollm2-135m-instruct")
    parser.add_argument("--out", default="benchmarks/results/memory.json")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--make-adapters", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        return _child(args.child)
    if args.make_adapters:
        _make_adapters(args.make_adapters)
        return print("{}")

    from fslm import __version__
    from fslm.steps.init import InitOptions, init

    with tempfile.TemporaryDirectory() as tmp:
        bare, full = Path(tmp) / "bare", Path(tmp) / "full"
        init(bare, InitOptions(base=args.base))
        config = init(full, InitOptions(base=args.base)).config
        _run("--make-adapters", str(full))
        base = _run("--child", str(bare))
        stacked = _run("--child", str(full))
    assert all(a is None for a in base["adapters"]) and all(a is not None for a in stacked["adapters"])
    ratio = stacked["peak_rss_mib"] / base["peak_rss_mib"]
    lora = config.lora
    rows = [
        ("bare base model (0 adapters)", base["peak_rss_mib"], 1.0),
        (
            f"stack, {len(config.stages)} adapters (r={lora.r}, {len(lora.target_modules)} modules)",
            stacked["peak_rss_mib"],
            ratio,
        ),
    ]
    print(f"{'configuration':<48} {'peak RSS (MiB)':>15} {'ratio':>7}")
    for name, mib, r in rows:
        print(f"{name:<48} {mib:>15.0f} {r:>7.3f}")
    result = {
        "base": args.base,
        "peak_rss_mib_base": base["peak_rss_mib"],
        "peak_rss_mib_stack": stacked["peak_rss_mib"],
        "ratio": ratio,
        "stages": len(config.stages),
        "lora": lora.model_dump(),
        "versions": {"fslm": __version__, "python": platform.python_version(), **_versions()},
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2))
    print(f"wrote {args.out}")


def _versions() -> dict[str, str]:
    import peft
    import torch
    import transformers

    return {"torch": torch.__version__, "transformers": transformers.__version__, "peft": peft.__version__}


if __name__ == "__main__":
    main()
