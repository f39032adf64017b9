"""`retrieval-heads attribute`: answer a question from your own documents (or trace an answer you
already have) and show where each token came from; one question, or a JSONL file of them."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer

from .options import (
    Chat,
    MaxNewTokens,
    ScoreName,
    ScoresModel,
    Watch,
    choices,
    load_scores,
    open_model,
    scores_label,
    with_model_options,
)

if TYPE_CHECKING:
    from ..attribution import Attribution

ENGINES = ("fast", "reference")  # attribution.ENGINES, spelled here so that --help imports nothing heavy
Engine = Annotated[
    str,
    typer.Option(
        metavar=choices(ENGINES),
        help="fast (SDPA + captured rows) or reference (eager attention, the oracle): the same readings",
    ),
]


def _report(att: Attribution, watch: int) -> None:
    s = att.scores
    typer.echo(f"answer{' (given)' if att.given else ''}: {att.answer}")
    typer.echo(
        f"support {s['copy']:.2f} (top-{watch} copy share over content tokens); unsupported tokens "
        f"{100 * s['unsupported']:.0f} %; from the question {100 * s['from_question']:.0f} %; "
        f"context mass {s['context_mass']:.2f}; mean log-prob {s['logprob']:.2f}"
    )
    unsupported = [t.text.strip() for t in att.tokens if t.state == "unsupported"]
    if unsupported:
        typer.echo(f"no watched head copies: {', '.join(repr(t) for t in unsupported)}")
    for src in att.sources()[:3]:
        typer.echo(f"source ({src['tokens']} tokens) [{src['passage']}]: {src['text'][:160]}")


@with_model_options
def attribute_cmd(
    question: Annotated[str | None, typer.Option("--question", "-q", help="the question to answer")] = None,
    context: Annotated[
        Path | None, typer.Option(help="a text file, or a folder of .txt/.md files (one passage each)")
    ] = None,
    answer: Annotated[
        str | None, typer.Option(help="an answer you already have: its tokens are traced instead of generated")
    ] = None,
    questions: Annotated[
        Path | None,
        typer.Option(
            help="JSONL, one question a line: question, context (text) or context_file, optional answer and id; "
            "one model load, one attributions.jsonl and one page"
        ),
    ] = None,
    prompt_template: Annotated[
        str | None,
        typer.Option(
            help="the user message, with {context} and {question} (default: instruction, documents, question)"
        ),
    ] = None,
    model: ScoresModel = None,
    scores: Annotated[
        str | None,
        typer.Option(
            help="detection run folder, authors'-format JSON or ref:<name> (default: the map shipped for the model)"
        ),
    ] = None,
    score: ScoreName = "copy",
    watch: Watch = 10,
    max_new_tokens: MaxNewTokens = 48,
    engine: Engine = "fast",
    chat: Chat = True,
    out: Annotated[
        Path,
        typer.Option("--out", "-o", help="folder for attribution.json (or attributions.jsonl) and attribution.html"),
    ] = Path("attribution"),
    model_options: dict[str, Any] | None = None,
) -> None:
    """Answer from your documents; per token, the context sentence the top retrieval heads point to
    and its support (share of heads copying it from the context). Writes JSON and an offline HTML page."""
    from ..attribution import (
        attribute,
        attribute_batch,
        load_context,
        read_questions,
        save_batch,
        shipped_map,
        watched_heads,
    )
    from ..attribution.context import check_template
    from ..errors import ConfigError
    from ..models import DEFAULT_MODEL

    if engine not in ENGINES:
        raise ConfigError(f"unknown engine {engine!r}; choose from {', '.join(ENGINES)}")
    if prompt_template is not None:
        check_template(prompt_template)
    if questions is not None:
        if question is not None or answer is not None:
            raise ConfigError("--questions takes the questions and answers from its file: drop --question/--answer")
        batch = read_questions(questions, load_context(context) if context else ())  # bad lines fail before the model
    else:
        if question is None or not question.strip():
            raise ConfigError("--question is empty" if question is not None else "give --question or --questions")
        if context is None:
            raise ConfigError("give --context (a file or a folder of documents)")
        if answer is not None and not answer.strip():
            raise ConfigError("--answer is empty")
        passages = load_context(context)  # bad files fail before the model loads
    source = scores or shipped_map(model or DEFAULT_MODEL)
    if source is None:
        raise ConfigError(
            f"no shipped score map for {model!r}; give --scores (a detection run of this model: retrieval-heads "
            f"detect --model {model})"
        )
    det, name = load_scores(Path(source), model, score)
    heads = watched_heads(det, watch)
    lm = open_model(name, attn_implementation="sdpa", **(model_options or {}))
    if det.shape != lm.spec.shape:
        raise ConfigError(f"{source} scores {det.shape[0]} x {det.shape[1]} heads; {lm.spec.name} has {lm.spec.shape}")
    label = scores_label(Path(source), score)
    if questions is None:
        att = attribute(
            lm,
            passages,
            question or "",
            heads,
            answer=answer,
            prompt_template=prompt_template,
            heads_source=label,
            max_new_tokens=max_new_tokens,
            chat=chat,
            engine=engine,
        )
        paths = att.save(out)
        _report(att, watch)
    else:
        atts = attribute_batch(
            lm,
            batch,
            heads,
            prompt_template=prompt_template,
            heads_source=label,
            max_new_tokens=max_new_tokens,
            chat=chat,
            engine=engine,
            on_done=lambda i, a: typer.echo(f"[{batch[i].id}] support {a.support:.2f}: {a.answer[:100]}"),
        )
        paths = save_batch(atts, out, [q.id for q in batch])
    typer.echo(f"wrote {paths[0]} and {paths[1]}")
