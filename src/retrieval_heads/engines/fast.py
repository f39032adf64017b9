"""Fast engine: plain SDPA generation with a KV cache, plus each head's argmax over one row.

Each forward runs inside `capture.capture_argmax`: SDPA computes the output, and the last query
row's weights of every layer are recorded alongside (see `capture.py` for the attention function
and the tie policy). The prompt is prefilled in one forward (the last prompt position produces the
first token, its row is recorded during prefill), then each decode step records its single row.
Logits are computed for the last position only (`logits_to_keep=1`). Remaining differences to the
reference engine come only from SDPA vs eager floating-point rounding of hidden states (~1e-6 in
fp32); tests assert identical generations and copy decisions.

Prefix reuse (`run_many`): see `prefix.py`.

Batching (`run_batch`, `batch_size > 1`): rows are left-padded to one length, each gets its own
position ids (counted from its first real token, so RoPE sees the positions of batch 1) and an
attention mask hiding the padding; a row's recorded argmax is shifted back by its padding. A
finished row keeps stepping (its tokens are ignored) until every row has stopped. With prefix
reuse each row is prefilled alone from its cached prefix and the per-row caches are merged
(left-padded) for a batched decode; without, the prompts are prefilled as one padded batch.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from typing import Any

import numpy as np
import torch

from ..compat import cache_kwargs
from ..decoding import greedy
from ..models import LoadedModel, attention_implementation
from ..needles import Sample
from .base import ROW_SCORES, EngineOutput, row_scores
from .capture import FocusRequest, Recorder, capture_argmax, has_focus_spans
from .prefix import PrefixStore


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
        prefix_slots: int = 2,
        batch_size: int | None = None,
        span: str = "answer",
    ) -> None:
        self.lm = lm
        self.span = span
        self.prefix_reuse = prefix_reuse
        self.min_reuse = min_reuse
        self.prefix_slots = prefix_slots  # prefixes kept by the prefix store (`prefix.PrefixStore`)
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

    def _rows(self, rec: Recorder, total: int, sample: Sample) -> torch.Tensor:
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

    def _focus_map(self, rec: Recorder, i: int) -> torch.Tensor:
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

    def _batch_rows(self, rec: Recorder, total: int, pads: torch.Tensor, spans: torch.Tensor) -> torch.Tensor:
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
            max_slots=self.prefix_slots,
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
