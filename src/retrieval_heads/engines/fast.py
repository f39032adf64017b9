"""Fast engine: plain SDPA generation with a KV cache, plus each head's argmax over one row.

Design. A custom attention function is registered under `retrieval_heads_argmax` (transformers'
`AttentionInterface`, with SDPA's mask builder). It receives exactly what SDPA would receive --
post-RoPE query states, the key states after the cache update (sliding layers: only the keys
inside the window) and the prepared mask -- computes the weights of the *last* query row only,

    w = softmax(q_last . K^T * scaling [tanh soft-cap] + mask, fp32).to(model dtype)

takes the argmax per query head (GQA: query head h reads KV head h // (n_heads / n_kv_heads), the
order of HF `repeat_kv`), then hands the call to SDPA for the actual output. The function is
active only inside `capture_argmax(model)`, which swaps the model's attention implementation and
always restores it.

The prompt is prefilled in one forward (the last prompt position produces the first token, its row
is recorded during prefill), then each decode step records its single row. Logits are computed
for the last position only (`logits_to_keep=1`). Nothing O(n^2) is ever materialised: per step,
one `[n_heads, key_pos]` row per layer.

Tie policy (same as the reference): the weights are rounded like eager attention's (softmax in
fp32, cast to the model dtype) and `argmax` returns the first maximal index, i.e. the lowest key
position. Remaining differences to the reference come only from SDPA vs eager floating-point
rounding of hidden states (~1e-6 in fp32); tests assert identical generations and copy decisions.

Prefix reuse (`run_many`): see `prefix.py`.

Batching (`run_batch`, `batch_size > 1`): rows are left-padded to one length, each gets its own
position ids (counted from its first real token, so RoPE sees the positions of batch 1) and an
attention mask hiding the padding; a row's recorded argmax is shifted back by its padding. A
finished row keeps stepping (its tokens are ignored) until every row has stopped. With prefix
reuse each row is prefilled alone from its cached prefix and the per-row caches are merged
(left-padded) for a batched decode; without, the prompts are prefilled as one padded batch.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from ..compat import cache_kwargs
from ..decoding import greedy
from ..models import LoadedModel, attention_implementation, attention_modules
from ..needles import Sample
from .base import ROW_SCORES, EngineOutput, query_focus, row_scores
from .prefix import PrefixStore

IMPL_NAME = "retrieval_heads_argmax"


@dataclass
class _Recorder:
    """Rows recorded during one forward: layer -> (argmax `[batch, n_heads]`, key length K, the
    row's fp32 weights `[batch, n_heads, K]` for the attention scores)."""

    layer_of: dict[int, int]
    rows: dict[int, tuple[torch.Tensor, int, torch.Tensor]] = field(default_factory=dict)
    active: bool = True
    # query focus of a prefill: what to measure, and layer -> `[n_requests, n_heads]`
    focus_requests: list[FocusRequest] = field(default_factory=list)
    focus: dict[int, torch.Tensor] = field(default_factory=dict)


@dataclass(frozen=True)
class FocusRequest:
    """Measure the query focus of batch row `b` in the next multi-token forward, whose first query
    sits at position `first`; positions of the question, the scored span and the document are in
    that forward's numbering (padded positions in a left-padded batch)."""

    b: int
    first: int
    question: tuple[int, int]
    span: tuple[int, int]
    document: tuple[int, int]


_RECORDER: ContextVar[_Recorder | None] = ContextVar("retrieval_heads_recorder", default=None)


def last_row_argmax(
    query: torch.Tensor,
    key: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float | None,
    softcap: float | None = None,
) -> torch.Tensor:
    """Argmax key index of the last query row, per batch and query head.

    query `[batch, n_heads, q_len, head_dim]`, key `[batch, n_kv_heads, key_len, head_dim]`,
    attention_mask `[batch|1, 1|n_heads, q_len, key_len]` (bool: True = attend; float: additive)
    or None. Returns int64 `[batch, n_heads]`, indices into key_len.
    """
    weights = last_row_weights(query, key, attention_mask, scaling, softcap)
    return weights.to(query.dtype).argmax(dim=-1)


def last_row_weights(
    query: torch.Tensor,
    key: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float | None,
    softcap: float | None = None,
) -> torch.Tensor:
    """The last query row's attention weights, fp32 `[batch, n_heads, key_len]` (see
    `last_row_argmax` for the shapes). Rounded to the model dtype they are eager attention's."""
    b, h, _, d = query.shape
    kv, k_len = key.shape[1], key.shape[2]
    q = query[:, :, -1, :].reshape(b, kv, h // kv, d)  # [batch, kv_head, group, dim] = repeat_kv order
    scale = d**-0.5 if scaling is None else scaling
    logits = torch.matmul(q, key.transpose(-1, -2)) * scale  # [batch, kv_head, group, key_pos]
    logits = logits.reshape(b, h, k_len)
    if softcap is not None:
        logits = torch.tanh(logits / softcap) * softcap
    if attention_mask is not None:
        m = attention_mask[:, :, -1, -k_len:]  # [batch|1, 1|head, key_pos]
        logits = logits.masked_fill(~m, float("-inf")) if m.dtype == torch.bool else logits + m
    return torch.softmax(logits, dim=-1, dtype=torch.float32)


def question_focus(
    query: torch.Tensor,
    key: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float | None,
    softcap: float | None,
    req: FocusRequest,
) -> torch.Tensor:
    """`[n_heads]` query focus (`base.query_focus`) of the question's rows of batch row `req.b`,
    from the weights SDPA would compute for those rows (fp32 softmax, as `last_row_weights`)."""
    _, h, q_len, d = query.shape
    kv, k_len = key.shape[1], key.shape[2]
    r0, r1 = req.question[0] - req.first, req.question[1] - req.first
    q = query[req.b, :, r0:r1, :].reshape(kv, h // kv, r1 - r0, d)  # repeat_kv order
    scale = d**-0.5 if scaling is None else scaling
    logits = (torch.matmul(q, key[req.b, :, None].transpose(-1, -2)) * scale).reshape(h, r1 - r0, k_len)
    if softcap is not None:
        logits = torch.tanh(logits / softcap) * softcap
    if attention_mask is not None:
        m = attention_mask[min(req.b, attention_mask.shape[0] - 1), :, r0:r1, -k_len:]  # [1|heads, rows, K]
        logits = logits.masked_fill(~m, float("-inf")) if m.dtype == torch.bool else logits + m
    weights = torch.softmax(logits, dim=-1, dtype=torch.float32)
    last = req.first + q_len  # keys end at the forward's last query position
    key_pos = torch.arange(last - k_len, last, device=query.device)
    return query_focus(weights, key_pos, req.span, req.document)


def has_focus_spans(sample: Sample) -> bool:
    """Whether the sample locates its question and document (samples of `needles.make_sample` do)."""
    return sample.question_start > 0 and sample.question_end > sample.question_start and sample.document_start >= 0


def _delegate(module: torch.nn.Module, softcap: float | None) -> Callable[..., Any]:
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    if softcap is None:
        sdpa: Callable[..., Any] = ALL_ATTENTION_FUNCTIONS["sdpa"]
        return sdpa
    # SDPA has no soft-capping: use the model's own eager function (e.g. Gemma-2).
    eager: Callable[..., Any] = sys.modules[type(module).__module__].eager_attention_forward
    return eager


def argmax_attention(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    **kwargs: Any,
) -> tuple[torch.Tensor, Any]:
    """SDPA attention that also records the last query row's argmax of recorded modules."""
    softcap = kwargs.get("softcap")
    rec = _RECORDER.get()
    if rec is not None and rec.active and id(module) in rec.layer_of:
        w = last_row_weights(query, key, attention_mask, scaling, softcap)
        layer = rec.layer_of[id(module)]
        rec.rows[layer] = (w.to(query.dtype).argmax(dim=-1), key.shape[2], w)
        if rec.focus_requests and query.shape[2] > 1:  # a prefill holding the question's rows
            rec.focus[layer] = torch.stack(
                [question_focus(query, key, attention_mask, scaling, softcap, r) for r in rec.focus_requests]
            )
    out: tuple[torch.Tensor, Any] = _delegate(module, softcap)(
        module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs
    )
    return out


def _register() -> None:
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface, sdpa_mask

    if IMPL_NAME not in ALL_MASK_ATTENTION_FUNCTIONS:  # the mapping holds every registered name
        AttentionInterface.register(IMPL_NAME, argmax_attention)
        AttentionMaskInterface.register(IMPL_NAME, sdpa_mask)


@contextmanager
def capture_argmax(model: torch.nn.Module) -> Iterator[_Recorder]:
    """Within the block, every forward records each layer's last-row argmax into the recorder."""
    _register()
    mods = attention_modules(model)
    rec = _Recorder(layer_of={id(m): i for i, m in enumerate(mods)})
    token = _RECORDER.set(rec)
    try:
        with attention_implementation(model, IMPL_NAME):
            yield rec
    finally:
        _RECORDER.reset(token)


def auto_batch_size(device: torch.device | str) -> int:
    """Batch 1 on a CPU, 8 elsewhere. On a CPU batched decoding gains little over a mixed-length
    grid (0.78 vs 0.81 of plain generation, benchmarks) for twice the peak memory."""
    return 1 if torch.device(device).type == "cpu" else 8


class FastEngine:
    """SDPA + KV cache generation; argmax from captured query rows. Batch 1 by default on a CPU."""

    name = "fast"

    def __init__(
        self,
        lm: LoadedModel,
        *,
        prefix_reuse: bool = True,
        min_reuse: int = 64,
        batch_size: int | None = None,
        span: str = "answer",
    ) -> None:
        self.lm = lm
        self.span = span
        self.prefix_reuse = prefix_reuse
        self.min_reuse = min_reuse
        self.batch_size = auto_batch_size(self.device) if batch_size is None else batch_size
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {self.batch_size}")

    @property
    def device(self) -> torch.device:
        device: torch.device = next(self.lm.model.parameters()).device
        return device

    def new_cache(self, full: bool = False) -> Any:
        """The model's own cache layout; `full`: every layer keeps all keys (sliding layers too)."""
        from transformers import DynamicCache

        return DynamicCache() if full else DynamicCache(config=self.lm.model.config)

    def _rows(self, rec: _Recorder, total: int, sample: Sample) -> torch.Tensor:
        """`_batch_rows` of a batch of one, no padding: `[n_layers, n_heads, 1 + 3]`."""
        zero = torch.zeros(1, dtype=torch.long, device=self.device)
        return self._batch_rows(rec, total, zero, self._spans([sample]))[0]

    def _spans(self, samples: list[Sample]) -> torch.Tensor:
        return torch.tensor([s.span(self.span) for s in samples], dtype=torch.long, device=self.device)

    @torch.no_grad()
    def run(
        self,
        sample: Sample,
        *,
        max_new_tokens: int,
        stop: Callable[[list[int]], bool],
        cache: Any = None,
        start: int = 0,
    ) -> EngineOutput:
        """Generate greedily for one sample. `cache` may hold the KV of prompt_ids[:start] (prefix reuse)."""
        model = self.lm.model
        device = self.device
        ids = torch.tensor([sample.prompt_ids], device=device)
        n = ids.shape[1]
        if not 0 <= start < n:
            raise ValueError(f"start {start} must be below the prompt length {n}")
        focus = has_focus_spans(sample)
        if focus and start > sample.question_start:  # the question's rows must be in this prefill
            cache, start = None, 0
        cache = self.new_cache() if cache is None else cache
        steps: list[torch.Tensor] = []
        with capture_argmax(model) as rec:
            rec.focus_requests = [self._focus_request(sample, 0, start)] if focus else []
            generated, _ = greedy(
                model,
                ids[:, start:],
                cache=cache,
                max_new_tokens=max_new_tokens,
                stop=stop,
                on_step=lambda t, out: steps.append(self._rows(rec, n + t, sample)),
            )
        return self._output(generated, steps, self._focus_map(rec, 0) if focus else None)

    def _focus_request(self, sample: Sample, b: int, first: int, pad: int = 0) -> FocusRequest:
        """The query-focus request of a sample prefilled from position `first` (`pad`: its left
        padding in a batch, which shifts every position)."""
        span = sample.span(self.span)
        return FocusRequest(
            b,
            first,
            (sample.question_start + pad, sample.question_end + pad),
            (span[0] + pad, span[1] + pad),
            (sample.document_start + pad, sample.document_end + pad),
        )

    def _focus_map(self, rec: _Recorder, i: int) -> torch.Tensor:
        """`[n_layers, n_heads]` query focus of request `i` of the last prefill."""
        return torch.stack([rec.focus[layer][i] for layer in range(self.lm.spec.n_layers)])

    def _output(
        self, generated: list[int], steps: list[torch.Tensor], focus: torch.Tensor | None = None
    ) -> EngineOutput:
        """Split the recorded `[n_layers, n_heads, 1 + 3]` step rows into argmax and row scores."""
        spec = self.lm.spec
        rows = (
            torch.stack(steps).cpu().numpy()
            if steps
            else np.zeros((0, spec.n_layers, spec.n_heads, 1 + len(ROW_SCORES)))
        )
        return EngineOutput(
            generated_ids=generated,
            argmax=rows[..., 0].astype(np.int64),
            row_scores={name: rows[..., 1 + i] for i, name in enumerate(ROW_SCORES)},
            prompt_scores=None if focus is None else {"query_focus": focus.cpu().numpy()},
        )

    def _batch_rows(self, rec: _Recorder, total: int, pads: torch.Tensor, spans: torch.Tensor) -> torch.Tensor:
        """Per row of a left-padded batch whose query sits at padded position total-1, float64
        `[batch, n_layers, n_heads, 1 + 3]`: channel 0 the argmax's absolute position in the row's
        own numbering (key index -> padded position -> the row's own; exact in float64), channels
        1-3 the ROW_SCORES of the row over `spans` (`[batch, 2]`, the row's own positions)."""
        n = self.lm.spec.n_layers
        assert len(rec.rows) == n, f"recorded {len(rec.rows)} of {n} layers"
        query = total - 1 - pads
        layers = []
        for i in range(n):
            argmax, k_len, weights = rec.rows[i]
            pos = argmax + (total - k_len) - pads[:, None]  # [b, h]
            key_pos = torch.arange(total - k_len, total, device=pads.device)[None] - pads[:, None]  # [b, K]
            scores = row_scores(weights, key_pos, query, spans)  # [3, b, h]
            layers.append(torch.cat([pos[None].double(), scores.double()]).permute(1, 2, 0))  # [b, h, 4]
        rec.rows.clear()
        return torch.stack(layers, 1)

    @staticmethod
    def _merge_left_padded(caches: list[Any], lens: list[int]) -> Any:
        """One cache `[batch, kv_head, width, dim]` from per-row caches (full keys for every layer),
        each left-padded with zeros (masked out) to the longest row."""
        from transformers import DynamicCache

        width = max(lens)
        merged = DynamicCache()
        for i in range(len(caches[0].layers)):
            ks, vs = [], []
            for c, n in zip(caches, lens, strict=True):
                k, v = c.layers[i].keys, c.layers[i].values
                assert k.shape[2] == n, "merging needs every layer's full keys (new_cache(full=True))"
                pad = (0, 0, width - n, 0)  # left-pad the position axis
                ks.append(torch.nn.functional.pad(k, pad))
                vs.append(torch.nn.functional.pad(v, pad))
            merged.update(torch.cat(ks), torch.cat(vs), i)
        return merged

    @torch.no_grad()
    def run_batch(
        self,
        samples: list[Sample],
        *,
        max_new_tokens: int,
        stop: Callable[[list[int]], bool],
        caches: list[tuple[Any, int]] | None = None,
    ) -> list[EngineOutput]:
        """Generate greedily for several samples at once; the same outputs as `run` for each.

        Without `caches` the prompts are prefilled together, left-padded (pays on a GPU). With
        `caches` (per sample `(cache holding prompt_ids[:start] with full keys, or None, start)`,
        e.g. from the prefix store) each prompt is prefilled on its own from its cached prefix and
        only the decode steps are batched: every decode step reads all weights, which a batch
        shares (pays on a CPU too; see benchmarks/detect_speed.py).

        The decode loop below is the batched twin of `decoding.greedy`, which decodes batch 1: here
        rows are left-padded (own attention mask and position ids per step), each row stops on its
        own while the batch steps on, and the prefill may be per row. Per row it takes the same
        argmax of the last position's logits and feeds that token back, so outputs equal `run`'s.
        """
        model = self.lm.model
        device = self.device
        n_b = len(samples)
        lens = [len(s.prompt_ids) for s in samples]
        width = max(lens)
        pads = torch.tensor([width - n for n in lens], device=device)
        mask = (torch.arange(width, device=device)[None] >= pads[:, None]).long()  # 0 on padding
        spans = self._spans(samples)
        generated: list[list[int]] = [[] for _ in samples]
        steps: list[list[torch.Tensor]] = [[] for _ in samples]
        live = [True] * n_b
        with capture_argmax(model) as rec:
            if caches is None:
                tok = self.lm.tokenizer
                pad_id = next(
                    (
                        t
                        for t in (getattr(tok, "pad_token_id", None), getattr(tok, "eos_token_id", None))
                        if t is not None
                    ),
                    0,
                )
                ids = torch.full((n_b, width), pad_id, dtype=torch.long, device=device)
                for b, s in enumerate(samples):
                    ids[b, width - lens[b] :] = torch.tensor(s.prompt_ids, device=device)
                pos = (mask.cumsum(-1) - 1).clamp(min=0)  # each row counts from its first real token
                cache = self.new_cache()
                with_focus = [b for b, s in enumerate(samples) if has_focus_spans(s)]
                rec.focus_requests = [self._focus_request(samples[b], b, 0, int(pads[b])) for b in with_focus]
                out = model(
                    input_ids=ids,
                    attention_mask=mask,
                    position_ids=pos,
                    **cache_kwargs(model, cache),
                    use_cache=True,
                    logits_to_keep=1,
                )
                focus = {b: self._focus_map(rec, i) for i, b in enumerate(with_focus)}
                rows, tokens = self._batch_rows(rec, width, pads, spans), out.logits[:, -1].argmax(-1)
            else:
                row_caches, row_steps, row_tokens = [], [], []
                focus = {}
                for b, (s, (c, start)) in enumerate(zip(samples, caches, strict=True)):
                    if has_focus_spans(s) and start > s.question_start:  # the question must be prefilled here
                        c, start = None, 0
                    c = self.new_cache(full=True) if c is None else c
                    rec.focus_requests = [self._focus_request(s, 0, start)] if has_focus_spans(s) else []
                    out = model(
                        input_ids=torch.tensor([s.prompt_ids[start:]], device=device),
                        **cache_kwargs(model, c),
                        use_cache=True,
                        logits_to_keep=1,
                    )
                    if rec.focus_requests:
                        focus[b] = self._focus_map(rec, 0)
                    row_steps.append(self._rows(rec, len(s.prompt_ids), s))
                    row_tokens.append(out.logits[0, -1].argmax())
                    row_caches.append(c)
                cache = self._merge_left_padded(row_caches, lens)
                del row_caches
                rows, tokens = torch.stack(row_steps), torch.stack(row_tokens)
            rec.focus_requests = []  # decode steps hold no question rows
            last_pos = torch.tensor(lens, device=device)[:, None] - 1
            for t in range(max_new_tokens):
                if t:
                    out = model(
                        input_ids=tokens[:, None],
                        attention_mask=mask,
                        position_ids=last_pos + t,
                        **cache_kwargs(model, cache),
                        use_cache=True,
                        logits_to_keep=1,
                    )
                    rows, tokens = self._batch_rows(rec, width + t, pads, spans), out.logits[:, -1].argmax(-1)
                for b in range(n_b):
                    if live[b]:
                        steps[b].append(rows[b])
                        generated[b].append(int(tokens[b]))
                        live[b] = not stop(generated[b])
                if not any(live):
                    break
                mask = torch.cat([mask, mask.new_ones((n_b, 1))], dim=1)
        return [self._output(g, st, focus.get(b)) for b, (g, st) in enumerate(zip(generated, steps, strict=True))]

    def run_many(
        self,
        samples: Iterable[Sample],
        *,
        max_new_tokens: int,
        stop: Callable[[list[int]], bool],
        prefix_reuse: bool | None = None,
    ) -> Iterator[tuple[Sample, EngineOutput]]:
        """Run samples in the given order, reusing the KV cache of shared prompt prefixes.

        Yields (sample, output) in input order. Reuse is exact: only where the token ids are
        identical (see `prefix.PrefixStore`). With `batch_size > 1`, consecutive samples form a
        batch: each is prefilled from its shared prefix, then they decode together (without
        reuse: prefilled together too).
        """
        samples = list(samples)
        reuse = self.prefix_reuse if prefix_reuse is None else prefix_reuse
        bs = self.batch_size
        if not reuse:
            for i in range(0, len(samples), bs):
                chunk = samples[i : i + bs]
                outs = (
                    self.run_batch(chunk, max_new_tokens=max_new_tokens, stop=stop)
                    if bs > 1
                    else [self.run(chunk[0], max_new_tokens=max_new_tokens, stop=stop)]
                )
                yield from zip(chunk, outs, strict=True)
            return
        store = PrefixStore(
            self.lm.model,
            lambda full: self.new_cache(full=full),
            [s.prompt_ids for s in samples],
            min_reuse=self.min_reuse,
        )
        # prompt tokens that went through a forward (store prefills + each sample's own rest)
        self.prefill_stats = {"prompt_tokens": sum(len(s.prompt_ids) for s in samples), "prefilled": 0}
        own = 0
        try:
            # The store prefills outside `capture_argmax`: with SDPA, as the samples' own prefills.
            with attention_implementation(self.lm.model, "sdpa"):
                for i in range(0, len(samples), bs):
                    chunk = samples[i : i + bs]
                    caches = [store.cache_for(j, full=bs > 1) for j in range(i, i + len(chunk))]
                    own += sum(len(s.prompt_ids) - start for s, (_, start) in zip(chunk, caches, strict=True))
                    self.prefill_stats["prefilled"] = store.prefilled + own
                    if bs > 1:
                        outs = self.run_batch(chunk, max_new_tokens=max_new_tokens, stop=stop, caches=caches)
                    else:
                        ((cache, start),) = caches
                        outs = [self.run(chunk[0], max_new_tokens=max_new_tokens, stop=stop, cache=cache, start=start)]
                    yield from zip(chunk, outs, strict=True)
        finally:
            store.clear()
