"""fslm: fine-tune and run stacks of small language models (after arXiv 2410.15570)."""

from fslm.config import StackConfig, StageConfig, load_config, save_config
from fslm.errors import FslmError
from fslm.stack import Stack, StageResult, Trace

__version__ = "0.1.0"
__all__ = ["FslmError", "Stack", "StackConfig", "StageConfig", "StageResult", "Trace", "load_config", "save_config"]
