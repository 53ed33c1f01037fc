"""fslm: fine-tune and run stacks of small language models (after arXiv 2410.15570).

The pipeline in Python, one function per step (each takes paths and one options object, returns a result):

    import fslm
    fslm.init("s")                                              # stack.yaml + adapters/ + model card
    fslm.distill("data.json", "s", "d.jsonl")                   # a teacher writes every stage's target
    fslm.train("s", "d.jsonl", fslm.TrainOptions(max_steps=20))  # one LoRA per stage
    print(fslm.Stack.load("s").run("Give three tips for staying healthy.").answer)
    fslm.evaluate("s", "report", fslm.EvalOptions(data_dir="data", tasks=["arc_easy"]))
    fslm.export("s")                                            # GGUF for llama.cpp
    fslm.serve("s")                                             # OpenAI-compatible server, until interrupted
    app = fslm.create_app(fslm.Stack.load("s"))                 # ... or its FastAPI app, to serve yourself

The step functions and their options are imported on first use, so `import fslm` stays light.
"""

from __future__ import annotations

import importlib
from typing import Any

from fslm import heap

heap.prefer_huge_pages()  # before anything imports torch (fslm.heap says why)

from fslm.config import StackConfig, StageConfig, load_config, save_config
from fslm.errors import FslmError
from fslm.events import Progress
from fslm.stack import Stack, StageResult, Trace
from fslm.stackdir import StackDir

__version__ = "0.1.0"

# name -> module that defines it (imported when first asked for)
_LAZY = {
    "init": "fslm.steps.init",
    "InitOptions": "fslm.steps.init",
    "distill": "fslm.steps.distill",
    "DistillOptions": "fslm.steps.distill",
    "TeacherSpec": "fslm.teachers",
    "train": "fslm.steps.train",
    "TrainOptions": "fslm.steps.train",
    "evaluate": "fslm.steps.evaluate",
    "EvalOptions": "fslm.steps.evaluate",
    "export": "fslm.steps.export",
    "ExportOptions": "fslm.steps.export",
    "serve": "fslm.steps.serve",
    "ServeOptions": "fslm.web.options",
    "create_app": "fslm.web.app",
}

__all__ = [
    "FslmError",
    "Progress",
    "Stack",
    "StackConfig",
    "StackDir",
    "StageConfig",
    "StageResult",
    "Trace",
    "load_config",
    "save_config",
    *_LAZY,
]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'fslm' has no attribute {name!r}")
