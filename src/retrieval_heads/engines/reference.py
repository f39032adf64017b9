"""Paper-faithful engine: eager attention, attention weights read at every decode step.

As in the authors' code, the prompt minus its last token is prefilled into the KV cache, then the
last prompt token is fed as the first decode step, so every generated token's producing query has
its attention row returned (`output_attentions=True`), one `[batch, head, 1, key_pos]` row per
layer. No O(n^2) attention matrix is kept beyond one step.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from ..models import LoadedModel
from ..needles import Sample
from .base import EngineOutput, StopRule, cache_io


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
    name = "reference"

    def __init__(self, lm: LoadedModel) -> None:
        self.lm = lm
        model = lm.model
        if model.config._attn_implementation != "eager":
            model.set_attn_implementation("eager")

    @torch.no_grad()
    def run(self, sample: Sample, *, max_new_tokens: int, stop: StopRule) -> EngineOutput:
        model = self.lm.model
        device = next(model.parameters()).device
        ids = torch.tensor([sample.prompt_ids], device=device)
        n = ids.shape[1]
        kw, attr = cache_io(model)
        past: Any = None
        if n > 1:
            out = model(input_ids=ids[:, :-1], use_cache=True)
            past = getattr(out, attr)
        cur = ids[:, -1:]
        generated: list[int] = []
        steps: list[np.ndarray] = []
        for t in range(max_new_tokens):
            pos = n - 1 + t  # position of the query that produces the next token
            out = model(
                input_ids=cur,
                **{kw: past},
                use_cache=True,
                output_attentions=True,
                cache_position=torch.tensor([pos], device=device),
                position_ids=torch.tensor([[pos]], device=device),
            )
            past = getattr(out, attr)
            steps.append(row_argmax(out.attentions, total=pos + 1))
            token = int(out.logits[0, -1].argmax())
            generated.append(token)
            if stop(generated):
                break
            cur = torch.tensor([[token]], device=device)
        argmax = np.stack(steps) if steps else np.zeros((0, self.lm.spec.n_layers, self.lm.spec.n_heads), np.int64)
        return EngineOutput(generated_ids=generated, argmax=argmax)
