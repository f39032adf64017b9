"""Masking conditions: which heads a masked-task run masks. K = 0 (nothing masked, the
baseline), and for each K > 0 the top-K heads by score and, per seed, K heads drawn uniformly
without replacement with `numpy.random.default_rng([seed, K])` from a pool outside that top-K set
(the authors meant to exclude the top heads and never did; their draw was unseeded). Pools
(`RANDOM_POOLS`): "non-retrieval" (default, as in the paper: heads scoring <= 0.1, never a
retrieval head ranked just below K), "outside-top" (every other head, scored or not; the pool
of runs made before `random_pool` existed), "layer-matched" (per layer of the top K, as many
heads of that layer outside the top K as the top K has there, scored or not: the same depth
profile, so a draw cannot owe its harm to hitting other layers than the top K) or
"score-matched-low" (non-retrieval heads matched to the top K's attention: a draw cannot owe its
smaller harm to masking heads that barely attend to the needle).

score-matched-low, the rule (`score_matched_heads`): for each top-K head in ranking order, one
head is drawn uniformly (the same seeded generator) from the `MATCH_NEAREST` not yet chosen
non-retrieval heads whose needle attention mass (`needle_mass`, the mean attention a head puts on
the needle; `scoring.attention_scores`) is nearest to that top-K head's; heads tied at the edge of
that set all count. Drawing among a few nearest rather than taking the nearest keeps the seeds'
draws apart: the nearest alone would give every seed the same heads. The mass comes from the
detection result (a run folder or its summary; a bare score file has none: `matching_mass`).

    conditions = build_conditions(scores, ks=(0, 20), random_seeds=(0, 1))

`masked_task.run_masked` runs a task under them.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal, get_args

import numpy as np

from ..errors import ConfigError, check_choice
from ..heads import Head, random_heads, rank_heads
from ..results import RETRIEVAL_THRESHOLD, DetectionResult

RandomPool = Literal["non-retrieval", "outside-top", "layer-matched", "score-matched-low"]
MASS_SCORE = "needle_mass"  # the attention score that score-matched-low matches on
MATCH_NEAREST = 3  # score-matched-low draws each head among this many nearest in attention mass
# Where random-K heads are drawn from (always outside the top-K set): name -> how tables say it.
RANDOM_POOLS: dict[str, str] = {
    "non-retrieval": f"heads with score <= {RETRIEVAL_THRESHOLD:g} outside the top K",
    "outside-top": "every head outside the top K",
    "layer-matched": "heads outside the top K in the top K's layers, as many per layer as the top K has",
    "score-matched-low": f"heads with score <= {RETRIEVAL_THRESHOLD:g} outside the top K, each drawn among the "
    f"{MATCH_NEAREST} nearest to one top-K head in needle attention mass",
}
DEFAULT_RANDOM_POOL = "non-retrieval"
LEGACY_RANDOM_POOL = "outside-top"  # runs saved before the config recorded `random_pool`
assert tuple(RANDOM_POOLS) == get_args(RandomPool)
RANDOM_SEEDS = (0, 1)  # random draws per K, the default of every command (seeds 0..n-1)


def check_random_pool(pool: str) -> None:
    check_choice("random pool", pool, tuple(RANDOM_POOLS))


def random_pool_of(config: dict[str, Any]) -> str:
    """The pool a saved run drew its random heads from (old configs lack the key: outside-top)."""
    return str(config.get("random_pool", LEGACY_RANDOM_POOL))


def random_pool_line(config: dict[str, Any]) -> str:
    """The line a table shows above itself: where its random heads come from."""
    pool = random_pool_of(config)
    return f"random heads drawn from: {RANDOM_POOLS.get(pool, pool)} (pool {pool!r})"


@dataclass(frozen=True)
class Condition:
    """One masking condition: `kind` is base (K = 0), top or random (with its seed)."""

    kind: str
    k: int
    seed: int | None
    heads: tuple[Head, ...]
    watch: tuple[Head, ...]

    @property
    def id(self) -> str:
        return {"base": "base", "top": f"top-k{self.k}"}.get(self.kind, f"random-k{self.k}-s{self.seed}")

    def to_dict(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "kind": self.kind,
            "k": self.k,
            "seed": self.seed,
            "heads": [list(h) for h in self.heads],
            "watch": [list(h) for h in self.watch],
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any], *, watch: bool = True) -> Condition:
        """Back from `to_dict` (a run's saved config); `watch=False` leaves the watched heads out."""
        return cls(
            d["kind"],
            d["k"],
            d["seed"],
            tuple((int(l), int(h)) for l, h in d["heads"]),
            tuple((int(l), int(h)) for l, h in d["watch"]) if watch else (),
        )


def score_map(scores: DetectionResult | np.ndarray) -> np.ndarray:
    """The `[n_layers, n_heads]` retrieval scores of a detection result or an array, as floats."""
    return np.asarray(scores.scores if isinstance(scores, DetectionResult) else scores, dtype=float)


def tiebreak_map(scores: DetectionResult | np.ndarray) -> np.ndarray | None:
    """The second score that breaks ties in the ranking (`DetectionResult.tiebreak`); None for a
    bare array (its ties then go to the lower layer and head)."""
    return scores.tiebreak if isinstance(scores, DetectionResult) else None


def random_pool(scores: np.ndarray, order: Sequence[Head], k: int, pool: str) -> list[Head]:
    """The heads random-K draws from, in ranking order: outside the top K, and for "non-retrieval"
    and "score-matched-low" scoring <= 0.1 (unscored NaN heads are left out)."""
    check_random_pool(pool)
    rest = list(order[k:])
    if pool == "outside-top":
        return rest
    if pool == "layer-matched":
        layers = {h[0] for h in order[:k]}
        return [h for h in rest if h[0] in layers]
    return [h for h in rest if scores[h] <= RETRIEVAL_THRESHOLD]


def layer_matched_heads(order: Sequence[Head], k: int, seed: int) -> tuple[Head, ...]:
    """K heads outside the top K of `order`, as many in each layer as the top K has there: layer by
    layer (ascending), drawn without replacement from that layer's other heads (sorted) with one
    `numpy.random.default_rng([seed, k])`; sorted. The same (order, k, seed) gives the same heads."""
    top = order[:k]
    rng = np.random.default_rng([seed, k])
    out: list[Head] = []
    for layer in sorted({h[0] for h in top}):
        need = sum(h[0] == layer for h in top)
        others = sorted(h for h in order[k:] if h[0] == layer)
        if need > len(others):
            raise ConfigError(
                f"K={k}: layer {layer} holds {need} top-K heads and {len(others)} other heads to match "
                "them; use a smaller K or another --random-pool"
            )
        out += [others[i] for i in rng.choice(len(others), size=need, replace=False)]
    return tuple(sorted(out))


NO_MASS = (
    f"random pool 'score-matched-low' matches heads on their {MASS_SCORE} attention score, which these scores "
    "do not hold (a score file or shipped map keeps one score); give a detection run folder or choose another "
    "--random-pool"
)
MASS_TIE = 1e-12  # masses this close are equally near


def matching_mass(scores: DetectionResult | np.ndarray, pool: str, draws: bool = True) -> np.ndarray | None:
    """The attention-mass map `build_conditions` needs as `mass`: for "score-matched-low" with
    random draws, the `needle_mass` map of the detection result (one ConfigError when it has none);
    None for every other pool."""
    if pool != "score-matched-low" or not draws:
        return None
    if isinstance(scores, DetectionResult) and MASS_SCORE in scores.score_names():
        return np.asarray(scores.with_score(MASS_SCORE).scores, dtype=float)
    raise ConfigError(NO_MASS)


def score_matched_heads(
    pool: Sequence[Head], order: Sequence[Head], mass: np.ndarray, k: int, seed: int
) -> tuple[Head, ...]:
    """K heads of `pool`, one per top-K head of `order` (in ranking order): drawn uniformly with one
    `numpy.random.default_rng([seed, k])` among the `MATCH_NEAREST` not yet chosen pool heads whose
    `mass` is nearest to that top-K head's (all heads tied at the edge count; an unknown NaN mass is
    farthest); sorted. The same (pool, order, mass, k, seed) gives the same heads."""
    left = list(pool)
    if k > len(left):
        raise ConfigError(f"cannot draw {k} random heads from a pool of {len(left)}")
    rng = np.random.default_rng([seed, k])
    out: list[Head] = []
    for head in order[:k]:
        d = np.abs(np.array([mass[h] for h in left], dtype=float) - mass[head])
        d = np.where(np.isnan(d), np.inf, d)
        edge = np.sort(d)[min(MATCH_NEAREST, len(d)) - 1]
        near = np.flatnonzero(d <= edge + MASS_TIE)
        out.append(left.pop(int(near[rng.integers(len(near))])))
    return tuple(sorted(out))


def draw_random(
    scores: np.ndarray, order: Sequence[Head], k: int, pool: str, seed: int, mass: np.ndarray | None = None
) -> tuple[Head, ...]:
    """One random-K draw of `pool` (seeded by (seed, K)): per layer for "layer-matched", matched in
    attention `mass` for "score-matched-low" (`score_matched_heads`), else uniformly from
    `random_pool` (`heads.random_heads`)."""
    if pool == "layer-matched":
        return layer_matched_heads(order, k, seed)
    if pool == "score-matched-low":
        if mass is None:
            raise ConfigError(NO_MASS)
        return score_matched_heads(random_pool(scores, order, k, pool), order, mass, k, seed)
    return random_heads(random_pool(scores, order, k, pool), k, seed)


def build_conditions(
    scores: np.ndarray,
    ks: Sequence[int],
    random_seeds: Sequence[int],
    watch: int = 0,
    *,
    pool: str = DEFAULT_RANDOM_POOL,
    tiebreak: np.ndarray | None = None,
    mass: np.ndarray | None = None,
) -> list[Condition]:
    """Validate K values against the head count and build the conditions, base first.

    Top-K: the K best heads of `rank_heads(scores, tiebreak)` (ties by the second score).
    Random: per seed, K heads drawn from `random_pool(scores, order, K, pool)` (`draw_random`:
    uniformly, per layer for "layer-matched", matched in the attention `mass` map for
    "score-matched-low": `matching_mass`). `watch`: per condition, the best-ranked heads that are
    not masked (whose attention an experiment may follow)."""
    n = int(scores.size)
    order = rank_heads(scores, tiebreak)
    out: list[Condition] = []
    check_random_pool(pool)
    if np.isnan(scores).all():
        raise ConfigError("the score file scores no head (no kept detection sample); run a larger detection")
    if random_seeds and pool == "score-matched-low" and (mass is None or np.shape(mass) != scores.shape):
        raise ConfigError(NO_MASS)
    for k in sorted(set(ks)):
        if k < 0:
            raise ConfigError(f"K must be >= 0, got {k}")
        if k > n:
            raise ConfigError(f"K={k} is larger than the number of heads ({n})")
        if random_seeds and pool == "outside-top" and 2 * k > n:
            raise ConfigError(
                f"K={k}: cannot draw {k} random heads outside the top {k} of {n} heads; use K <= {n // 2}"
            )
        if random_seeds and k > 0 and pool == "layer-matched":
            layer_matched_heads(order, k, 0)  # raises when a layer lacks heads to match
        size = len(random_pool(scores, order, k, pool))
        if random_seeds and k > 0 and size < k:
            raise ConfigError(
                f"K={k}: cannot draw {k} random heads from the {size} {RANDOM_POOLS[pool]}; "
                "use a smaller K or --random-pool outside-top"
            )

    def watched(masked: tuple[Head, ...]) -> tuple[Head, ...]:
        m = set(masked)
        return tuple(h for h in order if h not in m)[:watch]

    for k in sorted(set(ks)):
        if k == 0:
            out.append(Condition("base", 0, None, (), watched(())))
            continue
        top = tuple(sorted(order[:k]))
        out.append(Condition("top", k, None, top, watched(top)))
        for s in random_seeds:
            r = draw_random(scores, order, k, pool, s, mass)
            out.append(Condition("random", k, s, r, watched(r)))
    return out


def execution_order(conditions: Sequence[Condition]) -> list[Condition]:
    """Base; then per K (ascending) the top-K and the first random draw; then the other draws seed
    by seed. A run stopped early (it resumes) already holds complete top-vs-random pairs."""
    seeds = sorted({c.seed for c in conditions if c.kind == "random" and c.seed is not None})
    first = seeds[0] if seeds else None

    def key(c: Condition) -> tuple[int, int, int]:
        if c.kind == "base":
            return (0, 0, 0)
        if c.kind == "top" or c.seed == first:
            return (1, c.k, 0 if c.kind == "top" else 1)
        assert c.seed is not None  # a random draw: always seeded
        return (2, seeds.index(c.seed), c.k)

    return sorted(conditions, key=key)
