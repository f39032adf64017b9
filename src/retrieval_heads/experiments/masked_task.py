"""A task under masking conditions (`conditions.build_conditions`): each condition's heads are
masked while every document is answered; task-eval and its NIAH form mask-eval run on it.

    with Run(header, out=out) as run:
        run_masked(lm, task, "answer-only", prompts(lm, task, docs, "answer-only", chat=True), conditions, run,
                   method="uniform", phase="all", record=lambda a: {"doc_id": a.prompt.doc.id, "scores": a.scores})

Decoding is greedy (`decoding.greedy_with_attentions`); the prompt's last token is the first
decode step, so the decode-phase masks and the watched heads' attention cover every generated token.
"""

from __future__ import annotations

import copy
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from ..decoding import StopFn, greedy_with_attentions, prefill_prefix
from ..errors import ConfigError
from ..heads import Head
from ..masking import Method, Phase, mask_heads
from ..models import LoadedModel
from ..runner import Run
from ..tasks.base import Doc, Request, Task
from .conditions import Condition, execution_order


def count_tokens(lm: LoadedModel) -> Callable[[str], int]:
    """Text length in the model's tokens (what `Task.docs` pads contexts with)."""
    return lambda text: len(lm.tokenizer(text, add_special_tokens=False)["input_ids"])


def generate(
    lm: LoadedModel,
    prompt_ids: Sequence[int],
    max_new_tokens: int,
    stop: StopFn,
    watch: Sequence[Head] = (),
    prefix: Any = None,
) -> tuple[list[int], np.ndarray]:
    """Greedy generation: prefill prompt[:-1], then the last prompt token is the first decode step.

    Returns the generated ids and the watched heads' argmax key positions `[steps, len(watch)]`
    (absolute positions). With watched heads, decode steps run with eager attention (weights
    needed); the prefill keeps the model's implementation (SDPA is ~2x faster on CPU). `prefix`:
    the prefill already done (`decoding.prefill_prefix`); it is copied, not extended.
    """
    import torch

    device = next(lm.model.parameters()).device
    ids = torch.tensor([list(prompt_ids)], device=device)  # [1, n]
    n = ids.shape[1]
    wl = torch.tensor([l for l, _ in watch], dtype=torch.long)
    wh = torch.tensor([h for _, h in watch], dtype=torch.long)
    steps: list[np.ndarray] = []

    def on_step(t: int, out: Any) -> None:
        if watch:  # per layer [1, head, 1, key_pos_l]; a sliding cache keeps its last key_pos_l keys
            rows = [a[0, :, -1, :].argmax(-1) + (n + t - a.shape[-1]) for a in out.attentions]
            steps.append(torch.stack(rows)[wl, wh].cpu().numpy())

    with torch.no_grad():
        generated = greedy_with_attentions(
            lm.model,
            ids,
            max_new_tokens=max_new_tokens,
            stop=stop,
            on_step=on_step,
            attentions=bool(watch),
            prefix_cache=None if prefix is None else copy.deepcopy(prefix),
        )
    return generated, (np.stack(steps) if steps else np.zeros((0, len(watch)), np.int64))


@dataclass(frozen=True)
class Prompt:
    """One document as the model reads it: the task's request and the prompt's token ids."""

    doc: Doc
    request: Request
    ids: tuple[int, ...]


@dataclass(frozen=True)
class Answer:
    """What the model answered to one prompt under one condition."""

    condition: Condition
    prompt: Prompt
    generated_ids: list[int]
    text: str  # decoded, cut where decoding stopped (`Task.stop_rule`)
    argmax: np.ndarray  # the watched heads' argmax key positions [steps, len(condition.watch)]
    prediction: str
    scores: dict[str, float]


def prompts(lm: LoadedModel, task: Task, docs: Sequence[Doc], style: str, chat: bool) -> list[Prompt]:
    """Each document's request, tokenized without special tokens (the prompt text holds them); a
    prompt that leaves no room for its answer in the model's context is an error."""
    tok = lm.tokenizer
    out = []
    for d in docs:
        req = task.request(d, style)
        ids = tok(req.prompt(tok, chat), add_special_tokens=False)["input_ids"]
        if len(ids) + req.max_new_tokens > lm.spec.max_context:
            raise ConfigError(
                f"{d.id}: prompt of {len(ids)} tokens + {req.max_new_tokens} new tokens exceeds "
                f"{lm.spec.name}'s context of {lm.spec.max_context}"
            )
        out.append(Prompt(d, req, tuple(ids)))
    return out


def answer(lm: LoadedModel, task: Task, style: str, condition: Condition, prompt: Prompt, prefix: Any = None) -> Answer:
    """Greedy answer to one prompt (the condition's masks already active), extracted and scored;
    `prefix` as in `generate`."""
    stop = task.stop_rule(lm.tokenizer, prompt.request)
    gen, argmax = generate(lm, prompt.ids, prompt.request.max_new_tokens, stop, condition.watch, prefix)
    text = stop.cut(lm.tokenizer.decode(gen, skip_special_tokens=True))
    pred = task.extract_answer(text, prompt.doc, style)
    return Answer(condition, prompt, gen, text, argmax, pred, task.score(prompt.doc, pred))


def run_masked(
    lm: LoadedModel,
    task: Task,
    style: str,
    items: Sequence[Prompt],
    conditions: Sequence[Condition],
    run: Run,
    *,
    method: Method,
    phase: Phase,
    means: Any = None,
    record: Callable[[Answer], dict[str, Any]],
    share_prefill: bool = True,
) -> None:
    """Every (condition, prompt), each with the condition's heads masked (`masking.mask_heads`). A
    record is `{"id": "<condition>/<doc>", condition, kind, k, seed, **record(answer), seconds}`;
    finished records are reused, not generated again (`Run.item`).

    Phase "all": conditions in `execution_order`, every prompt under each. Phase "decode": the
    prefill (the prompt but its last token) runs unmasked, so it is the same under every condition;
    with `share_prefill` it is done once per prompt and each condition decodes from a copy of it
    (prompt by prompt, conditions in `execution_order`): the same tokens as a prefill per
    condition, and a run stopped early holds every condition of its first prompts.
    """
    order = execution_order(conditions)

    def compute(cond: Condition, p: Prompt, prefix: Any = None, spent: float = 0.0) -> dict[str, Any]:
        t0 = time.perf_counter() - spent  # a shared prefill counts in the record that made it
        fields = record(answer(lm, task, style, cond, p, prefix))
        return {
            "condition": cond.id,
            "kind": cond.kind,
            "k": cond.k,
            "seed": cond.seed,
            **fields,
            "seconds": round(time.perf_counter() - t0, 3),
        }

    if phase == "decode" and share_prefill:
        import torch

        device = next(lm.model.parameters()).device
        for p in items:
            prefix: Any = None
            for cond in order:
                rid = f"{cond.id}/{p.doc.id}"
                if run.is_done(rid):
                    run.reuse(rid)
                    continue
                spent = 0.0
                if prefix is None:
                    t0 = time.perf_counter()
                    with torch.no_grad():
                        prefix = prefill_prefix(lm.model, torch.tensor([list(p.ids)], device=device))
                    spent = time.perf_counter() - t0
                with mask_heads(lm.model, cond.heads, method, phase=phase, means=means):
                    run.emit({"id": rid, **compute(cond, p, prefix, spent)})
        return
    for cond in order:
        with mask_heads(lm.model, cond.heads, method, phase=phase, means=means):
            for p in items:
                run.item(f"{cond.id}/{p.doc.id}", lambda cond=cond, p=p: compute(cond, p))  # type: ignore[misc]
