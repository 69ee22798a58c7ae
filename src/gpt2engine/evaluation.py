"""Measuring a model: log-likelihoods, sliding-window perplexity, LAMBADA, multiple choice.

Everything here is a sum of log-probabilities, no generation. Sliding windows (perplexity)
are plain forward passes, batched with right padding, harmless under causal attention.
Continuations of a context (LAMBADA, multiple choice, lm-evaluation-harness' loglikelihood) that
begin as another does (the same context, the same few-shot examples: a whole prefill chunk in
common) go through the engine as requests, the scored tokens' logprobs coming back as prompt
logprobs, so that they share their prefill through its prefix cache; the rest are batched forward
passes too. Either way, the LM head runs only on the scored positions.
"""

from __future__ import annotations

import json
import math
from collections import Counter
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from gpt2engine.engine import Engine, GenerationOptions, QueueFull, Request
from gpt2engine.engine.prefix_cache import DEFAULT_PREFIX_CACHE_MIB
from gpt2engine.engine.scheduler import DEFAULT_PREFILL_CHUNK
from gpt2engine.errors import GPT2EngineError
from gpt2engine.model import GPT2
from gpt2engine.sampling_params import SamplingParams
from gpt2engine.tokenizer import Tokenizer


@dataclass(frozen=True)
class Span:
    """Token ids and which of them are scored: ids[first:], each predicted from the ids before
    it, so first >= 1. The model reads ids[:-1], at most its context."""

    ids: list[int]
    first: int


@dataclass(frozen=True)
class SpanScore:
    logprob: float  # summed over the scored tokens, in nats
    greedy: bool  # every scored token was the model's argmax


@torch.inference_mode()
def score_spans(
    model: GPT2, spans: list[Span], batch_size: int = 8, progress: bool = False
) -> list[SpanScore]:
    """Score many spans in batches (longest first, so padding stays small); order preserved."""
    from tqdm import tqdm

    device = model.wte.weight.device
    order = sorted(range(len(spans)), key=lambda i: -len(spans[i].ids))
    scores: dict[int, SpanScore] = {}
    batches = [order[i : i + batch_size] for i in range(0, len(order), batch_size)]
    for batch in tqdm(batches, disable=not progress or None, unit="batch", leave=False):
        width = len(spans[batch[0]].ids)
        ids = torch.tensor([spans[i].ids + [0] * (width - len(spans[i].ids)) for i in batch],
                           device=device)  # (B, T)
        hidden = model.hidden_states(ids[:, :-1])  # (B, T - 1, C): the last id is only a target
        for row, i in enumerate(batch):
            span = spans[i]
            logits = model.lm_head(hidden[row, span.first - 1 : len(span.ids) - 1]).float()  # (n, V)
            targets = ids[row, span.first : len(span.ids)]  # (n,)
            logprob = -F.cross_entropy(logits, targets, reduction="sum").item()
            scores[i] = SpanScore(logprob, bool((logits.argmax(-1) == targets).all()))
    return [scores[i] for i in range(len(spans))]


def sliding_windows(n_tokens: int, max_length: int, stride: int) -> Iterator[tuple[int, int, int]]:
    """(begin, end, first scored) of each window, as in Hugging Face's perplexity guide.

    Windows start at 0, S, 2S, ... and cover [begin, min(begin + L, n)); each scores the tokens
    from the previous window's end to its own. A window's first token has no context inside it,
    so it is never scored: with S < L every token after the first is scored exactly once; with
    S = L the first token of each window is skipped, exactly as in the guide.
    """
    previous_end = 0
    for begin in range(0, n_tokens, stride):
        end = min(begin + max_length, n_tokens)
        yield begin, end, max(previous_end, begin + 1)
        previous_end = end
        if end == n_tokens:
            return


def check_window(model: GPT2, max_length: int | None, stride: int | None) -> tuple[int, int]:
    """Defaults: the model's context, and half of it as the stride (as in the guide)."""
    context = model.config.n_positions
    max_length = max_length or context
    stride = stride or max(1, max_length // 2)
    if not 2 <= max_length <= context:
        raise GPT2EngineError(f"max length must be in [2, {context}] (the model's context), got {max_length}")
    if not 1 <= stride <= max_length:
        raise GPT2EngineError(f"stride must be in [1, max length = {max_length}], got {stride}")
    return max_length, stride


def window_spans(ids: list[int], max_length: int, stride: int) -> list[Span]:
    return [Span(ids[begin:end], first - begin)
            for begin, end, first in sliding_windows(len(ids), max_length, stride)]


@dataclass(frozen=True)
class Perplexity:
    nll: float  # summed negative log-likelihood of the scored tokens, in nats
    tokens: int  # tokens scored
    bytes: int  # UTF-8 bytes of the scored tokens

    @property
    def perplexity(self) -> float:
        return math.exp(self.nll / self.tokens)

    @property
    def bits_per_byte(self) -> float:
        return self.nll / math.log(2) / self.bytes

    def __add__(self, other: Perplexity) -> Perplexity:
        return Perplexity(self.nll + other.nll, self.tokens + other.tokens, self.bytes + other.bytes)


def perplexity(
    model: GPT2, tokenizer: Tokenizer, text: str, max_length: int | None = None,
    stride: int | None = None, batch_size: int = 4, progress: bool = False,
) -> Perplexity:
    """Sliding-window perplexity of `text` (no token is added in front of it)."""
    max_length, stride = check_window(model, max_length, stride)
    ids = tokenizer.encode(text)
    if len(ids) < 2:
        raise GPT2EngineError(f"text of {len(ids)} token(s): perplexity needs at least 2")
    spans = window_spans(ids, max_length, stride)
    scores = score_spans(model, spans, batch_size, progress)
    scored_bytes = sum(len(tokenizer.token_bytes[t]) for s in spans for t in s.ids[s.first :])
    return Perplexity(-sum(s.logprob for s in scores), sum(len(s.ids) - s.first for s in spans),
                      scored_bytes)


def loglikelihood_rolling(
    model: GPT2, tokenizer: Tokenizer, text: str, max_length: int | None = None,
    stride: int | None = None, batch_size: int = 4,
) -> float:
    """Log-likelihood of the whole of `text`, every token scored: <|endoftext|> goes in front,
    so the first token is predicted too; long texts slide as in `perplexity`."""
    max_length, stride = check_window(model, max_length, stride)
    spans = window_spans([end_of_text(tokenizer), *tokenizer.encode(text)], max_length, stride)
    return sum(s.logprob for s in score_spans(model, spans, batch_size))


def split_request(tokenizer: Tokenizer, context: str, continuation: str) -> tuple[list[int], list[int]]:
    """Token ids of context and continuation, as lm-evaluation-harness makes them: trailing spaces
    of the context move to the continuation, and the two are tokenized as one text."""
    spaces = len(context) - len(context.rstrip(" "))
    if spaces:
        context, continuation = context[:-spaces], context[-spaces:] + continuation
    whole = tokenizer.encode(context + continuation)
    context_ids = tokenizer.encode(context) if context else []
    return (context_ids or [end_of_text(tokenizer)]), whole[len(context_ids) :]


def end_of_text(tokenizer: Tokenizer) -> int:
    """<|endoftext|>, the context a text is scored from when it has none of its own."""
    if tokenizer.eot_id is None:
        raise GPT2EngineError("the tokenizer has no <|endoftext|> to score a text's first token from")
    return tokenizer.eot_id


def request_span(context_ids: list[int], continuation_ids: list[int], max_length: int) -> Span:
    """The last max_length + 1 tokens (context cut on the left), the continuation scored."""
    if not continuation_ids:
        raise GPT2EngineError("empty continuation: nothing to score")
    if len(continuation_ids) > max_length:
        raise GPT2EngineError(
            f"continuation of {len(continuation_ids)} tokens exceeds the context of {max_length}"
        )
    ids = (context_ids + continuation_ids)[-(max_length + 1) :]
    return Span(ids, len(ids) - len(continuation_ids))


def loglikelihood(
    model: GPT2, tokenizer: Tokenizer, requests: Iterable[tuple[str, str]], batch_size: int = 8,
    progress: bool = False, prefix_cache_mib: float = DEFAULT_PREFIX_CACHE_MIB,
    prefill_chunk: int = DEFAULT_PREFILL_CHUNK,
) -> list[SpanScore]:
    """log P(continuation | context) and whether greedy decoding would produce it, per request:
    those that share a beginning with another scored by an engine of `batch_size` rows (its prefix
    cache and chunk as given), the rest by batched forward passes."""
    context = model.config.n_positions
    spans = [request_span(*split_request(tokenizer, c, x), context) for c, x in requests]
    shared = shared_beginnings(spans, prefill_chunk, context) if prefix_cache_mib else set()
    alone = [i for i in range(len(spans)) if i not in shared]
    forward = score_spans(model, [spans[i] for i in alone], batch_size, progress)
    scores = dict(zip(alone, forward, strict=True))
    if shared:
        engine = Engine(model, tokenizer, max_batch=batch_size, prefill_chunk=prefill_chunk,
                        prefix_cache_mib=prefix_cache_mib, cuda_graphs=False)
        ordered = sorted(shared)
        scores |= zip(ordered, score_in_engine(engine, [spans[i] for i in ordered], progress), strict=True)
    return [scores[i] for i in range(len(spans))]


def shared_beginnings(spans: list[Span], block: int, context: int) -> set[int]:
    """The spans the prefix cache can serve: their first block (a prefill chunk) is another's
    too, and they fit an engine row with the token it generates. The rest gain nothing from it
    and go faster as batched forward passes."""
    firsts = Counter(tuple(s.ids[:block]) for s in spans if len(s.ids) > block)
    return {i for i, s in enumerate(spans)
            if block < len(s.ids) < context and firsts[tuple(s.ids[:block])] > 1}


def score_in_engine(engine: Engine, spans: list[Span], progress: bool = False) -> list[SpanScore]:
    """Score each span as a request (in order, so that spans which begin alike follow each other
    into the prefix cache): its ids the prompt, its scored tokens' logprobs the prompt logprobs
    from `first` on, the top-1 there telling whether each was the argmax."""
    from tqdm import tqdm

    index: dict[str, int] = {}  # request id -> its span's
    scores: dict[int, SpanScore] = {}
    waiting = list(reversed(spans))
    with tqdm(total=len(spans), disable=not progress or None, unit="span", leave=False) as bar:
        while waiting or engine.has_work():
            while waiting:
                try:
                    request = engine.add_request(waiting[-1].ids, scoring(waiting[-1]))
                except QueueFull:
                    break
                index[request.request_id] = len(index)
                waiting.pop()
            for output in engine.step():
                if output.finished:
                    scores[index[output.request.request_id]] = span_score(output.request)
                    bar.update()
    return [scores[i] for i in range(len(spans))]


def span_score(request: Request) -> SpanScore:
    if request.finish_reason == "error":
        raise GPT2EngineError(request.error or "scoring failed")
    logprobs = request.prompt_logprobs
    targets = request.prompt_ids[request.options.prompt_logprobs_from :]
    return SpanScore(sum(lp.logprob for lp in logprobs),
                     all(next(iter(lp.top)) == t for lp, t in zip(logprobs, targets, strict=True)))


def scoring(span: Span) -> GenerationOptions:
    """A request that scores `span`: its tokens from `first` on, with the most likely one there."""
    return GenerationOptions(max_new_tokens=1, sampling=SamplingParams(temperature=0), ignore_eos=True,
                             prompt_logprobs=1, prompt_logprobs_from=span.first)


def read_jsonl(path: Path, fields: dict[str, type]) -> list[tuple[int, dict]]:
    """(line number, record) of each record in a .jsonl file, checked for `fields`."""
    records = []
    for number, line in enumerate(read_text(path).splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as error:
            raise GPT2EngineError(f"{path}:{number}: not valid JSON ({error.msg})") from None
        if not isinstance(record, dict):
            raise GPT2EngineError(f"{path}:{number}: expected a JSON object")
        for name, kind in fields.items():
            if not isinstance(record.get(name), kind):
                raise GPT2EngineError(f"{path}:{number}: field {name!r} missing or not {kind.__name__}")
        records.append((number, record))
    if not records:
        raise GPT2EngineError(f"{path}: no records")
    return records


MAX_TEXT_BYTES = 512 * 2**20  # enwik8 and text8 are 100 MB; /dev/zero is endless


def read_text(path: Path) -> str:
    try:
        with open(path, "rb") as handle:
            data = handle.read(MAX_TEXT_BYTES + 1)
    except FileNotFoundError:
        raise GPT2EngineError(f"{path}: no such file") from None
    except OSError as error:
        raise GPT2EngineError(f"{path}: cannot read ({error.strerror})") from None
    if len(data) > MAX_TEXT_BYTES:
        raise GPT2EngineError(f"{path}: more than {MAX_TEXT_BYTES // 2**20} MiB; split it into files")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as error:
        raise GPT2EngineError(f"{path}: not UTF-8 text (byte {error.start})") from None
    if not text.strip():
        raise GPT2EngineError(f"{path}: empty")
    return text


def read_lambada(path: Path) -> list[tuple[str, str]]:
    """(passage without its last word, " " + last word) per record {"text": ...} of a .jsonl file."""
    requests = []
    for number, record in read_jsonl(path, {"text": str}):
        context, space, word = record["text"].strip().rpartition(" ")
        if not space:
            raise GPT2EngineError(f"{path}:{number}: a single word, nothing to predict it from")
        requests.append((context, " " + word))
    return requests


def lambada(
    model: GPT2, tokenizer: Tokenizer, requests: list[tuple[str, str]], batch_size: int = 8,
    progress: bool = False,
) -> dict[str, float]:
    """The GPT-2 paper's LAMBADA protocol: predict each passage's last word from the rest.

    Accuracy counts passages whose last word greedy decoding reproduces token for token;
    perplexity is exp(-mean log-likelihood of the last word), over passages.
    """
    scores = loglikelihood(model, tokenizer, requests, batch_size, progress)
    return {"accuracy": sum(s.greedy for s in scores) / len(scores),
            "perplexity": math.exp(-sum(s.logprob for s in scores) / len(scores)),
            "examples": len(scores)}


def read_choices(path: Path) -> list[dict]:
    """Records {"context": str, "endings": [str, ...], "label": int} of a .jsonl file."""
    records = []
    for number, record in read_jsonl(path, {"context": str, "endings": list, "label": int}):
        endings = record["endings"]
        if len(endings) < 2 or not all(isinstance(e, str) and e for e in endings):
            raise GPT2EngineError(f"{path}:{number}: 'endings' must be 2 or more non-empty strings")
        if not 0 <= record["label"] < len(endings):
            raise GPT2EngineError(f"{path}:{number}: label {record['label']} is out of range")
        records.append(record)
    return records


def multiple_choice(
    model: GPT2, tokenizer: Tokenizer, records: list[dict], batch_size: int = 8,
    progress: bool = False,
) -> dict[str, float]:
    """Pick the ending with the highest log-likelihood (accuracy), or the highest per character
    (accuracy_norm), as lm-evaluation-harness scores HellaSwag. Endings are appended to the
    context as they are: start them with a space where words should be separated."""
    requests = [(r["context"], e) for r in records for e in r["endings"]]
    scores = iter(loglikelihood(model, tokenizer, requests, batch_size, progress))
    correct = correct_norm = 0
    for record in records:
        logprobs = [next(scores).logprob for _ in record["endings"]]
        normalised = [lp / len(e) for lp, e in zip(logprobs, record["endings"], strict=True)]
        correct += max(range(len(logprobs)), key=logprobs.__getitem__) == record["label"]
        correct_norm += max(range(len(normalised)), key=normalised.__getitem__) == record["label"]
    return {"accuracy": correct / len(records), "accuracy_norm": correct_norm / len(records),
            "examples": len(records)}
