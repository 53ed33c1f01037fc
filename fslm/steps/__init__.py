"""The pipeline steps, one module or package each: init, quickstart, distill/, train/, evaluate/, export, serve.

Each step has one public function, `step(paths, Options, on_event=None) -> Result`, re-exported from `fslm`
(`fslm.distill(...)`, `fslm.train(...)`). The steps live in this subpackage so that `fslm.distill` can be the
function while `fslm.steps.distill` is the step's package; a package's parts are its own modules (distill/prompts.py,
train/examples.py, evaluate/report.py, ...), and its __init__ names the step, its options and its result.
"""
