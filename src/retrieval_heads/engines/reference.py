"""Paper-faithful engine: eager attention, attention weights read at every decode step.

As in the authors' code, the prompt minus its last token is prefilled into the KV cache, then the
last prompt token is fed as the first decode step, so every generated token's producing query has
its attention row returned (`decoding.greedy_with_attentions`), one `[batch, head, 1, key_pos]`
row per layer. No O(n^2) attention matrix is kept beyond one step.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import Any

import numpy as np
import torch

from ..decoding import StopFn, attention_rows, greedy_with_attentions
from ..models import LoadedModel, attention_implementation
from ..needles import Sample
from .base import ROW_SCORES, EngineOutput, query_focus, row_scores


def attention_row_scores(attentions: tuple[torch.Tensor, ...], total: int, span: tuple[int, int]) -> np.ndarray:
    """Per layer and head, the ROW_SCORES of the last query row: float `[3, n_layers, n_heads]`."""
    device = attentions[0].device
    spans = torch.tensor([span], device=device)
    query = torch.tensor([total - 1], device=device)
    out = []
    for a in attentions:
        k = a.shape[-1]
        key_pos = torch.arange(total - k, total, device=device)[None]
        out.append(row_scores(a[:, :, -1, :], key_pos, query, spans)[:, 0])  # [3, heads]
    return torch.stack(out, 1).cpu().numpy()


def row_argmax(attentions: tuple[torch.Tensor, ...], total: int) -> np.ndarray:
    """Per layer and head, absolute position of the max weight in the last query row.

    attentions: per layer `[batch=1, head, query_pos, key_pos_l]`; a sliding-window cache returns
    only its last key_pos_l keys, so position j maps to `total - key_pos_l + j`.
    Returns int64 `[n_layers, n_heads]`.
    """
    rows = []
    for a in attentions:
        k = a.shape[-1]
        rows.append(a[0, :, -1, :].float().argmax(dim=-1) + (total - k))
    return torch.stack(rows).cpu().numpy().astype(np.int64)


class ReferenceEngine:
    """The oracle. Runs with eager attention inside each call and restores the model's own after."""

    name = "reference"

    def __init__(self, lm: LoadedModel, *, span: str = "answer") -> None:
        self.lm = lm
        self.span = span

    @torch.no_grad()
    def run(self, sample: Sample, *, max_new_tokens: int, stop: StopFn) -> EngineOutput:
        model = self.lm.model
        device = next(model.parameters()).device
        ids = torch.tensor([sample.prompt_ids], device=device)
        n = ids.shape[1]
        steps: list[np.ndarray] = []
        scores: list[np.ndarray] = []
        span = sample.span(self.span)

        def record(t: int, out: Any) -> None:
            steps.append(row_argmax(out.attentions, total=n + t))
            scores.append(attention_row_scores(out.attentions, n + t, span))

        with attention_implementation(model, "eager"):
            generated = greedy_with_attentions(model, ids, max_new_tokens=max_new_tokens, stop=stop, on_step=record)
            focus = self._query_focus(sample, ids)
        shape = (0, self.lm.spec.n_layers, self.lm.spec.n_heads)
        argmax = np.stack(steps) if steps else np.zeros(shape, np.int64)
        per = np.stack(scores) if scores else np.zeros((0, len(ROW_SCORES), *shape[1:]))  # [steps, 3, L, H]
        return EngineOutput(
            generated_ids=generated,
            argmax=argmax,
            row_scores={name: per[:, i] for i, name in enumerate(ROW_SCORES)},
            prompt_scores=None if focus is None else {"query_focus": focus},
        )

    def _query_focus(self, sample: Sample, ids: torch.Tensor) -> np.ndarray | None:
        """`[n_layers, n_heads]` query focus from a separate eager pass: the prompt up to the
        question, then the question's rows with their attention weights (never a full n x n
        matrix); the decode path above is untouched by it."""
        qs, qe = sample.question_start, sample.question_end
        if qs < 1 or qe <= qs or sample.document_start < 0:
            return None
        read = attention_rows(self.lm.model, ids, qs, qe)  # inside run's eager block: the prefill is eager too
        span, doc = sample.span(self.span), (sample.document_start, sample.document_end)
        rows = []
        for l, a in enumerate(read.layers):  # per layer [1, heads, question rows, K_l]: the last K_l keys up to qe
            key_pos = torch.arange(read.first_key(l), qe, device=a.device)
            rows.append(query_focus(a[0], key_pos, span, doc))
        return torch.stack(rows).cpu().numpy()

    def run_many(
        self, samples: Iterable[Sample], *, max_new_tokens: int, stop: StopFn
    ) -> Iterator[tuple[Sample, EngineOutput]]:
        """One sample after the other (the oracle shares nothing between samples)."""
        for s in samples:
            yield s, self.run(s, max_new_tokens=max_new_tokens, stop=stop)
