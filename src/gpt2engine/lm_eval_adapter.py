"""The lm-evaluation-harness model `gpt2engine`, a thin layer over evaluation.py and generate.py.

Importing this module registers the model with lm_eval. lm_eval has no plugin hook for models
from other packages, so the package installs `gpt2engine-lm-eval.pth`, which imports this module
at start-up in the `lm_eval` command only; `gpt2 eval harness ARGS...` is the same command line
with this module imported. In Python: `import gpt2engine.lm_eval_adapter`, then
`lm_eval.simple_evaluate(model="gpt2engine", model_args="pretrained=PATH", tasks=[...])`.
"""

from __future__ import annotations

from collections.abc import Sequence

import lm_eval.models  # noqa: F401  (the harness's own models first: its registry fills only when empty)
import torch
from lm_eval.api.model import LM
from lm_eval.api.registry import register_model

from gpt2engine.engine.prefix_cache import DEFAULT_PREFIX_CACHE_MIB
from gpt2engine.engine.scheduler import DEFAULT_PREFILL_CHUNK
from gpt2engine.evaluation import loglikelihood, loglikelihood_rolling
from gpt2engine.generate import GenerationOptions, complete
from gpt2engine.loading.runtime import load_pretrained
from gpt2engine.sampling_params import SamplingParams

DEFAULT_BATCH_SIZE = 8


@register_model("gpt2engine")
class GPT2EngineLM(LM):
    """model_args: pretrained (folder or Hub id, default gpt2), revision, dtype (auto), and the
    engine's prefix_cache_mib (0: off) and prefill_chunk (its block), which loglikelihood uses."""

    def __init__(
        self, pretrained: str = "gpt2", revision: str | None = None, dtype: str = "auto",
        device: str | None = None, batch_size: int | str = DEFAULT_BATCH_SIZE,
        max_batch_size: int | None = None, prefix_cache_mib: float = DEFAULT_PREFIX_CACHE_MIB,
        prefill_chunk: int = DEFAULT_PREFILL_CHUNK,
    ) -> None:
        super().__init__()
        if device is None or (device.startswith("cuda") and not torch.cuda.is_available()):
            device = "auto"  # lm_eval passes cuda:0 by default; its own hf model falls back too
        self.model, self.tokenizer = load_pretrained(pretrained, revision, device, dtype)
        auto = str(batch_size).startswith("auto")
        self.batch_size = (max_batch_size or DEFAULT_BATCH_SIZE) if auto else int(batch_size)
        self.prefix_cache_mib, self.prefill_chunk = float(prefix_cache_mib), int(prefill_chunk)

    def loglikelihood(self, requests: Sequence, disable_tqdm: bool = False) -> list[tuple[float, bool]]:
        scores = loglikelihood(self.model, self.tokenizer, [r.args for r in requests],
                               self.batch_size, progress=not disable_tqdm,
                               prefix_cache_mib=self.prefix_cache_mib, prefill_chunk=self.prefill_chunk)
        return [(s.logprob, s.greedy) for s in scores]

    def loglikelihood_rolling(self, requests: Sequence, disable_tqdm: bool = False) -> list[float]:
        return [loglikelihood_rolling(self.model, self.tokenizer, r.args[0],
                                      batch_size=self.batch_size) for r in requests]

    def generate_until(self, requests: Sequence, disable_tqdm: bool = False) -> list[str]:
        texts = []
        for request in requests:
            context, settings = request.args
            until = settings.get("until") or []
            temperature = settings.get("temperature", 0.0) if settings.get("do_sample") else 0.0
            options = GenerationOptions(
                max_new_tokens=int(settings.get("max_gen_toks", 256)),
                sampling=SamplingParams(temperature=float(temperature)),
                stop=tuple([until] if isinstance(until, str) else until), truncate="left",
            )
            texts.append(complete(self.model, self.tokenizer, [context], options)[0].text)
        return texts
