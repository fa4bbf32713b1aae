"""qwenvl: Qwen-VL in plain PyTorch. See README.md for the API and the file map."""
from .api import AutoModelForCausalLM, AutoTokenizer, QWenVL
from .config import GenerationConfig, QWenConfig, VisualConfig
from .model import QWenLMHeadModel
from .tokenizer import QWenTokenizer

__all__ = ["AutoModelForCausalLM", "AutoTokenizer", "GenerationConfig", "QWenConfig", "QWenLMHeadModel",
           "QWenTokenizer", "QWenVL", "VisualConfig"]
__version__ = "0.1.0"
