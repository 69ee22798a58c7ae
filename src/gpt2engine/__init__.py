"""gpt2engine: a GPT-2 inference engine written from scratch in PyTorch."""

from gpt2engine.config import GPT2Config
from gpt2engine.errors import GPT2EngineError
from gpt2engine.generate import GenerationOptions, GenerationResult, complete, stream
from gpt2engine.model import GPT2, KVCache
from gpt2engine.sampling import SamplingParams
from gpt2engine.tokenizer import Tokenizer

__all__ = [
    "GPT2",
    "GPT2Config",
    "GPT2EngineError",
    "GenerationOptions",
    "GenerationResult",
    "KVCache",
    "SamplingParams",
    "Tokenizer",
    "complete",
    "stream",
]
__version__ = "0.1.0"
