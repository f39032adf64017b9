"""`retrieval-heads attribute`: answer a question from your own documents and show where each
token came from; `grounding-eval` (does support catch hallucination? AUROC) and `passage-rank`
(HotpotQA paragraphs ranked by the heads' attention vs BM25)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from .options import (
    Chat,
    Device,
    DType,
    MaxNewTokens,
    Overwrite,
    Progress,
    ScoreName,
    Scores,
    ScoresModel,
    Threads,
    default_run_folder,
    load_scores,
    scores_label,
    setup_runtime,
)

K = Annotated[int, typer.Option("--k", min=1, help="watched heads: the top K of the score map")]
Engine = Annotated[str, typer.Option(help="fast (SDPA + captured rows) or reference (eager attention, the oracle)")]


def default_scores(model: str) -> str:
    """The shipped map of a model alias (`ref:<alias>`), the default heads of `attribute`."""
    from ..errors import ConfigError
    from ..reference import reference_names

    if model in reference_names():
        return f"ref:{model}"
    raise ConfigError(
        f"no shipped score map for {model!r}; give --scores (a detection run of this model: retrieval-heads detect "
        f"--model {model})"
    )


def attribute_cmd(
    question: Annotated[str, typer.Option("--question", "-q", help="the question to answer")],
    context: Annotated[Path, typer.Option(help="a text file, or a folder of .txt/.md files (one passage each)")],
    model: Annotated[str | None, typer.Option(help="model (default: the --scores run's, else smollm2-135m)")] = None,
    scores: Annotated[
        str | None,
        typer.Option(help="detection run folder, authors'-format JSON or ref:<name> (default: ref:<model>)"),
    ] = None,
    score: ScoreName = "copy",
    k: K = 10,
    max_new_tokens: MaxNewTokens = 48,
    engine: Engine = "fast",
    chat: Chat = True,
    out: Annotated[Path, typer.Option(help="folder for attribution.json and attribution.html")] = Path("attribution"),
    device: Device = "cpu",
    dtype: DType = "float32",
    threads: Threads = None,
) -> None:
    """Answer from your documents; per token, the context sentence the top retrieval heads point to
    and its support (share of heads copying it from the context). Writes JSON and an offline HTML page."""
    from ..attribution import ENGINES, attribute, load_context, watched_heads
    from ..errors import ConfigError
    from ..models import DEFAULT_MODEL, load_model

    setup_runtime(threads)
    if engine not in ENGINES:
        raise ConfigError(f"unknown engine {engine!r}; choose from {', '.join(ENGINES)}")
    if not question.strip():
        raise ConfigError("--question is empty")
    passages = load_context(context)  # bad files fail before the model loads
    source = scores or default_scores(model or DEFAULT_MODEL)
    det, name = load_scores(Path(source), model, score)
    heads = watched_heads(det, k)
    lm = load_model(name, device=device, dtype=dtype, attn_implementation="sdpa")  # type: ignore[arg-type]
    if det.shape != lm.spec.shape:
        raise ConfigError(f"{source} scores {det.shape[0]} x {det.shape[1]} heads; {lm.spec.name} has {lm.spec.shape}")
    att = attribute(
        lm,
        passages,
        question,
        heads,
        heads_source=scores_label(Path(source), score),
        max_new_tokens=max_new_tokens,
        chat=chat,
        engine=engine,
    )
    paths = att.save(out)
    s = att.scores
    typer.echo(f"answer: {att.answer}")
    typer.echo(
        f"support {s['copy']:.2f} (top-{k} copy share over content tokens); unsupported tokens "
        f"{100 * s['unsupported']:.0f} %; context mass {s['context_mass']:.2f}; mean log-prob {s['logprob']:.2f}"
    )
    unsupported = [t.text.strip() for t in att.tokens if not t.supported]
    if unsupported:
        typer.echo(f"no watched head copies: {', '.join(repr(t) for t in unsupported)}")
    for src in att.sources()[:3]:
        typer.echo(f"source ({src['tokens']} tokens) [{src['passage']}]: {src['text'][:160]}")
    typer.echo(f"wrote {paths[0]} and {paths[1]}")


def grounding_eval_cmd(
    scores: Scores,
    score: ScoreName = "copy",
    model: ScoresModel = None,
    k: K = 10,
    lengths: Annotated[
        str, typer.Option(help="NIAH document lengths (natural failures), comma list")
    ] = "3000,5000,7600",
    masked_k: Annotated[int, typer.Option(min=0, help="top heads masked for the masked-failure set")] = 10,
    masked_lengths: Annotated[str, typer.Option(help="NIAH lengths of the masked set (empty: none)")] = "1000,2000",
    squad_answerable: Annotated[int, typer.Option(min=0)] = 40,
    squad_unanswerable: Annotated[int, typer.Option(min=0)] = 30,
    seed: Annotated[int, typer.Option(help="seed of the SQuAD draw and of the bootstrap")] = 0,
    max_new_tokens: MaxNewTokens = 32,
    engine: Engine = "fast",
    chat: Chat = True,
    n_boot: Annotated[int, typer.Option(min=100, help="bootstrap resamples")] = 2000,
    out: Annotated[Path | None, typer.Option(help="run folder (default runs/<model>-grounding)")] = None,
    device: Device = "cpu",
    dtype: DType = "float32",
    threads: Threads = None,
    overwrite: Overwrite = False,
    progress: Progress = True,
) -> None:
    """Does retrieval-head support catch hallucination? AUROC against log-probability, entropy and all heads."""
    from ..experiments.grounding import GroundingConfig, grounding_eval
    from ..models import load_model
    from .options import comma_ints

    setup_runtime(threads)
    cfg = GroundingConfig(
        k=k,
        lengths=comma_ints(lengths, "--lengths"),
        masked_k=masked_k,
        masked_lengths=comma_ints(masked_lengths, "--masked-lengths") if masked_lengths.strip() else (),
        squad_answerable=squad_answerable,
        squad_unanswerable=squad_unanswerable,
        seed=seed,
        max_new_tokens=max_new_tokens,
        engine=engine,
        chat=chat,
    )
    det, name = load_scores(scores, model, score)
    lm = load_model(name, device=device, dtype=dtype, attn_implementation="sdpa")  # type: ignore[arg-type]
    out = out or default_run_folder(lm, "-grounding")
    res = grounding_eval(
        lm,
        det,
        cfg,
        out=out,
        overwrite=overwrite,
        show_progress=progress,
        scores_source=scores_label(scores, score),
        n_boot=n_boot,
        boot_seed=seed,
    )
    typer.echo(f"{lm.spec.name}: AUROC of answer scores for grounded vs ungrounded answers")
    typer.echo(res.table())
    typer.echo(f"run folder: {out} (summary.json, table.md, records.jsonl)")


def passage_rank_cmd(
    scores: Scores,
    score: ScoreName = "copy",
    model: ScoresModel = None,
    k: K = 10,
    limit: Annotated[int, typer.Option(min=1, help="HotpotQA questions")] = 50,
    seed: Annotated[int, typer.Option(help="seed of the question draw and of the bootstrap")] = 0,
    chat: Chat = True,
    n_boot: Annotated[int, typer.Option(min=100, help="bootstrap resamples")] = 2000,
    out: Annotated[Path | None, typer.Option(help="run folder (default runs/<model>-passages)")] = None,
    device: Device = "cpu",
    dtype: DType = "float32",
    threads: Threads = None,
    overwrite: Overwrite = False,
    progress: Progress = True,
) -> None:
    """Rank HotpotQA paragraphs by the attention the heads pay from the question; recall@2 vs BM25."""
    from ..experiments.passages import PassageConfig, passage_rank
    from ..models import load_model

    setup_runtime(threads)
    det, name = load_scores(scores, model, score)
    lm = load_model(name, device=device, dtype=dtype, attn_implementation="sdpa")  # type: ignore[arg-type]
    out = out or default_run_folder(lm, "-passages")
    res = passage_rank(
        lm,
        det,
        PassageConfig(limit=limit, seed=seed, k=k, chat=chat),
        out=out,
        overwrite=overwrite,
        show_progress=progress,
        scores_source=scores_label(scores, score),
        n_boot=n_boot,
        boot_seed=seed,
    )
    typer.echo(f"{lm.spec.name}: HotpotQA paragraph ranking, recall@2")
    typer.echo(res.table())
    typer.echo(f"run folder: {out} (summary.json, table.md, records.jsonl)")
