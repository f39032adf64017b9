"""Our KV-head rankings as kvpress presses: `RetrievalHeadsPress` (whole heads) and `HeadKVPress`
(a token count per KV head).

kvpress (NVIDIA, PyPI `kvpress`) compresses the KV cache of a Hugging Face model during the
prefill through "presses" (forward hooks on the attention layers). Its `DuoAttentionPress` splits
KV heads into retrieval heads (every token) and streaming heads (sink + recent window), but loads
its head scores only from six patterns on the internet or an experimental on-the-fly estimate.
`RetrievalHeadsPress` is a `DuoAttentionPress` whose scores come from us: a detection run folder,
an authors'-format score file, a shipped reference map (`ref:NAME`), a DuoAttention pattern folder
(`retrieval-heads export-heads` writes one) or an array, any score of a run (`score=`).

    from kvpress import KVPressTextGenerationPipeline  # registers "kv-press-text-generation"
    from retrieval_heads.integrations.kvpress import RetrievalHeadsPress

    press = RetrievalHeadsPress(scores="runs/smollm2-135m", score="needle_mass", head_compression_ratio=0.5)
    pipe = pipeline("kv-press-text-generation", model=model, tokenizer=tokenizer)
    pipe(context, question=question, press=press)["answer"]

Two ways to say how much to compress:
- `head_compression_ratio` (DuoAttention's knob, what kvpress's evaluation sets for every
  `DuoAttentionPress`): the share of KV heads that become streaming heads;
- `kv_compression_ratio` (takes precedence when set): the share of KV pairs to remove, the true
  KV budget of kvpress issue 228. The number of streaming heads follows from the context length at
  the prefill (as our `HeadPolicy.for_budget` sizes the head-sparse cache), so the press removes at
  least that share.

Like every kvpress head-wise press this one *masks* the streaming heads' evicted keys (kvpress's
attention patch swaps in keys whose attention weight underflows to 0); the cache keeps its size.
Our `kvcache.HeadSparseCache` really holds fewer bytes with the same heads (`whole_mask()` gives the
mask it takes). Layers with a sliding window (Gemma3's local layers) are never compressed, as
kvpress does for Gemma3; ratios count the global layers only.

To use it in kvpress's evaluation harness (evaluation/evaluate_registry.py in the kvpress repo),
add an entry and pass `head_compression_ratio` as for DuoAttention:

    PRESS_REGISTRY["retrieval_heads"] = RetrievalHeadsPress(scores="/path/to/run", score="needle_mass")
    python evaluate.py --press_name retrieval_heads --head_compression_ratio 0.5 ...

`HeadKVPress` is HeadKV (Fu et al. 2024) with our scores: `compression_ratio` (the share of the
global layers' KV pairs to remove) is split over the KV heads as `kvcache.HeadKVPolicy` splits a
byte budget (every head keeps `sink_size` first and `recent_size` last tokens, the rest of the budget
is shared in proportion to the scores, a head at most the whole context); inside each head the
tokens kept are those kvpress's `SnapKVPress` scores highest. Like kvpress's `AdaKVPress` it masks
what it evicts.

    press = HeadKVPress(scores="runs/smollm2-135m", score="needle_mass", compression_ratio=0.75)

This module imports kvpress; nothing else in the package imports this module.
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..errors import ConfigError, DataError
from ..heads import kv_head_scores, top_mask
from ..kvcache.export import PATTERN_TSV, kv_score, read_duo_pattern
from ..kvcache.policies import HeadKVPolicy, HeadPolicy
from ..models import ModelSpec, spec_from_config
from ..results import DetectionResult, require_kept

try:
    from kvpress import BasePress, DuoAttentionPress, SnapKVPress
except ImportError as e:  # pragma: no cover - depends on the environment
    raise ImportError(
        f"retrieval_heads.integrations.kvpress needs kvpress: pip install 'retrieval-heads[kvpress]' ({e})"
    ) from e

logger = logging.getLogger(__name__)
ScoreSource = str | Path | np.ndarray


def load_kv_ranking(source: ScoreSource, spec: ModelSpec, score: str | None = None) -> np.ndarray:
    """`[n_layers, n_kv_heads]` map whose order is the KV-head ranking of `source` for `spec`'s model.

    source: a run folder, an authors'-format JSON, `ref:NAME` (ranked as kv-eval ranks them: `score`,
    by default needle_mass when the source holds it, else copy with a warning; ties by the second
    score, max over the query heads of a KV head); a DuoAttention pattern folder
    or its `full_attention_heads.tsv` (its values); or an array over query heads `[n_layers, n_heads]`
    or KV heads `[n_layers, n_kv_heads]`; an `export-heads` folder (its `duo_pattern/`). NaN = not
    scored (ranks last)."""
    if isinstance(source, np.ndarray):
        arr = np.asarray(source, dtype=float)
        if arr.shape == spec.shape:
            return kv_head_scores(arr, spec)
        if arr.shape == (spec.n_layers, spec.n_kv_heads):
            return arr
        raise ConfigError(
            f"head scores have shape {arr.shape}; {spec.name} needs {spec.shape} (query heads) "
            f"or {(spec.n_layers, spec.n_kv_heads)} (KV heads)"
        )
    p = Path(source)
    if p.is_dir() and (p / "duo_pattern" / PATTERN_TSV).is_file():  # an `export-heads` folder: its graded pattern
        p = p / "duo_pattern"
    if (p.is_dir() and (p / PATTERN_TSV).is_file() and not (p / "records.jsonl").exists()) or p.suffix == ".tsv":
        values, _ = read_duo_pattern(p)
        if values.shape != (spec.n_layers, spec.n_kv_heads):
            raise DataError(
                f"{p}: pattern has shape {values.shape}; {spec.name} has {spec.n_layers} x {spec.n_kv_heads}"
            )
        return values
    result, note = kv_score(require_kept(DetectionResult.load(source), source), score)
    if note:
        logger.warning(note)
    if result.shape != spec.shape:
        raise DataError(f"{source}: scores have shape {result.shape}; {spec.name} has {spec.shape} heads")
    return kv_head_scores(result.ranking_scores(), spec)


def ranked_spec(
    model: Any, scores: ScoreSource, score: str | None, spec: ModelSpec | None, ranking: np.ndarray | None
) -> tuple[ModelSpec, np.ndarray]:
    """`model`'s spec and the KV-head ranking of `scores` for it (`ranking` reused while the shape is
    the same as `spec`'s)."""
    new = spec_from_config(model.config, type(model).__name__)
    if not any(w is None for w in new.sliding_window):
        raise ConfigError(f"{new.name}: every layer uses a sliding window; nothing for the press to compress")
    if ranking is None or spec is None or (spec.n_layers, spec.n_kv_heads) != (new.n_layers, new.n_kv_heads):
        ranking = load_kv_ranking(scores, new, score)
    return new, ranking


def layer_to_compress(press: str, spec: ModelSpec | None, ready: bool, module: Any) -> int | None:
    """The index of `module`'s layer, or None for a sliding-window layer (left as it is, as kvpress
    does for Gemma3); refuses a press not set up for its model, and eager attention."""
    if spec is None or not ready:
        raise ConfigError(f"{press} used before post_init_from_model (use it as `with press(model):`)")
    if module.config._attn_implementation == "eager":
        # kvpress masks keys in the attention functions it patches; eager attention is not one of them
        raise ConfigError(f"{press} needs sdpa or flash attention, not eager")
    layer = int(module.layer_idx)
    return layer if spec.sliding_window[layer] is None else None


@dataclass
class RetrievalHeadsPress(DuoAttentionPress):
    """DuoAttention-style press with our KV-head ranking: the best-ranked KV heads of the global
    layers keep every token, the others keep `sink_size` first + `recent_size` last tokens.

    scores: see `load_kv_ranking`; score: which score of a run (copy, needle_mass, topk_mass, ...;
    default: needle_mass when the run holds it, else copy with a warning);
    head_compression_ratio: share of the global layers' KV heads made streaming heads;
    kv_compression_ratio: share of the KV pairs to remove (overrides head_compression_ratio).
    """

    scores: ScoreSource | None = field(default=None, compare=False)
    score: str | None = None
    sink_size: int = 4  # DuoAttentionPress reads these two from its pattern; ours are set here
    recent_size: int = 60
    kv_compression_ratio: float | None = None
    streaming_mask: torch.Tensor | None = field(init=False, default=None, compare=False)  # as DuoAttentionPress's
    kv_ranking: np.ndarray | None = field(init=False, default=None, repr=False, compare=False)
    spec: ModelSpec | None = field(init=False, default=None, repr=False, compare=False)
    n_streaming: int = field(init=False, default=0)

    def __post_init__(self) -> None:
        self._check()

    def _check(self) -> None:
        if self.scores is None:
            raise ConfigError("RetrievalHeadsPress needs scores= (a run folder, score file, pattern or array)")
        if not 0 <= self.head_compression_ratio <= 1:
            raise ConfigError(f"head_compression_ratio must lie within [0, 1], got {self.head_compression_ratio}")
        if self.kv_compression_ratio is not None and not 0 <= self.kv_compression_ratio < 1:
            raise ConfigError(f"kv_compression_ratio must lie within [0, 1), got {self.kv_compression_ratio}")
        if self.sink_size < 0 or self.recent_size < 1:
            raise ConfigError(f"sink_size must be >= 0 and recent_size >= 1, got {self.sink_size}, {self.recent_size}")

    # -- kvpress hooks
    def post_init_from_model(self, model: Any) -> None:
        """Load and rank the scores for `model` (once per model shape), then choose the streaming
        heads for `head_compression_ratio` (`kv_compression_ratio`: at the prefill)."""
        self._check()  # kvpress's evaluation sets head_compression_ratio after construction
        assert self.scores is not None  # _check
        self.spec, self.kv_ranking = ranked_spec(model, self.scores, self.score, self.spec, self.kv_ranking)
        n_global = self._global_spec().n_layers * self.spec.n_kv_heads
        self._set_streaming(int(round(n_global * self.head_compression_ratio)), model.device)  # noqa: RUF046

    def compress(
        self,
        module: Any,
        hidden_states: torch.Tensor,
        keys: torch.Tensor,
        values: torch.Tensor,
        attentions: Any,
        kwargs: dict[str, Any],
    ) -> tuple[torch.Tensor, torch.Tensor]:
        layer = layer_to_compress("RetrievalHeadsPress", self.spec, self.streaming_mask is not None, module)
        if layer is None:
            return keys, values
        assert self.spec is not None and self.streaming_mask is not None  # layer_to_compress
        k_len = int(keys.shape[2])
        if self.kv_compression_ratio is not None and layer == self._first_global():
            budget = 1.0 - self.kv_compression_ratio
            n_whole = HeadPolicy.n_whole_for(self._global_spec(), budget, k_len, self.sink_size, self.recent_size)
            self._set_streaming(self._global_spec().n_layers * self.spec.n_kv_heads - n_whole, keys.device)
        cut = max(0, k_len - self.sink_size - self.recent_size)
        streaming = self.streaming_mask[layer]
        if cut and bool(streaming.any()):
            masked = torch.zeros(keys.shape[:3], dtype=torch.bool, device=keys.device)
            masked[:, streaming, self.sink_size : self.sink_size + cut] = True
            module.masked_key_indices = torch.nonzero(masked, as_tuple=True)  # read by kvpress's attention patch
        n_global = self._global_spec().n_layers * self.spec.n_kv_heads
        self.compression_ratio_ = self.n_streaming / n_global * cut / k_len
        return keys, values

    # -- our side
    def whole_mask(self) -> np.ndarray:
        """bool `[n_layers, n_kv_heads]`: the KV heads that keep every token (sliding layers: all),
        the mask `kvcache.HeadSparseCache` takes for the same heads."""
        if self.streaming_mask is None:
            raise ConfigError("the press has no heads yet: run it on a model first (post_init_from_model)")
        return np.asarray(~self.streaming_mask.cpu().numpy(), dtype=bool)

    def _global_spec(self) -> ModelSpec:
        """`spec` reduced to its global layers (what the ratios count)."""
        assert self.spec is not None
        n = sum(w is None for w in self.spec.sliding_window)
        return dataclasses.replace(self.spec, n_layers=n, sliding_window=(None,) * n)

    def _first_global(self) -> int:
        assert self.spec is not None
        return next(i for i, w in enumerate(self.spec.sliding_window) if w is None)

    def _set_streaming(self, n_streaming: int, device: Any = None) -> None:
        """Streaming heads: the `n_streaming` worst-ranked KV heads of the global layers."""
        assert self.spec is not None and self.kv_ranking is not None
        local = np.array([w is not None for w in self.spec.sliding_window])
        rank = np.where(local[:, None], np.inf, np.nan_to_num(self.kv_ranking, nan=-np.inf))
        n_total = self.spec.n_layers * self.spec.n_kv_heads
        whole = top_mask(rank, n_total - n_streaming)
        self.n_streaming = int(n_streaming)
        dev = device if device is not None else (None if self.streaming_mask is None else self.streaming_mask.device)
        self.streaming_mask = torch.as_tensor(~whole, dtype=torch.bool, device=dev)


@dataclass
class HeadKVPress(BasePress):
    """HeadKV with our KV-head scores: a token count per KV head of the global layers, in proportion
    to its score (`kvcache.HeadKVPolicy`), the tokens inside a head chosen by kvpress's SnapKV score.

    scores, score: as for `RetrievalHeadsPress`; compression_ratio: share of the global layers' KV
    pairs to remove; sink_size, recent_size: what every head keeps (the shared base); window_size,
    kernel_size: SnapKV's observation window and pooling (`SnapKVPress`).
    """

    scores: ScoreSource | None = field(default=None, compare=False)
    score: str | None = None
    compression_ratio: float = 0.0
    sink_size: int = 4
    recent_size: int = 60
    window_size: int = 32
    kernel_size: int = 5
    kv_ranking: np.ndarray | None = field(init=False, default=None, repr=False, compare=False)
    spec: ModelSpec | None = field(init=False, default=None, repr=False, compare=False)
    budgets: np.ndarray | None = field(init=False, default=None, repr=False, compare=False)  # [layers, KV heads]
    base: tuple[int, int] = field(init=False, default=(0, 0), repr=False, compare=False)  # sink, recent kept

    def __post_init__(self) -> None:
        self._check()

    def _check(self) -> None:
        if self.scores is None:
            raise ConfigError("HeadKVPress needs scores= (a run folder, score file, pattern or array)")
        if not 0 <= self.compression_ratio < 1:
            raise ConfigError(f"compression_ratio must lie within [0, 1), got {self.compression_ratio}")
        if self.sink_size < 0 or self.recent_size < 0 or self.window_size < 1:
            raise ConfigError(
                f"sink_size and recent_size must be >= 0 and window_size >= 1, got "
                f"{self.sink_size}, {self.recent_size}, {self.window_size}"
            )

    def post_init_from_model(self, model: Any) -> None:
        """Load and rank the scores for `model` (once per model shape)."""
        self._check()  # kvpress's evaluation sets compression_ratio after construction
        assert self.scores is not None  # _check
        self.spec, self.kv_ranking = ranked_spec(model, self.scores, self.score, self.spec, self.kv_ranking)

    def compress(
        self,
        module: Any,
        hidden_states: torch.Tensor,
        keys: torch.Tensor,
        values: torch.Tensor,
        attentions: Any,
        kwargs: dict[str, Any],
    ) -> tuple[torch.Tensor, torch.Tensor]:
        layer = layer_to_compress("HeadKVPress", self.spec, self.kv_ranking is not None, module)
        if layer is None or self.compression_ratio == 0:
            return keys, values
        assert self.spec is not None  # layer_to_compress
        k_len = int(keys.shape[2])
        if self.budgets is None or layer == next(i for i, w in enumerate(self.spec.sliding_window) if w is None):
            policy = HeadKVPolicy.for_budget(
                self.spec,
                1.0 - self.compression_ratio,
                k_len,
                sink=self.sink_size,
                window=self.recent_size,
                ranking=self.kv_ranking,
            )  # once per prefill, at its first global layer
            self.budgets, self.base = np.asarray(policy.budgets), (policy.sink, policy.window)
        counts = torch.as_tensor(self.budgets[layer], device=keys.device)
        w = min(self.window_size, hidden_states.shape[1] - 1)
        if w < 1 or bool((counts >= k_len).all()):
            return keys, values
        snap = SnapKVPress(window_size=w, kernel_size=self.kernel_size)
        scores = snap.score(module, hidden_states, keys, values, attentions, kwargs)  # [B, KV heads, k_len]
        scores[..., : self.base[0]] = float("inf")  # the shared base first
        scores[..., k_len - self.base[1] :] = float("inf")
        order = scores.argsort(dim=-1, descending=True, stable=True)
        rank = torch.empty_like(order).scatter_(-1, order, torch.arange(k_len, device=keys.device).expand_as(order))
        module.masked_key_indices = torch.nonzero(rank >= counts[None, :, None], as_tuple=True)  # kvpress's patch
        return keys, values
