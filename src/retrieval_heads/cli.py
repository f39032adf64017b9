"""The `retrieval-heads` command: a thin layer over the Python API.

Bad input (any RetrievalHeadsError) is shown as one line on stderr with exit code 2.
"""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path
from typing import Optional

import typer

from .errors import RetrievalHeadsError

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Find, study and use the retrieval heads of transformer language models.")


@app.callback()
def _root() -> None:
    """Find, study and use the retrieval heads of transformer language models."""


def _setup(threads: Optional[int]) -> None:
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    import warnings

    warnings.filterwarnings("ignore")
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    logging.getLogger("huggingface_hub").setLevel(logging.ERROR)
    from huggingface_hub.utils import logging as hub_logging

    hub_logging.set_verbosity_error()
    if threads:
        import torch

        torch.set_num_threads(threads)


def print_summary(result, k: int = 10) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console()
    sp = result.sparsity()
    table = Table(title=f"Top {k} retrieval heads of {result.name} ({result.n_kept} kept of {len(result.records) or result.n_kept} samples)")
    for col in ("rank", "layer", "head", "retrieval score", "activation freq."):
        table.add_column(col, justify="right")
    for i, h in enumerate(result.top(k), 1):
        table.add_row(str(i), str(h.layer), str(h.head), f"{h.score:.3f}", f"{h.activation_frequency:.2f}")
    console.print(table)
    n = result.shape[0] * result.shape[1]
    gt01 = sp["(0.1,0.5]"] + sp[">0.5"]
    console.print(
        f"heads: {n}; score = 0: {sp['zero']:.1%}; score > 0.1: {gt01:.1%} "
        f"({len(result.retrieval_heads())} retrieval heads); score > 0.5: {sp['>0.5']:.1%}"
    )


@app.command()
def detect(
    model: str = typer.Option("smollm2-135m", help="alias (smollm2-135m, gemma3-270m), hub id, folder or .gguf file"),
    lengths: Optional[str] = typer.Option(None, help="document lengths in tokens: start:stop:count or a,b,c (default: fits the model and a CPU budget)"),
    depths: Optional[str] = typer.Option(None, help="needle depths in percent: start:stop:count or a,b,c"),
    needles: Optional[Path] = typer.Option(None, help="JSONL of {needle, question, answer}"),
    haystack: Optional[Path] = typer.Option(None, help="folder of .txt files or one file (default: Paul Graham essays)"),
    out: Optional[Path] = typer.Option(None, help="run folder (default runs/<model>)"),
    engine: str = typer.Option("fast", help="fast (SDPA + KV cache + prefix reuse; proven equal) or reference (paper-faithful, eager)"),
    max_new_tokens: int = typer.Option(50, min=1),
    recall_threshold: float = typer.Option(0.5, help="keep a sample when ROUGE-1 recall of the answer > this"),
    chat: bool = typer.Option(True, "--chat/--no-chat", help="use the model's chat template when it has one"),
    device: str = typer.Option("cpu", help="cpu, cuda, cuda:1, mps"),
    dtype: str = typer.Option("float32", help="float32, bfloat16, float16, auto"),
    batch_size: Optional[int] = typer.Option(None, help="fast engine: samples per batch, left-padded; each still prefilled from its shared prefix, then decoded together (default: 1 on a CPU, 8 on a GPU)"),
    threads: Optional[int] = typer.Option(None, help="torch CPU threads"),
    top: int = typer.Option(10, help="heads shown in the summary"),
    shard: Optional[str] = typer.Option(None, help="run only shard i/n of the grid (merge shards with `merge`)"),
    device_map: Optional[str] = typer.Option(None, help="accelerate device map, e.g. auto: spread a large model over the node's devices"),
    overwrite: bool = typer.Option(False, help="replace a run with a different config in --out"),
    trust_remote_code: bool = typer.Option(False, help="allow the model's own code from the hub"),
    progress: bool = typer.Option(True, "--progress/--no-progress"),
) -> None:
    """Detect retrieval heads with needle-in-a-haystack samples."""
    _setup(threads)
    from . import detect as D
    from .models import load_model
    from .needles import load_needles

    from .distributed import torchrun_rank as _ranks

    if _ranks() and device == "cuda":
        device = f"cuda:{os.environ.get('LOCAL_RANK', '0')}"  # one GPU per torchrun process
    lm = load_model(model, device=device, dtype=dtype, attn_implementation="eager" if engine == "reference" else "sdpa",
                    trust_remote_code=trust_remote_code, device_map=device_map)
    base = D.default_grid(lm.spec)
    grid = D.Grid(
        lengths=D.parse_range(lengths, integer=True) if lengths else base.lengths,
        depths=D.parse_range(depths, integer=False) if depths else base.depths,
        needles=tuple(load_needles(needles)) if needles else base.needles,
    )
    cfg = D.DetectConfig(engine=engine, max_new_tokens=max_new_tokens, recall_threshold=recall_threshold,
                         chat=chat, haystack=str(haystack) if haystack else None, batch_size=batch_size)
    out = out or Path("runs") / lm.spec.name.replace("/", "_")
    from .distributed import Shard, torchrun_rank

    result = D.detect(lm, grid, cfg, out=out, overwrite=overwrite, show_progress=progress,
                      shard=Shard.parse(shard) if shard else None)
    if (torchrun_rank() or (0, 1))[0] != 0:
        return  # under torchrun only rank 0 reports
    print_summary(result, top)
    typer.echo(f"run folder: {out}")

from .cli_analysis import register as _register_analysis; _register_analysis(app)  # noqa: E402,E702
from .cli_scale import register as _register_scale; _register_scale(app)  # noqa: E402,E702
from .cli_masking import register as _register_masking; _register_masking(app)  # noqa: E402,E702
from .cli_kv import register as _register_kv; _register_kv(app)  # noqa: E402,E702
from .cli_tasks import register as _register_tasks; _register_tasks(app)  # noqa: E402,E702

def main() -> None:
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
