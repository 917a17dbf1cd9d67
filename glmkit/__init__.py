"""glmkit: the GLM model family end to end (see README.md)."""
from .config import PRESETS, ModelConfig, get_preset
from .model import GLM

__version__ = "0.1.0"
__all__ = ["GLM", "ModelConfig", "PRESETS", "get_preset"]
from .convert import CheckpointError, load

__all__ += ["CheckpointError", "load"]
from .tokenizer import Tokenizer, load_tokenizer  # noqa: E402

__all__ += ["Tokenizer", "load_tokenizer"]
