"""The pipeline steps, one module each: init, distill, train, evaluate, export, serve.

Each step has one public function, `step(paths, Options, on_event=None) -> Result`, re-exported from `fslm`
(`fslm.distill(...)`, `fslm.train(...)`). The modules live in this subpackage so that `fslm.distill` can be the
function while `fslm.steps.distill` is the module.
"""
