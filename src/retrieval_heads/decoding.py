"""Greedy decoding, stop rules and prompts: the one decode loop every engine and experiment uses.

    ids, cache = greedy(model, torch.tensor([prompt_ids]), max_new_tokens=32, stop=StopRule(tok))

`greedy` feeds `input_ids` (a whole prompt, the rest of a prompt after a cached prefix, or one
token), takes the argmax of the last position's logits, and feeds each new token back until the
stop rule fires or `max_new_tokens` tokens exist. Callers observe every forward through
`on_step(step, output)` (the engines read attention rows there) and add per-step forward arguments
through `step_kwargs(step)` (explicit positions, attention outputs).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from .compat import cache_io as cache_io  # the KV cache's forward keyword by release; callers import it from here

StopFn = Callable[[list[int]], bool]


def eos_ids(tokenizer: Any, extra: Sequence[int] = ()) -> frozenset[int]:
    """The tokenizer's end-of-sequence ids (one or several) plus `extra`."""
    eos = tokenizer.eos_token_id
    ids = set(eos if isinstance(eos, (list, tuple)) else [eos] if eos is not None else [])
    return frozenset(i for i in ids | set(extra) if i is not None)


class StopRule:
    """Needle answers: stop at EOS, or at a newline once the answer has some text (the authors')."""

    def __init__(self, tokenizer: Any, extra_eos: tuple[int, ...] = ()) -> None:
        self.tokenizer = tokenizer
        self.eos_ids = eos_ids(tokenizer, extra_eos)

    def __call__(self, generated: list[int]) -> bool:
        last = generated[-1]
        if last in self.eos_ids:
            return True
        piece = self.tokenizer.decode([last])
        if "\n" not in piece:
            return False
        before = self.tokenizer.decode(generated[:-1]) + piece.split("\n")[0]
        return bool(before.strip())


class StopStrings:
    """Task answers: stop at EOS or once the text (after some non-space content) holds a stop
    string; `cut` trims the text at that stop string."""

    def __init__(self, tokenizer: Any, stops: Sequence[str]) -> None:
        self.tokenizer = tokenizer
        self.stops = tuple(s for s in stops if s)
        self.eos_ids = eos_ids(tokenizer)

    def cut(self, text: str) -> str:
        start = len(text) - len(text.lstrip())
        ends = [i for i in (text.find(s, start + 1) for s in self.stops) if i >= 0]
        return text[: min(ends)] if ends else text

    def __call__(self, generated: list[int]) -> bool:
        if generated[-1] in self.eos_ids:
            return True
        if not self.stops:
            return False
        text: str = self.tokenizer.decode(generated, skip_special_tokens=True)
        return self.cut(text) != text


def greedy(
    model: Any,
    input_ids: Any,
    *,
    cache: Any,
    max_new_tokens: int,
    stop: StopFn,
    step_kwargs: Callable[[int], dict[str, Any]] | None = None,
    on_step: Callable[[int, Any], None] | None = None,
) -> tuple[list[int], Any]:
    """Greedy decoding of one sequence (batch 1). Returns the generated ids and the cache.

    `input_ids` `[1, n]` is fed on `cache` (None: the model makes one); step t > 0 feeds the token
    of step t - 1. The caller holds `torch.no_grad()`.
    """
    import torch

    kw, attr = cache_io(model)
    device = input_ids.device
    cur = input_ids
    generated: list[int] = []
    for t in range(max_new_tokens):
        out = model(
            input_ids=cur, **{kw: cache}, use_cache=True, logits_to_keep=1, **(step_kwargs(t) if step_kwargs else {})
        )
        cache = getattr(out, attr)
        if on_step is not None:
            on_step(t, out)
        token = int(out.logits[0, -1].argmax())
        generated.append(token)
        if stop(generated):
            break
        cur = torch.tensor([[token]], device=device)
    return generated, cache


# ----------------------------------------------------------------------------------- prompts
def adds_bos(tokenizer: Any) -> bool:
    """Whether the tokenizer puts BOS in front of plain text. Prompts are tokenized without special
    tokens (chat templates already hold them), so a plain prompt gets that BOS as text."""
    ids = tokenizer("a", add_special_tokens=True)["input_ids"]
    return bool(ids) and ids[0] == tokenizer.bos_token_id


def greedy_with_attentions(
    model: Any,
    input_ids: Any,
    *,
    max_new_tokens: int,
    stop: StopFn,
    on_step: Callable[[int, Any], None],
) -> list[int]:
    """`greedy` with every layer's attention weights in each step's output (`out.attentions`), the
    paper-faithful way: the prompt but its last token is prefilled once, then each step feeds one
    query at its explicit position. The caller holds `torch.no_grad()` and eager attention
    (`models.attention_implementation(model, "eager")`): SDPA returns no weights."""
    import torch

    n = input_ids.shape[1]
    device = input_ids.device

    def positions(t: int) -> dict[str, Any]:
        pos = n - 1 + t  # position of the query that produces the next token
        return {
            "output_attentions": True,
            "cache_position": torch.tensor([pos], device=device),
            "position_ids": torch.tensor([[pos]], device=device),
        }

    _, attr = cache_io(model)
    cache = getattr(model(input_ids=input_ids[:, :-1], use_cache=True), attr) if n > 1 else None
    generated, _ = greedy(
        model,
        input_ids[:, -1:],
        cache=cache,
        max_new_tokens=max_new_tokens,
        stop=stop,
        step_kwargs=positions,
        on_step=on_step,
    )
    return generated


def build_prompt(
    tokenizer: Any, user: str, *, chat: bool, assistant_prefix: str = "", plain_separator: str = ""
) -> str:
    """The text given to the model: with `chat` and a chat template, the template with one user
    message and the generation prompt; otherwise BOS (when the tokenizer adds one) + the message +
    `plain_separator`. `assistant_prefix` starts the answer in both cases."""
    if chat and getattr(tokenizer, "chat_template", None):
        text: str = tokenizer.apply_chat_template(
            [{"role": "user", "content": user}], tokenize=False, add_generation_prompt=True
        )
    else:
        bos = tokenizer.bos_token if getattr(tokenizer, "bos_token", None) and adds_bos(tokenizer) else ""
        text = f"{bos}{user}{plain_separator}"
    return text + assistant_prefix
