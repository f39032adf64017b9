"""The `retrieval-heads` command: a thin layer over the Python API.

The app registers every command, one module per command (`cli/<command>.py`; analyze, compare and
report share `analysis`; task-eval and task-plot share `task_eval`, finetune-eval and finetune-plot
`finetune`), in four help panels: find heads, study them, evaluate what they do, use them; the
maintainer command docs-tables is hidden. Commands share `options` and never import this module.
Bad input (any RetrievalHeadsError) is shown as one line on stderr with exit code 2.
"""

from __future__ import annotations

import os
import sys
from typing import Annotated

import typer

from ..errors import RetrievalHeadsError
from . import (
    analysis,
    attribute,
    detect,
    docs_tables,
    export_heads,
    finetune,
    grounding_eval,
    kv_eval,
    mask_eval,
    merge,
    passage_rank,
    refs,
    task_eval,
)

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    help="Find, study and use the retrieval heads of transformer language models.",
)


DEBUG_ENV = "RETRIEVAL_HEADS_DEBUG"  # =1: tracebacks instead of one-line errors
_debug = {"on": False}  # set by --debug for this invocation


def _version(show: bool) -> None:
    if show:
        from .. import __version__
        from ..models import default_model_note

        typer.echo(f"retrieval-heads {__version__} ({default_model_note()})")
        raise typer.Exit()


@app.callback()
def root(
    debug: Annotated[
        bool, typer.Option("--debug", help=f"show tracebacks of file errors (also with {DEBUG_ENV}=1)")
    ] = False,
    version: Annotated[
        bool,
        typer.Option("--version", callback=_version, is_eager=True, help="print the version and the default model"),
    ] = False,
) -> None:
    """Find, study and use the retrieval heads of transformer language models."""
    _debug["on"] = debug


FIND, STUDY, EVALUATE, USE = "Find heads", "Study", "Evaluate", "Use"
# the order of `retrieval-heads --help`, panel by panel
app.command(rich_help_panel=FIND)(detect.detect)
app.command(rich_help_panel=FIND)(merge.merge)
app.command("refs", rich_help_panel=FIND)(refs.refs_cmd)
app.command(rich_help_panel=STUDY)(analysis.analyze)
app.command(rich_help_panel=STUDY)(analysis.compare)
app.command(rich_help_panel=STUDY)(analysis.report)
app.command("mask-eval", rich_help_panel=EVALUATE)(mask_eval.mask_eval_cmd)
app.command("task-eval", rich_help_panel=EVALUATE)(task_eval.task_eval_cmd)
app.command("task-plot", rich_help_panel=EVALUATE)(task_eval.task_plot_cmd)
app.command("kv-eval", rich_help_panel=EVALUATE)(kv_eval.kv_eval_cmd)
app.command("grounding-eval", rich_help_panel=EVALUATE)(grounding_eval.grounding_eval_cmd)
app.command("passage-rank", rich_help_panel=EVALUATE)(passage_rank.passage_rank_cmd)
app.command("finetune-eval", rich_help_panel=EVALUATE)(finetune.finetune_eval_cmd)
app.command("finetune-plot", rich_help_panel=EVALUATE)(finetune.finetune_plot_cmd)
app.command("export-heads", rich_help_panel=USE)(export_heads.export_heads_cmd)
app.command("attribute", rich_help_panel=USE)(attribute.attribute_cmd)
app.command("docs-tables", hidden=True)(docs_tables.docs_tables_cmd)  # for maintainers: regenerate doc tables


def os_error_line(e: OSError) -> str:
    """One line for a file-system error: what went wrong and the path(s)."""
    paths = " -> ".join(str(f) for f in (e.filename, e.filename2) if f is not None)
    what = e.strerror or str(e) or type(e).__name__
    return f"{what}: {paths}" if paths else what


def main() -> None:
    """Entry point: run the app; bad input exits 2 with one line, Ctrl-C exits 130. File-system
    and text-decoding errors are one line too (exit 2); `--debug` or RETRIEVAL_HEADS_DEBUG=1
    shows their traceback."""
    _debug["on"] = False
    try:
        app()
    except RetrievalHeadsError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print("interrupted; rerun the same command to resume", file=sys.stderr)
        sys.exit(130)
    except (OSError, UnicodeError) as e:
        if _debug["on"] or os.environ.get(DEBUG_ENV) == "1":
            raise
        if isinstance(e, OSError):
            line = os_error_line(e)
        else:  # the decoder does not know the file; its message says which byte
            line = f"cannot decode text ({str(e)[:160]})"
        print(f"error: {line}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
