"""The `retrieval-heads` command: a thin layer over the Python API.

The app registers the command groups (detect, analysis, scale, masking, kv, tasks, docs); they share
`options` and never import this module. Bad input (any RetrievalHeadsError) is shown as one line
on stderr with exit code 2.
"""

from __future__ import annotations

import os
import sys
from typing import Annotated

import typer

from ..errors import RetrievalHeadsError
from . import analysis, attribute, detect, docs, kv, masking, scale, tasks, train

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    help="Find, study and use the retrieval heads of transformer language models.",
)


DEBUG_ENV = "RETRIEVAL_HEADS_DEBUG"  # =1: tracebacks instead of one-line errors
_debug = {"on": False}  # set by --debug for this invocation


@app.callback()
def root(
    debug: Annotated[
        bool, typer.Option("--debug", help=f"show tracebacks of file errors (also with {DEBUG_ENV}=1)")
    ] = False,
) -> None:
    """Find, study and use the retrieval heads of transformer language models."""
    _debug["on"] = debug


# the order of `retrieval-heads --help`
app.command()(detect.detect)
app.command()(analysis.analyze)
app.command()(analysis.compare)
app.command()(analysis.report)
app.command()(scale.merge)
app.command("mask-eval")(masking.mask_eval_cmd)
app.command("kv-eval")(kv.kv_eval_cmd)
app.command("export-heads")(kv.export_heads_cmd)
app.command("task-eval")(tasks.task_eval_cmd)
app.command("task-plot")(tasks.task_plot_cmd)
app.command("attribute")(attribute.attribute_cmd)
app.command("grounding-eval")(attribute.grounding_eval_cmd)
app.command("passage-rank")(attribute.passage_rank_cmd)
app.command("finetune-eval")(train.finetune_eval_cmd)
app.command("finetune-plot")(train.finetune_plot_cmd)
app.command("docs-tables")(docs.docs_tables_cmd)


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
