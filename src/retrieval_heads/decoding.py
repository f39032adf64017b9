"""Greedy decoding, stop rules and prompts: the one decode loop every engine and experiment uses.

    ids, cache = greedy(model, torch.tensor([prompt_ids]), max_new_tokens=32, stop=StopRule(tok))

`greedy` feeds `input_ids` (a whole prompt, the rest of a prompt after a cached prefix, or one
token), takes the argmax of the last position's logits, and feeds each new token back until the
stop rule fires or `max_new_tokens` tokens exist. Callers observe every forward through
`on_step(step, output)` (the engines read attention rows there) and add per-step forward arguments
through `step_kwargs(step)` (explicit positions, attention outputs). `greedy_rows` is its batched
form for copies of one prompt that differ only by hooks (the masking experiments' conditions):
no weights, each row stopping on its own.

Attention weights are read in one way only: `greedy_with_attentions` (each decode step's row,
with `decode_positions` as its `step_kwargs`) and `attention_rows` (the rows of a prompt span
after a prefill of what precedes it); no other module asks a model for `output_attentions`.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from .compat import cache_io as cache_io  # the KV cache's forward keyword by release; callers import it from here
from .errors import DataError
from .models import attention_implementation

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
    forced: Sequence[int] | None = None,
) -> tuple[list[int], Any]:
    """Greedy decoding of one sequence (batch 1). Returns the generated ids and the cache.

    `input_ids` `[1, n]` is fed on `cache` (None: the model makes one); step t > 0 feeds the token
    of step t - 1. `forced`: step t takes `forced[t]` instead of the argmax (teacher forcing: the
    steps observe a given answer). The caller holds `torch.no_grad()`.
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
        token = int(out.logits[0, -1].argmax()) if forced is None else int(forced[t])
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


def decode_positions(n: int, device: Any, *, attentions: bool = True) -> Callable[[int], dict[str, Any]]:
    """`greedy`'s `step_kwargs` after the prompt (`n` tokens) but its last token was prefilled:
    step t feeds one query at its explicit position `n - 1 + t`, with every layer's attention
    weights in the step's output (`out.attentions`) when `attentions`."""
    import torch

    def kwargs(t: int) -> dict[str, Any]:
        pos = n - 1 + t  # position of the query that produces the next token
        return {
            "output_attentions": attentions,
            "cache_position": torch.tensor([pos], device=device),
            "position_ids": torch.tensor([[pos]], device=device),
        }

    return kwargs


def prefill_prefix(model: Any, input_ids: Any) -> Any:
    """The KV cache of the prompt but its last token (None for a one-token prompt): the prefill of
    `greedy_with_attentions`, with the model's current attention implementation. The caller holds
    `torch.no_grad()`."""
    _, attr = cache_io(model)
    return (
        getattr(model(input_ids=input_ids[:, :-1], use_cache=True, logits_to_keep=1), attr)
        if input_ids.shape[1] > 1
        else None
    )


def greedy_with_attentions(
    model: Any,
    input_ids: Any,
    *,
    max_new_tokens: int,
    stop: StopFn,
    on_step: Callable[[int, Any], None],
    attentions: bool = True,
    forced: Sequence[int] | None = None,
    prefix_cache: Any = None,
) -> list[int]:
    """`greedy` with every layer's attention weights in each step's output (`out.attentions`), the
    paper-faithful way: the prompt but its last token is prefilled once with the model's current
    attention implementation, then each step feeds one query at its explicit position with eager
    attention (SDPA returns no weights). With `attentions=False` the same loop runs on the model's
    own attention without weights (a run that watches no head); `forced` as in `greedy`;
    `prefix_cache`: the cache of `prefill_prefix(model, input_ids)`, computed once to serve several
    decodes (it is extended in place: pass each decode its own copy). The caller
    holds `torch.no_grad()`; a caller that wants the prefill eager too (the reference engine) holds
    `models.attention_implementation(model, "eager")` around the call.

        with torch.no_grad():
            ids = greedy_with_attentions(model, prompt, max_new_tokens=32, stop=StopRule(tok),
                                         on_step=lambda t, out: rows.append(out.attentions))
    """
    n = input_ids.shape[1]
    cache = prefill_prefix(model, input_ids) if prefix_cache is None else prefix_cache
    with attention_implementation(model, "eager") if attentions else contextlib.nullcontext():
        generated, _ = greedy(
            model,
            input_ids[:, -1:],
            cache=cache,
            max_new_tokens=max_new_tokens,
            stop=stop,
            step_kwargs=decode_positions(n, input_ids.device, attentions=attentions),
            on_step=on_step,
            forced=forced,
        )
    return generated


def greedy_rows(
    model: Any,
    input_ids: Any,
    *,
    rows: int,
    prefix_cache: Any,
    max_new_tokens: int,
    stops: Sequence[StopFn],
    on_select: Callable[[Any], None] | None = None,
) -> list[list[int]]:
    """`greedy_with_attentions` without weights for `rows` copies of one prompt at once: each row
    decodes from its own copy of `prefix_cache` (`prefill_prefix(model, input_ids)`, left
    untouched), feeding the last prompt token as its first step, and leaves the batch when its
    stop rule `stops[row]` fires; `on_select(indices)` hears which batch rows stay (the per-row
    head masks of `masking.mask_rows` follow it). Returns each row's generated ids.

    Rows differ only through hooks (masks); one forward serves them all, so the weights are read
    once per step for every row: on a CPU 21 rows decode ~6x faster than one after the other. The
    prefix is copied into preallocated buffers (no concatenation per step) and the steps use SDPA
    where the model has it. The caller holds `torch.no_grad()`.
    """
    import torch

    if len(stops) != rows:
        raise ValueError(f"{rows} rows need {rows} stop rules, got {len(stops)}")
    kw, attr = cache_io(model)
    device = input_ids.device
    n = input_ids.shape[1]
    cache = _row_cache(prefix_cache, rows, capacity=n - 1 + max_new_tokens)
    active = list(range(rows))
    generated: list[list[int]] = [[] for _ in range(rows)]
    cur = input_ids[:, -1:].expand(rows, 1)
    with _fast_attention(model):
        for t in range(max_new_tokens):
            pos = n - 1 + t
            out = model(
                input_ids=cur,
                **{kw: cache},
                use_cache=True,
                logits_to_keep=1,
                cache_position=torch.tensor([pos], device=device),
                position_ids=torch.full((len(active), 1), pos, device=device),
            )
            cache = getattr(out, attr)
            tokens = out.logits[:, -1].argmax(-1).tolist()
            keep = []
            for i, (r, token) in enumerate(zip(active, tokens, strict=True)):
                generated[r].append(token)
                if not stops[r](generated[r]):
                    keep.append(i)
            if not keep:
                break
            if len(keep) < len(active):
                idx = torch.tensor(keep, device=device)
                cache.batch_select_indices(idx)
                if on_select is not None:
                    on_select(idx)
                active = [active[i] for i in keep]
            cur = torch.tensor([[tokens[i]] for i in keep], device=device)
    return generated


@contextlib.contextmanager
def _fast_attention(model: Any) -> Any:
    """SDPA inside the block where the model runs eager attention and supports SDPA (the decode
    rows need no weights); otherwise the model's own implementation."""
    if model.config._attn_implementation != "eager" or not getattr(model, "_supports_sdpa", False):
        yield
        return
    with attention_implementation(model, "sdpa"):
        yield


def _row_cache(prefix: Any, rows: int, capacity: int) -> Any:
    """A copy of `prefix` with `rows` batch rows. Full-attention layers get buffers of `capacity`
    positions that each step writes into (a plain `DynamicLayer` concatenates its whole cache every
    step, which dominates a wide batch's step); other layers (sliding windows) are repeated."""
    import copy

    cache = copy.deepcopy(prefix)
    layer_cls = _reserved_layer()
    layers = getattr(cache, "layers", None)
    if layer_cls is None or layers is None:
        cache.batch_repeat_interleave(rows)
        return cache
    from transformers.cache_utils import DynamicLayer

    for i, layer in enumerate(layers):
        if type(layer) is DynamicLayer and layer.get_seq_length() > 0:
            layers[i] = layer_cls(layer.keys, layer.values, rows, capacity)
        else:
            layer.batch_repeat_interleave(rows)
    return cache


_RESERVED: list[Any] = []


def _reserved_layer() -> Any:
    """The `DynamicLayer` whose keys and values are views of preallocated buffers (built once)."""
    if not _RESERVED:
        try:
            from transformers.cache_utils import DynamicLayer
        except ImportError:  # a release without cache layers: the cache is repeated as it is
            _RESERVED.append(None)
            return None

        class ReservedLayer(DynamicLayer):  # type: ignore[misc]
            def __init__(self, keys: Any, values: Any, rows: int, capacity: int) -> None:
                super().__init__()
                b, h, n, _ = keys.shape
                self.kbuf = keys.new_empty(b * rows, h, max(capacity, n), keys.shape[-1])
                self.vbuf = values.new_empty(b * rows, h, max(capacity, n), values.shape[-1])
                self.kbuf[:, :, :n] = keys.repeat_interleave(rows, dim=0)
                self.vbuf[:, :, :n] = values.repeat_interleave(rows, dim=0)
                self.length, self.device, self.is_initialized = n, keys.device, True
                self._view()

            def _view(self) -> None:
                self.keys, self.values = self.kbuf[:, :, : self.length], self.vbuf[:, :, : self.length]

            def update(self, key_states: Any, value_states: Any, *args: Any, **kwargs: Any) -> tuple[Any, Any]:
                s = key_states.shape[-2]
                if self.length + s > self.kbuf.shape[2]:  # past the reservation: grow like a DynamicLayer
                    self.kbuf = _cat(self.kbuf[:, :, : self.length], key_states)
                    self.vbuf = _cat(self.vbuf[:, :, : self.length], value_states)
                else:
                    self.kbuf[:, :, self.length : self.length + s] = key_states
                    self.vbuf[:, :, self.length : self.length + s] = value_states
                self.length += s
                self._view()
                return self.keys, self.values

            def batch_select_indices(self, indices: Any) -> None:
                self.kbuf, self.vbuf = self.kbuf[indices], self.vbuf[indices]
                self._view()

            def crop(self, tokens_to_remove: int) -> None:
                if tokens_to_remove < 0:
                    self.length = max(0, self.length + tokens_to_remove)
                    self._view()

        _RESERVED.append(ReservedLayer)
    return _RESERVED[0]


def _cat(a: Any, b: Any) -> Any:
    import torch

    return torch.cat([a, b], dim=-2)


@dataclass(frozen=True)
class AttentionRows:
    """The eager attention rows of the queries `[start, end)` of a prompt, and the KV cache after
    them. `layers[l]` is `[batch, head, end - start, K_l]`: the weights of each query over the last
    K_l keys up to `end` (all keys, or a sliding-window layer's window); `first_key(l)` is the
    absolute position of key 0."""

    layers: tuple[Any, ...]
    cache: Any
    end: int

    def first_key(self, layer: int) -> int:
        return int(self.end - self.layers[layer].shape[-1])


def attention_rows(model: Any, input_ids: Any, start: int, end: int) -> AttentionRows:
    """Prefill `input_ids[:, :start]` with the model's current attention implementation, then feed
    the span `[start, end)` with eager attention and return its attention rows (never the full
    n x n matrix). The one place the package asks a model for attention weights besides the decode
    steps of `greedy_with_attentions`. The caller holds `torch.no_grad()`.

        with torch.no_grad():
            rows = attention_rows(model, ids, q0, q1)  # the question's rows
        for l, a in enumerate(rows.layers):  # a: [1, head, q1 - q0, K_l]
            keys = torch.arange(rows.first_key(l), q1)  # absolute key positions
    """
    kw, attr = cache_io(model)
    cache = getattr(model(input_ids=input_ids[:, :start], use_cache=True, logits_to_keep=1), attr) if start else None
    with attention_implementation(model, "eager"):
        out = model(
            input_ids=input_ids[:, start:end], **{kw: cache}, use_cache=True, logits_to_keep=1, output_attentions=True
        )
    return AttentionRows(tuple(out.attentions), getattr(out, attr), end)


def control_strings(tokenizer: Any) -> list[str]:
    """The texts the tokenizer turns into special tokens (`</s>`, `<|im_end|>`, `<|im_start|>`...)."""
    found = set(getattr(tokenizer, "all_special_tokens", None) or [])
    decoder = getattr(tokenizer, "added_tokens_decoder", None) or {}
    found |= {str(t.content) for t in decoder.values() if getattr(t, "special", False)}
    return sorted(s for s in found if s.strip())


def check_control_strings(tokenizer: Any, text: str) -> None:
    """One DataError when a user text (document, question, answer) holds a control string of the
    tokenizer: it would become a real token (an end of turn, a new assistant turn), not text."""
    hit = next((s for s in control_strings(tokenizer) if s in text), None)
    if hit is not None:
        raise DataError(f"the text holds the model's control string {hit!r}; remove it from the document or question")


def build_prompt(
    tokenizer: Any, user: str, *, chat: bool, assistant_prefix: str = "", plain_separator: str = ""
) -> str:
    """The text given to the model: with `chat` and a chat template, the template with one user
    message and the generation prompt; otherwise BOS (when the tokenizer adds one) + the message +
    `plain_separator`. `assistant_prefix` starts the answer in both cases. A message holding one of
    the tokenizer's control strings is refused (`check_control_strings`)."""
    check_control_strings(tokenizer, user)
    if chat and getattr(tokenizer, "chat_template", None):
        text: str = tokenizer.apply_chat_template(
            [{"role": "user", "content": user}], tokenize=False, add_generation_prompt=True
        )
    else:
        bos = tokenizer.bos_token if getattr(tokenizer, "bos_token", None) and adds_bos(tokenizer) else ""
        text = f"{bos}{user}{plain_separator}"
    return text + assistant_prefix


_PROBE = "\ue000\ue001"  # private-use characters: in no template and no real document


def build_prompt_at(
    tokenizer: Any, user: str, *, chat: bool, assistant_prefix: str = "", plain_separator: str = ""
) -> tuple[str, int]:
    """`build_prompt` and the character offset of the message in it, -1 when the template altered
    the message. Found where the template puts a probe message, not by searching the text: a
    message that also occurs in the template's header (or a document in the instruction) is not
    found there."""
    text, probe = (
        build_prompt(tokenizer, m, chat=chat, assistant_prefix=assistant_prefix, plain_separator=plain_separator)
        for m in (user, _PROBE)
    )
    pos, n = probe.find(_PROBE), len(user)
    same = text[:pos] == probe[:pos] and text[pos + n :] == probe[pos + len(_PROBE) :]
    return text, pos if pos >= 0 and same and text[pos : pos + n] == user else -1
