"""The tensors: the model, the preallocated KV cache, and the per-row sampling state.

The runner prefills one request's chunk into its own row, runs one batched decode step over the
rows in use (0..hi-1; a free or still-prefilling row in between computes a throwaway token in
the cache's last slot, which no request ever reads), and samples every row's next token in one
call with each row's own parameters. The decode step is our C kernels on the CPU (kernels/step.py),
CUDA graphs on a GPU (graphs.py), else the model's own forward.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from gpt2engine.engine.activations import RequestHooks
from gpt2engine.engine.graphs import GraphedDecode
from gpt2engine.engine.prefix_cache import RECORDED_TOP, Block, BlockLogprobs, PrefixCache
from gpt2engine.engine.request import Request, TokenLogprob
from gpt2engine.engine.scheduler import PrefillChunk
from gpt2engine.hooks import NO_HOOKS, Hooks
from gpt2engine.kernels import rows_argmax, rows_finite
from gpt2engine.kernels.step import DecodeStep
from gpt2engine.model import GPT2
from gpt2engine.sampling import RowSettings, as_int64, draw, process_rows, row_dtype
from gpt2engine.sampling_params import ROW_DEFAULTS, SamplingParams

# Every step of the sampling pipeline, run once by warm_up
WARM_UP_SAMPLING = SamplingParams(temperature=0.8, top_k=40, top_p=0.9, min_p=0.05, repetition_penalty=1.1,
                                  presence_penalty=0.1, frequency_penalty=0.1, logit_bias={0: 1.0})


@dataclass(frozen=True)
class Sampled:
    tokens: list[int]
    logprobs: list[TokenLogprob | None]
    finite: list[bool]  # False where the model produced NaN or inf: that request fails


class Runner:
    def __init__(
        self, model: GPT2, max_batch: int, max_len: int, vocab_limit: int, cuda_graphs: bool = True,
        prefix_cache: PrefixCache | None = None,
    ) -> None:
        """`prefix_cache`'s blocks are the scheduler's prefill chunks."""
        self.model, self.max_len = model, max_len
        self.prefix_cache = prefix_cache
        self.cache = model.make_cache(max_batch, max_len)
        # Padded vocabularies (a model with more rows than the tokenizer has tokens) never
        # produce an id the tokenizer lacks.
        self.vocab_limit = min(vocab_limit, model.config.vocab_size)
        B, V, device = max_batch, model.config.vocab_size, model.device
        self.row_params = {name: torch.full((B,), default, dtype=row_dtype(name), device=device)
                           for name, default in ROW_DEFAULTS.items()}  # each (B,): sampling_params.py
        self.seeds = torch.zeros(B, dtype=torch.long, device=device)
        self.seen = torch.zeros(B, V, dtype=torch.bool, device=device)  # prompt and output tokens
        self.counts = torch.zeros(B, V, dtype=torch.int32, device=device)  # output tokens
        self.bias = torch.zeros(B, V, device=device)
        # The decode step's fast paths, each None where it does not apply (then: model.forward)
        self.fused_step = DecodeStep.build(model, self.cache)
        if device.type == "cuda":  # cuBLAS and the kernels load now, not in a user's first request
            self.warm_up()
        self.graphed = GraphedDecode.build(model, self.cache) if cuda_graphs else None

    def assign(self, request: Request) -> None:
        """Set up the row's sampling state for a newly admitted request."""
        row, params, V = request.held_row, request.options.sampling, self.model.config.vocab_size
        for name, value in params.row_values().items():
            self.row_params[name][row] = value
        self.seeds[row] = as_int64(request.seed)
        self.seen[row] = False
        self.seen[row, request.prompt_ids] = True
        self.counts[row] = 0
        self.bias[row] = 0
        for token, bias in params.logit_bias.items():
            if token < V:
                self.bias[row, token] = bias
        if request.options.hooked:
            options, model = request.options, self.model
            request.hooks = RequestHooks(options.capture, options.steer, model.config.n_layer, model.dtype,
                                         model.device)

    @torch.inference_mode()
    def warm_up(self) -> None:
        """A throwaway prompt chunk in row 0 and a draw from it with every sampling step, so that
        the device's libraries and kernels are loaded before the first request. A request's prefill
        overwrites the slots it reads."""
        T, device = min(8, self.max_len), self.model.device
        view = [layer.rows(0, 1) for layer in self.cache]
        positions = torch.arange(T, device=device)[None]
        hidden = self.model.hidden_states(torch.zeros_like(positions), positions, view, T)
        logits = self.known_tokens(self.model.lm_head(hidden[0, -1:]))  # (1, V)
        settings = RowSettings.of([WARM_UP_SAMPLING], device)
        logits = process_rows(logits, self.seen[:1], self.counts[:1], self.bias[:1], settings)
        draw(logits, self.seeds[:1], self.seeds[:1]).tolist()
        self.greedy(logits)

    @torch.inference_mode()
    def prefill(self, chunk: PrefillChunk) -> torch.Tensor | None:
        """Copy the chunk's cached blocks into the request's row, then write prompt tokens
        [start, stop) -> logits of the last prompt token (V,) when this chunk ends the prompt,
        else None. A whole computed block is offered to the prefix cache."""
        request, start, stop = chunk.request, chunk.start, chunk.stop
        device, row, prompt = self.model.device, request.held_row, request.prompt_ids
        view = [layer.rows(row, row + 1) for layer in self.cache]
        top, cache = request.options.prompt_logprobs, None if request.hooks else self.prefix_cache
        if cache is not None:
            begin = start - len(chunk.cached) * cache.block
            if begin == 0:  # the request's first chunk: looked up once
                cache.looked_up(len(prompt))
            if chunk.cached:
                self.copy_cached(request, chunk.cached, view, begin)
        whole_block = cache is not None and stop - start == cache.block
        ids = torch.tensor([prompt[start:stop]], device=device)  # (1, T)
        positions = torch.arange(start, stop, device=device)[None]  # (1, T)
        hooks = request.hooks.for_positions(start, stop) if request.hooks else NO_HOOKS
        hidden = self.model.hidden_states(ids, positions, view, stop, hooks)[0]  # (T, C)
        if request.hooks:
            request.hooks.keep(hooks, stop)
        record = None
        first = max(start + 1, request.options.prompt_logprobs_from)  # the first token to score here
        if top is not None and first <= stop:  # the logprob of each next prompt token, and the top-N
            targets = prompt[first : stop + 1]
            rows = hidden[first - 1 - start : first - 1 - start + len(targets)]
            logprobs = self.log_softmax(self.model.lm_head(rows))  # (n, V)
            kept = max(top, RECORDED_TOP)
            entries = token_logprobs(logprobs, targets, kept)
            request.prompt_logprobs += [e.truncated(top) for e in entries]
            if whole_block and len(targets) == stop - start:  # a whole block with the token after it
                record = BlockLogprobs(entries, logprobs[-1].clone(), kept)
        if whole_block:
            assert cache is not None
            cache.insert(prompt, start // cache.block, view, record)
        return self.model.lm_head(hidden[-1]) if stop == len(prompt) else None

    def copy_cached(self, request: Request, blocks: tuple[Block, ...], view: list, start: int) -> None:
        """The prefix cache's blocks into the row from `start`, with their prompt logprobs."""
        cache = self.prefix_cache
        assert cache is not None
        cache.load(list(blocks), view, start)
        C = cache.block
        request.cached_tokens += len(blocks) * C
        top, scored_from = request.options.prompt_logprobs, request.options.prompt_logprobs_from
        if top is not None:
            for j, block in enumerate(blocks):
                begin = start + j * C  # its entries score tokens begin + 1 .. begin + C
                if begin + C < scored_from:
                    continue
                assert block.logprobs is not None  # matched only if it has them
                following = request.prompt_ids[begin + C]
                entries = block.logprobs.for_next(following, top)
                request.prompt_logprobs += entries[max(0, scored_from - begin - 1) :]

    @torch.inference_mode()
    def decode(self, requests: list[Request]) -> torch.Tensor:
        """Feed each request's last token -> their logits (n, V). Requests whose hooks the fused
        step cannot tap run one by one through the model's forward pass; the others in one batch,
        where such a row counts as not decoding, so their bits are those of a batch without it."""
        fused = self.fused_step is not None
        alone = [r for r in requests if r.hooks and not (fused and r.hooks.in_step)]
        if not alone:
            return self.decode_batch(requests)
        batch = [r for r in requests if r not in alone]
        by_request = dict(zip(batch, self.decode_batch(batch) if batch else [], strict=True))
        by_request |= {r: self.decode_hooked(r) for r in alone}
        return torch.stack([by_request[r] for r in requests])

    def decode_hooked(self, request: Request) -> torch.Tensor:
        """Feed the last token of a request that captures or steers, alone in its row -> logits (V,)."""
        assert request.hooks is not None
        position = request.position
        hooks = request.hooks.for_positions(position, position + 1)
        logits = self.feed_row(request, request.output_ids[-1:], hooks)
        request.hooks.keep(hooks, position + 1)
        return logits[-1]

    @torch.inference_mode()
    def capture_last(self, request: Request) -> None:
        """A finishing request's last output token, which no step feeds, through the model for its
        activations, so they cover every token of the prompt and the output."""
        if request.hooks and request.hooks.capture and request.hooks.covered == request.position:
            self.decode_hooked(request)

    @torch.inference_mode()
    def verify(self, requests: list[Request], drafts: dict[Request, list[int]]) -> list[torch.Tensor]:
        """Feed each request's last token and the tokens proposed after it (speculative.py) -> per
        request, the logits after each (1 + k, V). On the CPU all in one fused step, each position
        its own row, so their logits are plain decoding's bits; elsewhere a request with proposals
        feeds them in one forward pass of its row (the same logits within rounding)."""
        if self.fused_step is not None:
            return list(self.fused(requests, drafts).split([1 + len(drafts.get(r, [])) for r in requests]))
        plain = [r for r in requests if r not in drafts]
        by_request = dict(zip(plain, self.decode(plain) if plain else [], strict=True))
        return [self.feed_row(r, [r.output_ids[-1], *drafts[r]]) if r in drafts else by_request[r][None]
                for r in requests]

    def feed_row(self, request: Request, tokens: list[int], hooks: Hooks = NO_HOOKS) -> torch.Tensor:
        """Tokens into a request's row from its position, through the model's forward -> (T, V)."""
        device, row, start = self.model.device, request.held_row, request.position
        view = [layer.rows(row, row + 1) for layer in self.cache]
        positions = torch.arange(start, start + len(tokens), device=device)[None]
        ids = torch.tensor([tokens], device=device)
        return self.model(ids, positions, view, start + len(tokens), hooks)[0]

    def fused(self, requests: list[Request], drafts: dict[Request, list[int]]) -> torch.Tensor:
        """One fused step: each request's last token and its proposals, a step row each, in its
        cache row (the taps of a request that captures or steers, which never has proposals) ->
        the logits of every step row, request after request (sum of 1 + k, V)."""
        assert self.fused_step is not None
        feeds = [[r.output_ids[-1], *drafts.get(r, [])] for r in requests]
        tokens = [t for feed in feeds for t in feed]
        positions = [r.position + i for r, feed in zip(requests, feeds, strict=True)
                     for i in range(len(feed))]
        rows = [r.held_row for r, feed in zip(requests, feeds, strict=True) for _ in feed]
        firsts = [sum(map(len, feeds[:i])) for i in range(len(feeds))]  # each request's first step row
        steer, capture = self.step_taps(requests, firsts, len(tokens))
        logits = self.fused_step(tokens, positions, steer, capture, rows)  # (rows, V)
        for r, first in zip(requests, firsts, strict=True):
            if r.hooks:
                r.hooks.keep_step(capture, first, r.position)
        return logits

    def decode_batch(self, requests: list[Request]) -> torch.Tensor:
        """Feed each request's last token (rows 0..hi-1 in one batch) -> their logits (n, V)."""
        if self.fused_step is not None:  # the whole step in one call of our kernels
            return self.fused(requests, {})
        hi = max(r.held_row for r in requests) + 1
        tokens = [0] * hi
        positions = [self.max_len - 1] * hi  # rows not decoding write the never-read last slot
        for r in requests:
            tokens[r.held_row], positions[r.held_row] = r.output_ids[-1], r.position
        length = max(r.position for r in requests) + 1
        if self.graphed is not None:  # the whole step in one graph replay
            logits = self.graphed(tokens, positions, length)
        else:
            device = self.model.device
            view = [layer.rows(0, hi) for layer in self.cache]
            logits = self.model(torch.tensor(tokens, device=device)[:, None],
                                torch.tensor(positions, device=device)[:, None], view, length)[:, -1]
        rows = [r.row for r in requests]
        return logits if rows == list(range(hi)) else logits[rows]  # (n, V); most often all rows

    def step_taps(self, requests: list[Request], firsts: list[int], B: int) -> tuple[dict[int, torch.Tensor],
                                                                                 dict[int, torch.Tensor]]:
        """The fused step's taps over its B rows, request i's at row firsts[i]: tap -> the (B, C)
        added there (zero in rows that do not steer it), tap -> the (B, C) it is captured into."""
        steer: dict[int, torch.Tensor] = {}
        capture: dict[int, torch.Tensor] = {}
        C = self.model.config.n_embd
        for r, first in zip(requests, firsts, strict=True):
            if r.hooks:
                for index, add in r.hooks.step_steering(r.position).items():
                    steer.setdefault(index, torch.zeros(B, C))[first] = add
                for name in r.hooks.capture:
                    capture.setdefault(r.hooks.tap(name), torch.empty(B, C))
        return steer, capture

    def known_tokens(self, logits: torch.Tensor) -> torch.Tensor:
        # (n, V) -> (n, V) float32, -inf past the tokens the tokenizer knows
        logits = logits.float()
        if self.vocab_limit < logits.shape[-1]:
            logits[..., self.vocab_limit :] = float("-inf")
        return logits

    def log_softmax(self, logits: torch.Tensor) -> torch.Tensor:
        # (n, V) -> (n, V) float32, over the tokens the tokenizer knows
        return self.known_tokens(logits).log_softmax(dim=-1)

    @staticmethod
    def argmax_only(requests: list[Request]) -> bool:
        """Whether every request's token is the argmax of its logits: no draw, penalty or logprob
        depends on the tokens before it, so many positions can be read at once."""
        return all(r.options.sampling.argmax_only and r.options.logprobs is None for r in requests)

    @torch.inference_mode()
    def sample(self, requests: list[Request], logits: torch.Tensor) -> Sampled:
        """The next token of each request from its logits (n, V), each with its own settings."""
        if self.argmax_only(requests):
            return self.greedy(logits)  # the common case, in a few small steps
        device = logits.device
        rows = torch.tensor([r.row for r in requests], device=device)
        params = [r.options.sampling for r in requests]
        logits = self.known_tokens(logits)
        finite = rows_finite(logits, self.vocab_limit)
        if not bool(finite.all()):  # rare: a failing row must not disturb the others' draw
            logits = torch.nan_to_num(logits, nan=0.0)
        logprobs: list[TokenLogprob | None] = [None] * len(requests)
        raw = logits.log_softmax(dim=-1) if any(r.options.logprobs is not None for r in requests) else None
        settings = RowSettings(**{name: column[rows] for name, column in self.row_params.items()},
                               params=params)
        logits = process_rows(  # each (n, V) state is gathered only when some row uses it
            logits, self.seen[rows] if settings.uses_seen else None,
            self.counts[rows] if settings.uses_counts else None,
            self.bias[rows] if settings.uses_bias else None, settings)
        tokens = rows_argmax(logits)
        if not all(p.greedy for p in params):
            draws = torch.tensor([len(r.output_ids) for r in requests], device=device)
            sampled = draw(logits, self.seeds[rows], draws)
            tokens = torch.where(settings.temperature == 0, tokens, sampled)
        self.seen[rows, tokens] = True
        self.counts[rows, tokens] += 1
        token_list = tokens.tolist()
        if raw is not None:
            for i, r in enumerate(requests):
                if r.options.logprobs is not None:
                    [logprobs[i]] = token_logprobs(raw[i : i + 1], token_list[i : i + 1], r.options.logprobs)
        return Sampled(token_list, logprobs, finite.tolist())

    def greedy(self, logits: torch.Tensor) -> Sampled:
        """The argmax of each row's logits (n, V) over the tokens the tokenizer knows. The rows'
        `seen` and `counts` are left as they are: only penalties read them, and a request's
        settings do not change, so a row that is sampled here never has them read."""
        logits = logits[:, : self.vocab_limit]
        finite = rows_finite(logits, self.vocab_limit).long()
        tokens, finite = torch.stack((rows_argmax(logits), finite)).tolist()  # one read from the device
        return Sampled(tokens, [None] * len(tokens), [bool(f) for f in finite])


def token_logprobs(logprobs: torch.Tensor, targets: list[int], top: int) -> list[TokenLogprob]:
    # logprobs: (n, V), targets: n token ids -> each target's logprob and the top-`top` tokens
    index = torch.tensor(targets, dtype=torch.long, device=logprobs.device)
    chosen = logprobs[torch.arange(len(targets), device=logprobs.device), index].tolist()
    best = logprobs.topk(top, dim=-1) if top else None
    return [TokenLogprob(chosen[i], dict(zip(best.indices[i].tolist(), best.values[i].tolist(),
                                             strict=True)) if best is not None else {})
            for i in range(len(targets))]
