"""The engine loop: `add_request`, `abort`, and `step()` = schedule -> run -> postprocess.

One engine serves the REPL, `gpt2 generate`, `complete`/`stream` and the HTTP server alike:
requests join a running batch as cache rows free up and leave it as soon as they finish, each
with its own sampling settings. The engine is single-threaded; the server drives it from a
thread of its own through `async_engine.py`, which hands it requests and aborts through a queue.
"""

from __future__ import annotations

import itertools
import secrets
import time
from collections.abc import Callable
from dataclasses import replace

import torch

from gpt2engine.engine.prefix_cache import DEFAULT_PREFIX_CACHE_MIB, PrefixCache
from gpt2engine.engine.request import FinishReason, GenerationOptions, Request, Status, StepOutput, TextState
from gpt2engine.engine.runner import Runner, Sampled
from gpt2engine.engine.scheduler import DEFAULT_MAX_QUEUE, DEFAULT_PREFILL_CHUNK, Scheduler
from gpt2engine.engine.speculative import DEFAULT_SPECULATIVE_TOKENS, DraftModel, PromptLookup, Speculation
from gpt2engine.errors import GPT2EngineError
from gpt2engine.hooks import Steering, check_hook, check_hooks
from gpt2engine.loading.runtime import check_vocabularies, load_draft
from gpt2engine.model import GPT2
from gpt2engine.tokenizer import Tokenizer


def fit_prompt(ids: list[int], context: int, options: GenerationOptions) -> list[int]:
    """Check the prompt + new tokens fit in the context, or keep its most recent tokens."""
    room = context - options.max_new_tokens
    if room < 1:
        raise GPT2EngineError(
            f"asking for {options.max_new_tokens} new tokens leaves no room for a prompt in the "
            f"model's context of {context} tokens"
        )
    if len(ids) <= room:
        return ids
    if options.truncate == "left":
        return ids[-room:]
    raise GPT2EngineError(
        f"prompt of {len(ids)} tokens + {options.max_new_tokens} new tokens exceeds the model's "
        f"context of {context} tokens; shorten it, ask for fewer new tokens, or truncate it on the left"
    )


def prompt_ids(model: GPT2, tokenizer: Tokenizer, prompt: str | list[int]) -> list[int]:
    """A prompt as token ids: text is encoded; ids are checked against both vocabularies."""
    if isinstance(prompt, str):
        ids = tokenizer.encode(prompt)
    elif isinstance(prompt, list) and all(type(t) is int for t in prompt):
        vocab = min(tokenizer.vocab_size, model.config.vocab_size)
        bad = [t for t in prompt if not 0 <= t < vocab]
        if bad:
            raise GPT2EngineError(f"token id {bad[0]} is out of range [0, {vocab})")
        ids = list(prompt)
    else:
        raise GPT2EngineError("a prompt is a string or a list of integer token ids")
    if not ids:
        if tokenizer.eot_id is None:
            raise GPT2EngineError("empty prompt, and the tokenizer has no <|endoftext|> to start from")
        ids = [tokenizer.eot_id]  # as OpenAI's unconditional samples start
    return ids


class Engine:
    def __init__(
        self, model: GPT2, tokenizer: Tokenizer, *, max_batch: int = 1, max_len: int | None = None,
        max_queue: int = DEFAULT_MAX_QUEUE, prefill_chunk: int = DEFAULT_PREFILL_CHUNK,
        cuda_graphs: bool = True, prefix_cache_mib: float = DEFAULT_PREFIX_CACHE_MIB,
        speculative: str | GPT2 | None = None, speculative_tokens: int = DEFAULT_SPECULATIVE_TOKENS,
        speculative_dtype: str = "auto", max_batched_tokens: int | None = None,
    ) -> None:
        """`max_batch` cache rows of `max_len` positions (default: the model's context) each; on
        CUDA the decode step is captured as CUDA graphs unless not `cuda_graphs` (engine/graphs.py).
        Prompts' whole prefill chunks are kept, up to `prefix_cache_mib` MiB (0: none), for the
        requests that start the same way (engine/prefix_cache.py). `speculative`: "ngram" (prompt
        lookup), or a draft model of the same vocabulary (a GPT2, or a folder or Hub id loaded on the
        model's device in `speculative_dtype`), proposes up to `speculative_tokens` tokens a step,
        which one step verifies (engine/speculative.py). A step computes up to `max_batched_tokens`
        tokens, decoding rows and prompt chunks together (engine/scheduler.py)."""
        check_vocabularies(model, tokenizer)
        if not prefix_cache_mib >= 0:
            raise GPT2EngineError(f"the prefix cache's size must be >= 0 MiB, got {prefix_cache_mib}")
        self.model, self.tokenizer = model, tokenizer
        self.max_len = max_len or model.config.n_positions
        self.prefix_cache = (PrefixCache(prefill_chunk, int(prefix_cache_mib * 2**20))
                             if prefix_cache_mib else None)
        self.scheduler = Scheduler(max_batch, max_queue, prefill_chunk, self.prefix_cache, max_batched_tokens)
        self.runner = Runner(model, max_batch, self.max_len, tokenizer.vocab_size, cuda_graphs,
                             self.prefix_cache)
        self.requests: dict[str, Request] = {}
        self.ended: list[StepOutput] = []  # aborts since the last step, reported by the next
        self.ids = itertools.count()
        self.speculation = self.speculation_of(speculative, speculative_tokens, speculative_dtype, max_batch)

    def speculation_of(self, speculative: str | GPT2 | None, tokens: int, dtype: str,
                       max_batch: int) -> Speculation | None:
        if speculative is None:
            return None
        if speculative == "ngram":
            return Speculation(PromptLookup(), tokens)
        if isinstance(speculative, str):
            speculative = load_draft(speculative, self.model, self.tokenizer, dtype)
        if not isinstance(speculative, GPT2):
            raise GPT2EngineError(f"speculative is 'ngram' or a draft model, got {speculative!r}")
        draft, config = speculative.config, self.model.config
        if draft.vocab_size != config.vocab_size:
            raise GPT2EngineError(f"the draft model's vocabulary has {draft.vocab_size} tokens, the "
                                  f"model's {config.vocab_size}: a draft must share the model's vocabulary")
        if draft.n_positions < self.max_len:
            raise GPT2EngineError(f"the draft model's context of {draft.n_positions} is shorter than the "
                                  f"engine's rows of {self.max_len}")
        return Speculation(DraftModel(speculative, max_batch, self.max_len, self.runner.vocab_limit), tokens)

    def add_request(
        self, prompt: str | list[int], options: GenerationOptions | None = None,
        request_id: str | None = None,
    ) -> Request:
        """Queue a request (raises QueueFull when the waiting queue is at its limit)."""
        options = options or GenerationOptions()
        request_id = request_id or f"req-{next(self.ids)}"
        if request_id in self.requests:
            raise GPT2EngineError(f"request id {request_id!r} is already in use")
        ids = fit_prompt(prompt_ids(self.model, self.tokenizer, prompt), self.max_len, options)
        options = self.with_checked_hooks(options)
        seed = options.sampling.seed if options.sampling.seed is not None else secrets.randbits(64)
        request = Request(request_id, ids, options, seed, TextState(self.tokenizer, options))
        self.scheduler.add(request)
        self.requests[request_id] = request
        return request

    def abort(self, request_id: str) -> None:
        """Stop a request now (a closed connection, Ctrl-C); its row is free for the next step."""
        request = self.requests.get(request_id)
        if request is not None:
            self.finish(request, "abort")
            self.ended.append(StepOutput(request, None, "", None, True))

    def finish(self, request: Request, reason: FinishReason, error: str | None = None) -> None:
        request.status, request.finish_reason, request.error = Status.FINISHED, reason, error
        if self.speculation is not None:
            self.speculation.forget(request)
        self.scheduler.remove(request)
        self.requests.pop(request.request_id, None)

    def abort_all(self) -> None:
        """Abort every request, running or waiting (a server draining)."""
        for request_id in list(self.requests):
            self.abort(request_id)

    def fail_all(self, error: Exception) -> list[StepOutput]:
        """End every request with `error` and start afresh (a step failed outside any request)."""
        outputs = [self.fail(request, error) for request in list(self.requests.values())]
        self.reset()
        return outputs

    def reset(self) -> None:
        """Drop every request (after Ctrl-C landed somewhere inside a step)."""
        s = self.scheduler
        self.scheduler = Scheduler(s.max_batch, s.max_queue, s.prefill_chunk, self.prefix_cache,
                                   s.max_batched_tokens)
        if self.prefix_cache is not None:
            self.prefix_cache.unpin_all()
        self.requests.clear()
        self.ended.clear()

    def prompt_ids(self, prompt: str | list[int]) -> list[int]:
        """A prompt as token ids, checked against both vocabularies (text is encoded)."""
        return prompt_ids(self.model, self.tokenizer, prompt)

    def with_checked_hooks(self, options: GenerationOptions) -> GenerationOptions:
        """`options` with its capture and steering checked against the model, and the vectors of
        steerings given as two prompts computed (once: a caller reusing options keeps them)."""
        check_hooks(options.capture, self.model.config.n_layer)
        for steering in options.steer:
            steering.check(self.model.config.n_layer, self.model.config.n_embd)
        if not any(s.from_prompts for s in options.steer):
            return options
        return replace(options, steer=tuple(
            self.steering_from_prompts(s.hook, *s.from_prompts, s.coefficient, s.start) if s.from_prompts
            else s for s in options.steer))

    def steering_from_prompts(self, hook: str, positive: str | list[int], negative: str | list[int],
                              coefficient: float = 1.0, start: int = 0) -> Steering:
        """Activation addition's vector from two prompts (ActAdd's "Love" - "Hate"): the difference
        of their activations at `hook` at each one's last token, as control vectors take it."""
        check_hook(hook, self.model.config.n_layer, steering=True)
        ends = []
        for prompt in (positive, negative):
            ids = torch.tensor([self.prompt_ids(prompt)[-self.model.config.n_positions:]])
            ends.append(self.model.run_with_cache(ids, [hook])[1][hook][0, -1])
        return Steering(hook, (ends[0] - ends[1]).tolist(), coefficient, start)

    @property
    def running(self) -> int:
        """Requests holding a cache row."""
        return self.scheduler.rows_in_use

    @property
    def waiting(self) -> int:
        """Requests queued for a row."""
        return len(self.scheduler.waiting)

    @property
    def max_batch(self) -> int:
        return self.scheduler.max_batch

    def has_work(self) -> bool:
        """Requests to run, or aborts that the next step() still has to report."""
        return bool(self.requests or self.ended)

    def step(self) -> list[StepOutput]:
        """Admit, prefill a chunk, decode one token for every running request, and report."""
        outputs, self.ended = self.ended, []
        schedule = self.scheduler.schedule()
        for request in schedule.admitted:
            self.runner.assign(request)
        ready: list[Request] = []
        logits: list[torch.Tensor] = []
        for chunk in schedule.prefill:
            request = chunk.request
            try:
                last = self.runner.prefill(chunk)
            except Exception as error:
                outputs.append(self.fail(request, error))
                continue
            request.prefilled = chunk.stop
            if last is not None:
                request.status = Status.DECODING
                ready.append(request)
                logits.append(last[None])
        decoding = schedule.decode
        try:
            drafts, started = {}, time.perf_counter()
            if self.speculation is not None and decoding:
                drafts = self.speculation.propose(decoding, self.max_len)
            if drafts:
                assert self.speculation is not None
                proposed = time.perf_counter()
                rows = self.runner.verify(decoding, drafts)
                count = sum(map(len, drafts.values()))
                self.speculation.timed(proposed - started, count, time.perf_counter() - proposed,
                                       len(decoding) + count)
                self.accept(decoding + ready, rows + logits, drafts, outputs)
                return outputs
            if decoding:
                logits.insert(0, self.runner.decode(decoding))
                if self.speculation is not None:
                    self.speculation.timed_plain(time.perf_counter() - started, len(decoding))
            batch = decoding + ready
            if batch:
                joined = logits[0] if len(logits) == 1 else torch.cat(logits)
                outputs += self.postprocess(batch, self.runner.sample(batch, joined))
        except Exception as error:
            outputs += [self.fail(r, error) for r in decoding + ready if not r.finished]
        return outputs

    def accept(self, batch: list[Request], rows: list[torch.Tensor], drafts: dict[Request, list[int]],
               outputs: list[StepOutput]) -> None:
        """Each request's tokens from its logits rows (1 + k, V), position by position as plain
        decoding would draw them, while the drawn token equals the one proposed there; the first
        that differs (or the one after the last proposal) is the model's own, and ends the step.
        Into `outputs` as they come, so that an error midway loses none already produced."""
        assert self.speculation is not None
        draw = self.positions_drawn(batch, rows)
        active, j = list(range(len(batch))), 0
        while active:
            requests = [batch[i] for i in active]
            sampled = draw(active, j)
            outputs += self.postprocess(requests, sampled)
            going = []
            for i, token in zip(active, sampled.tokens, strict=True):
                request, draft = batch[i], drafts.get(batch[i], [])
                kept = j < len(draft) and token == draft[j]
                if kept and not request.finished:
                    going.append(i)
                elif draft:
                    self.speculation.verified(request, len(draft), j + kept)
            active, j = going, j + 1

    def positions_drawn(self, batch: list[Request], rows: list[torch.Tensor]
                        ) -> Callable[[list[int], int], Sampled]:
        """(requests i, position j) -> their tokens there. Where every token is an argmax, all
        positions are read at once, else each position is drawn after the one before it (a draw's
        counter and penalties depend on the tokens before)."""
        if not self.runner.argmax_only(batch):
            return lambda active, j: self.runner.sample([batch[i] for i in active],
                                                         torch.stack([rows[i][j] for i in active]))
        every = self.runner.greedy(rows[0] if len(rows) == 1 else torch.cat(rows))
        first = [0, *itertools.accumulate(len(r) for r in rows)]
        return lambda active, j: Sampled([every.tokens[first[i] + j] for i in active], [None] * len(active),
                                         [every.finite[first[i] + j] for i in active])

    def fail(self, request: Request, error: Exception) -> StepOutput:
        message = str(error) if isinstance(error, GPT2EngineError) else f"internal error: {error!r}"
        self.finish(request, "error", message)
        return StepOutput(request, None, "", None, True)

    def postprocess(self, batch: list[Request], sampled) -> list[StepOutput]:
        outputs = []
        for request, token, logprob, finite in zip(batch, sampled.tokens, sampled.logprobs,
                                                   sampled.finite, strict=True):
            if not finite:
                outputs.append(self.fail(request, GPT2EngineError(
                    "the model produced non-finite logits (NaN or inf); its weights or config "
                    "are broken")))
                continue
            request.first_token_at = request.first_token_at or time.monotonic()
            before = len(request.output_ids)
            piece = request.text.push(token)
            if request.text.finish_reason is not None:
                self.runner.capture_last(request)
                self.finish(request, request.text.finish_reason)
            if len(request.output_ids) == before:  # <|endoftext|>: it ends the output, not in it
                token, logprob = None, None
            outputs.append(StepOutput(request, token, piece, logprob, request.finished))
        return outputs

    def run(self, requests: list[Request]):
        """Step until `requests` are finished, yielding their outputs (other requests' too)."""
        try:
            while not all(r.finished for r in requests):
                yield from self.step()
        finally:  # the caller stopped early (Ctrl-C, an error, break): free their rows
            for request in requests:
                if not request.finished:
                    self.abort(request.request_id)
            self.ended.clear()

