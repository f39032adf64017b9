"""`retrieval-heads export-heads`: KV-head lists for other tools (the authors' JSON, a
DuoAttention head table and attention pattern, what kvpress presses read)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from .options import KVScoreName, Scores, Sink, Window, choices

RANKINGS = ("retrieval", "needle_attention", "gain")  # the detection scores, or one that kv-eval measured


def export_heads_cmd(
    scores: Scores,
    out: Annotated[Path, typer.Option("--out", "-o", help="output folder")],
    budget: Annotated[
        float | None, typer.Option(help="KV-byte budget (share of full) that sets how many KV heads are whole")
    ] = None,
    n_whole: Annotated[int | None, typer.Option(help="number of KV heads kept whole (instead of --budget)")] = None,
    n_tokens: Annotated[int, typer.Option(help="context length the budget refers to")] = 4096,
    kv_heads: Annotated[
        int | None, typer.Option(help="KV heads per layer (default: from the run's model spec or the shipped map)")
    ] = None,
    sink: Sink = 4,
    window: Window = 60,
    ranking: Annotated[
        str,
        typer.Option(
            metavar=choices(RANKINGS),
            help="retrieval (the detection scores), or a ranking measured by kv-eval: needle_attention, gain "
            "(needs --kv-run)",
        ),
    ] = "retrieval",
    kv_run: Annotated[Path | None, typer.Option(help="kv-eval run folder holding the measured ranking")] = None,
    score: KVScoreName = None,
) -> None:
    """Write KV-head scores in the authors' JSON format, a DuoAttention-style 0/1 head table and a
    DuoAttention attention pattern (duo_pattern/: what DuoAttention's load_attn_pattern and kvpress's
    DuoAttentionPress or our RetrievalHeadsPress read)."""
    from ..errors import ConfigError, check_choice
    from ..heads import kv_head_scores, top_mask
    from ..kvcache import HeadPolicy, export_authors_json, export_duo_pattern, export_duo_tsv
    from ..kvcache.export import check_export_folder, kv_head_count, kv_score, measured_ranking
    from ..models import ModelSpec
    from ..results import DetectionResult, require_kept

    check_choice("ranking", ranking, RANKINGS)
    if (budget is None) == (n_whole is None):
        raise ConfigError("give exactly one of --budget and --n-whole")
    if budget is not None and not 0 < budget <= 1:
        raise ConfigError(f"--budget must lie within (0, 1], got {budget}")
    # a measured ranking replaces its scores: no default score to pick
    loaded = require_kept(DetectionResult.load(scores), scores)
    result, note = kv_score(loaded, score) if ranking == "retrieval" else (loaded.with_score(score or "copy"), None)
    if note:
        typer.echo(f"warning: {note}", err=True)
    s = result.scores
    n_layers, n_heads = s.shape
    spec_d = result.config.get("model_spec") or {}
    n_kv = kv_head_count(result.config, n_heads, kv_heads)
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
        kv = order = measured_ranking(kv_run, ranking, kv.shape)
    if n_whole is None:
        n_whole = HeadPolicy.n_whole_for(spec, float(budget), n_tokens, sink, window)  # type: ignore[arg-type]
    if not 0 <= n_whole <= n_layers * n_kv:
        raise ConfigError(f"--n-whole must be within 0..{n_layers * n_kv}")
    check_export_folder(out)  # nothing is written into a folder that holds exports we did not write
    out.mkdir(parents=True, exist_ok=True)
    about = {
        "source": "retrieval-heads export-heads",
        "model": result.name,
        "score": result.score_name,
        "ranking": ranking,
    }
    # the pattern first: its config carries the mark that makes the folder ours for the other two
    pattern = export_duo_pattern(out / "duo_pattern", order, sink=sink, recent=window, about=about)
    export_authors_json(out / "kv_head_scores.json", kv)
    export_duo_tsv(out / "full_attention_heads.tsv", top_mask(order, n_whole))
    typer.echo(
        f"{n_whole} of {n_layers * n_kv} KV heads whole; wrote {out / 'kv_head_scores.json'}, "
        f"{out / 'full_attention_heads.tsv'} and the DuoAttention/kvpress pattern {pattern}"
    )
