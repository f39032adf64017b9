"""The `retrieval-heads` command: a thin layer over the Python API.

The app registers the command groups (detect, analysis, scale, masking, kv, tasks); they share
`options` and never import this module. Bad input (any RetrievalHeadsError) is shown as one line
on stderr with exit code 2.
"""

from __future__ import annotations

import sys

import typer

from ..errors import RetrievalHeadsError
from . import analysis, detect, kv, masking, scale, tasks

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    help="Find, study and use the retrieval heads of transformer language models.",
)


@app.callback()
def root() -> None:
    """Find, study and use the retrieval heads of transformer language models."""


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


def main() -> None:
    """Entry point: run the app; bad input exits 2 with one line, Ctrl-C exits 130."""
    try:
        app()
    except RetrievalHeadsError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print("interrupted; rerun the same command to resume", file=sys.stderr)
        sys.exit(130)


if __name__ == "__main__":
    main()
