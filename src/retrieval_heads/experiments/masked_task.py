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

from ..decoding import StopFn, greedy_rows, greedy_with_attentions, prefill_prefix
from ..errors import ConfigError
from ..heads import Head
from ..masking import Method, Phase, mask_heads, mask_rows
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
    return _scored(lm, task, style, condition, prompt, gen, argmax)


def _scored(
    lm: LoadedModel, task: Task, style: str, condition: Condition, prompt: Prompt, gen: list[int], argmax: np.ndarray
) -> Answer:
    """The generated ids as an Answer: cut at the stop string, extracted and scored."""
    stop = task.stop_rule(lm.tokenizer, prompt.request)
    text = stop.cut(lm.tokenizer.decode(gen, skip_special_tokens=True))
    pred = task.extract_answer(text, prompt.doc, style)
    return Answer(condition, prompt, gen, text, argmax, pred, task.score(prompt.doc, pred))


def answer_rows(
    lm: LoadedModel,
    task: Task,
    style: str,
    conditions: Sequence[Condition],
    prompt: Prompt,
    prefix: Any,
    *,
    method: Method,
    means: Any = None,
) -> list[Answer]:
    """`answer` under each of `conditions` (decode-phase masks, no watched heads) in one batch:
    row b decodes with condition b's heads masked (`masking.mask_rows`), every row from a copy of
    `prefix` (`decoding.prefill_prefix` of the prompt). The caller holds `torch.no_grad()`."""
    import torch

    device = next(lm.model.parameters()).device
    stops = [task.stop_rule(lm.tokenizer, prompt.request) for _ in conditions]
    with mask_rows(lm.model, [c.heads for c in conditions], method, phase="decode", means=means) as live:
        gens = greedy_rows(
            lm.model,
            torch.tensor([list(prompt.ids)], device=device),
            rows=len(conditions),
            prefix_cache=prefix,
            max_new_tokens=prompt.request.max_new_tokens,
            stops=stops,
            on_select=live.select,
        )
    none = np.zeros((0, 0), np.int64)  # no watched heads
    return [_scored(lm, task, style, c, prompt, g, none) for c, g in zip(conditions, gens, strict=True)]


def condition_record(cond: Condition, fields: dict[str, Any], seconds: float) -> dict[str, Any]:
    """A record's fields under its condition: which condition, kind, K and seed, then `fields`."""
    head = {"condition": cond.id, "kind": cond.kind, "k": cond.k, "seed": cond.seed}
    return {**head, **fields, "seconds": round(seconds, 3)}


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
    batch_size: int | None = None,
) -> None:
    """Every (condition, prompt), each with the condition's heads masked (`masking.mask_heads`). A
    record is `{"id": "<condition>/<doc>", condition, kind, k, seed, **record(answer), seconds}`;
    finished records are reused, not generated again (`Run.item`).

    Phase "all": conditions in `execution_order`, every prompt under each. Phase "decode": the
    prefill (the prompt but its last token) runs unmasked, so it is the same under every condition;
    with `share_prefill` it is done once per prompt and each condition decodes from a copy of it
    (prompt by prompt, conditions in `execution_order`): the same tokens as a prefill per
    condition, and a run stopped early holds every condition of its first prompts. There, when no
    condition watches heads, up to `batch_size` conditions (None: all of them) decode together as
    the rows of one batch (`answer_rows`); `batch_size=1` decodes them one after the other. A
    batched record's `seconds` is its share of its batch and of the prompt's prefill.
    """
    order = execution_order(conditions)

    def compute(cond: Condition, p: Prompt, prefix: Any = None, spent: float = 0.0) -> dict[str, Any]:
        t0 = time.perf_counter() - spent  # a shared prefill counts in the record that made it
        fields = record(answer(lm, task, style, cond, p, prefix))
        return condition_record(cond, fields, time.perf_counter() - t0)

    if batch_size is not None and batch_size < 1:
        raise ConfigError(f"batch size must be >= 1, got {batch_size}")
    rows = batch_size or len(order)
    if phase == "decode" and share_prefill and rows > 1 and not any(c.watch for c in order):
        _run_rows(lm, task, style, items, order, run, method=method, means=means, record=record, rows=rows)
        return
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


def _run_rows(
    lm: LoadedModel,
    task: Task,
    style: str,
    items: Sequence[Prompt],
    order: Sequence[Condition],
    run: Run,
    *,
    method: Method,
    means: Any,
    record: Callable[[Answer], dict[str, Any]],
    rows: int,
) -> None:
    """`run_masked`'s decode phase in batches of `rows` conditions per prompt; records are emitted
    in `execution_order`, a batch's once it is decoded."""
    import torch

    device = next(lm.model.parameters()).device
    for p in items:
        todo = []
        for cond in order:
            rid = f"{cond.id}/{p.doc.id}"
            if run.is_done(rid):
                run.reuse(rid)
            else:
                todo.append(cond)
        if not todo:
            continue
        t0 = time.perf_counter()
        with torch.no_grad():
            prefix = prefill_prefix(lm.model, torch.tensor([list(p.ids)], device=device))
        spent = time.perf_counter() - t0  # the prefill, shared by the prompt's batches
        for start in range(0, len(todo), rows):
            batch = todo[start : start + rows]
            t0 = time.perf_counter()
            with torch.no_grad():
                answers = answer_rows(lm, task, style, batch, p, prefix, method=method, means=means)
            seconds = (time.perf_counter() - t0 + spent) / len(batch)
            spent = 0.0
            for cond, a in zip(batch, answers, strict=True):
                run.emit({"id": f"{cond.id}/{p.doc.id}", **condition_record(cond, record(a), seconds)})
