"""KV-head lists for other tools: the authors' score-file format, DuoAttention-style 0/1 tables and
DuoAttention attention patterns (the folder layout DuoAttention's `load_attn_pattern` and kvpress's
`DuoAttentionPress` read: `config.json` with `sink_size`/`recent_size` and `full_attention_heads.tsv`,
one row per layer, one tab-separated value in [0, 1] per KV head, higher = keep the whole cache)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from ..errors import ConfigError, DataError
from ..heads import rank_heads
from ..scorefile import atomic_write_text, read_json, read_json_or_none
from ..userfiles import MAX_CONFIG, MAX_TEXT, read_text

KV_SCORE = "needle_mass"  # the best KV-head ranking we measured (SmolLM2, 4K, half the bytes: 0.94 vs copy 0.23)
PATTERN_TSV = "full_attention_heads.tsv"  # the file names DuoAttention and kvpress look for
PATTERN_CONFIG = "config.json"
AUTHORS_JSON = "kv_head_scores.json"  # the names export-heads writes into its --out folder
PATTERN_DIR = "duo_pattern"
EXPORT_SOURCE = "retrieval-heads export-heads"  # in the pattern's config: the mark of a folder we wrote

if TYPE_CHECKING:
    from ..results import DetectionResult


def kv_score(result: DetectionResult, score: str | None = None) -> tuple[DetectionResult, str | None]:
    """The score a KV consumer (kv-eval, export-heads, the kvpress press) ranks KV heads by: `score`,
    else needle_mass when `result` holds it, else its own score (copy) with a one-line note saying
    so (the note is None when there is nothing to say)."""
    if score is not None:
        return result.with_score(score), None
    if KV_SCORE in result.score_names():
        return result.with_score(KV_SCORE), None
    return result, (
        f"{result.name} holds no {KV_SCORE} score (a run folder of detect has it); "
        f"ranking KV heads by {result.score_name}, a weaker KV ranking"
    )


def kv_head_count(config: dict[str, Any], n_heads: int, given: int | None = None) -> int:
    """KV heads per layer of the model behind a score map of `n_heads` query heads: `given`
    (--kv-heads), else the detection run's model spec, else the shipped map's shape. Unknown is an
    error: taking the query heads as KV heads would write a pattern of the wrong shape for a
    grouped-query model, silently."""
    n = given or (config.get("model_spec") or {}).get("n_kv_heads") or (config.get("reference") or {}).get("n_kv_heads")
    if not n:
        raise ConfigError("the scores do not say how many KV heads the model has; give --kv-heads")
    if n < 1 or n_heads % n:
        raise ConfigError(f"{n_heads} query heads cannot be grouped into {n} KV heads")
    return int(n)


def _written_by_us(pattern_config: Path) -> bool:
    obj = read_json_or_none(pattern_config) if pattern_config.is_file() else None
    return isinstance(obj, dict) and obj.get("source") == EXPORT_SOURCE


def _refuse_foreign(files: list[Path], pattern_config: Path) -> None:
    """One ConfigError when any of `files` exists and the folder is not ours: it is ours only when
    `pattern_config` carries our mark."""
    found = [p for p in files if p.exists() or p.is_symlink()]
    if found and not _written_by_us(pattern_config):
        raise ConfigError(f"{found[0]} exists and export-heads did not write it; give another output folder")


def check_export_folder(folder: str | Path) -> None:
    """Refuse (one ConfigError) to write exports into `folder` when it holds a file of their names
    that export-heads did not write (a trained DuoAttention pattern, a user's score file). export-heads
    checks before anything is written, then writes the marked pattern first, so the other two
    exports find the folder marked as ours."""
    d = Path(folder)
    names = [d / AUTHORS_JSON, d / PATTERN_TSV, d / PATTERN_DIR / PATTERN_TSV, d / PATTERN_DIR / PATTERN_CONFIG]
    _refuse_foreign(names, d / PATTERN_DIR / PATTERN_CONFIG)


def measured_ranking(kv_run: str | Path | None, ranking: str, shape: tuple[int, ...]) -> np.ndarray:
    """The KV-head scores `[n_layers, n_kv_heads]` of a ranking that `kv-eval` measured and stored in
    its records (the last one); a missing run or ranking is a ConfigError, a malformed record
    (no `kv_scores`, not numbers, infinite or of another shape) one DataError line."""
    from ..runs import RECORDS_FILE, read_records

    records = Path(kv_run) / RECORDS_FILE if kv_run is not None else None
    if records is None or not records.is_file():
        raise ConfigError(f"--ranking {ranking} needs --kv-run, a kv-eval run folder with {RECORDS_FILE}")
    found = [r for r in read_records(records) if r.get("kind") == "ranking" and r.get("ranking") == ranking]
    if not found:
        raise ConfigError(f"{kv_run} holds no {ranking} ranking (run kv-eval with --policies including {ranking})")
    try:
        kv = np.asarray(found[-1]["kv_scores"], dtype=float)
    except (KeyError, TypeError, ValueError, OverflowError):
        raise DataError(f"{records}: the {ranking} ranking record holds no list of KV-head scores") from None
    if kv.shape != tuple(shape):
        raise ConfigError(
            f"the {ranking} ranking in {kv_run} has shape {kv.shape}; the scores' model needs {tuple(shape)}"
        )
    if np.isinf(kv).any():
        raise DataError(f"{records}: the {ranking} ranking holds infinite scores")
    return kv


def export_authors_json(path: str | Path, kv_scores: np.ndarray) -> None:
    """The authors' score-file format `{"<layer>-<kv head>": [score]}` over KV heads (NaN -> 0)."""
    check_export_folder(Path(path).parent)
    s = np.nan_to_num(np.asarray(kv_scores, dtype=float), nan=0.0)
    obj = {f"{l}-{k}": [float(s[l, k])] for l in range(s.shape[0]) for k in range(s.shape[1])}
    atomic_write_text(path, json.dumps(obj))


def export_duo_tsv(path: str | Path, whole: np.ndarray) -> None:
    """DuoAttention-style full-attention-head pattern: one line per layer, one tab-separated
    0/1 per KV head (1 = keep the whole cache)."""
    check_export_folder(Path(path).parent)
    rows = ["\t".join(str(int(x)) for x in row) for row in np.asarray(whole, dtype=bool)]
    atomic_write_text(path, "\n".join(rows) + "\n")


def read_duo_tsv(path: str | Path) -> np.ndarray:
    """Read a DuoAttention-style pattern back as bool `[n_layers, n_kv_heads]` (values >= 0.5 are 1)."""
    return _read_table(Path(path)) >= 0.5


def _read_table(tsv: Path) -> np.ndarray:
    """The rows of tab-separated numbers of a pattern file, `[n_layers, n_kv_heads]`."""
    rows = [line.split() for line in read_text(tsv, MAX_TEXT).splitlines() if line.strip()]
    try:
        values = np.array([[float(x) for x in r] for r in rows])
    except ValueError:
        raise DataError(f"{tsv}: expected rows of numbers separated by tabs") from None
    if values.ndim != 2 or values.size == 0:
        raise DataError(f"{tsv}: rows have different lengths or the file is empty")
    return values


def pattern_values(kv_scores: np.ndarray) -> np.ndarray:
    """`[n_layers, n_kv_heads]` values in [0, 1] in the order of `kv_scores` (NaN last): the best KV
    head 1, the worst 0, evenly spaced. Ranks, not raw scores: both readers only sort the values
    (kvpress keeps the top share, DuoAttention cuts at a sparsity quantile), and distinct values keep
    our tie-break instead of theirs (DuoAttention adds noise to ties, kvpress sorts ties by index)."""
    s = np.asarray(kv_scores, dtype=float)
    order = rank_heads(s)
    out = np.zeros(s.shape)
    n = len(order)
    for pos, (layer, head) in enumerate(order):
        out[layer, head] = 1.0 if n == 1 else (n - 1 - pos) / (n - 1)
    return out


def export_duo_pattern(
    folder: str | Path, kv_scores: np.ndarray, *, sink: int, recent: int, about: dict[str, Any] | None = None
) -> Path:
    """Write a DuoAttention attention pattern into `folder` (`pattern_values` of the KV-head scores,
    `config.json` with the streaming heads' sink and recent sizes plus `about`, our provenance)."""
    d = Path(folder)
    _refuse_foreign([d / PATTERN_TSV, d / PATTERN_CONFIG], d / PATTERN_CONFIG)
    d.mkdir(parents=True, exist_ok=True)
    values = pattern_values(kv_scores)
    atomic_write_text(d / PATTERN_TSV, "\n".join("\t".join(f"{x:.6f}" for x in row) for row in values) + "\n")
    config = {"sink_size": int(sink), "recent_size": int(recent), "source": EXPORT_SOURCE, **(about or {})}
    atomic_write_text(d / PATTERN_CONFIG, json.dumps(config, indent=1))
    return d


def read_duo_pattern(path: str | Path) -> tuple[np.ndarray, dict[str, Any]]:
    """A DuoAttention pattern as (values `[n_layers, n_kv_heads]` clipped to [0, 1], its config or {}).
    `path`: the pattern folder or its `full_attention_heads.tsv`."""
    p = Path(path)
    tsv = p / PATTERN_TSV if p.is_dir() else p
    if not tsv.exists():
        raise DataError(f"{tsv}: file not found (a DuoAttention pattern holds {PATTERN_TSV})")
    values = _read_table(tsv)
    cfg_path = tsv.parent / PATTERN_CONFIG
    config: dict[str, Any] = {}
    if cfg_path.exists():
        config = read_json(cfg_path, MAX_CONFIG)
        if not isinstance(config, dict):
            raise DataError(f"{cfg_path}: expected a JSON object")
    return np.clip(values, 0.0, 1.0), config
