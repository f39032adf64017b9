"""What the commands share, defined once: option types (`Annotated` aliases, so each flag has one
name, help and type everywhere), the runtime setup, comma-list parsing and optional figures.

Heavy imports (torch, transformers, the experiments) stay inside functions: `--help` is fast.
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from ..errors import ConfigError
from ..models import DEFAULT_MODEL  # stdlib-only module: --help stays fast

if TYPE_CHECKING:
    from ..models import LoadedModel
    from ..results import DetectionResult

logger = logging.getLogger("retrieval_heads.cli")

# ------------------------------------------------------------------ options shared by commands
# Defaults are given at the parameter (`progress: Progress = True`), so one alias serves commands
# with different defaults.
# Model loading: every command that loads a model takes these seven, with these defaults
# (model=DEFAULT_MODEL, device="auto", dtype="auto", device_map=None, trust_remote_code=False,
# threads=None), and loads through `open_model`.
ModelName = Annotated[
    str, typer.Option("--model", "-m", help="alias (smollm2-135m, gemma3-270m), hub id, local folder or .gguf file")
]
Device = Annotated[str, typer.Option(help="auto (CUDA, then MPS, then CPU), cpu, cuda, cuda:1, mps")]
DType = Annotated[str, typer.Option(help="auto (bfloat16 on a GPU, float32 on a CPU), float32, bfloat16, float16")]
DeviceMap = Annotated[
    str | None, typer.Option(help="accelerate device map, e.g. auto: spread a large model over the node's devices")
]
TrustRemoteCode = Annotated[
    bool, typer.Option("--trust-remote-code", help="run code from the model's repository (only models you trust)")
]
Threads = Annotated[int | None, typer.Option(help="torch CPU threads (default: torch's choice)")]
BatchSize = Annotated[int | None, typer.Option(min=1, help="samples per forward pass (default: 1 on a CPU)")]
Out = Annotated[Path | None, typer.Option("--out", "-o", help="output folder (default: under runs/)")]
Overwrite = Annotated[bool, typer.Option(help="replace a run with a different config in --out")]
Progress = Annotated[bool, typer.Option("--progress/--no-progress")]
Chat = Annotated[bool, typer.Option("--chat/--no-chat", help="use the model's chat template when it has one")]
MaxNewTokens = Annotated[int, typer.Option(min=1)]
SummaryTop = Annotated[int, typer.Option(help="heads shown in the summary")]
Threshold = Annotated[float, typer.Option(help="a head is a retrieval head when its score > this")]

# experiments on top of a detection run (mask-eval, task-eval, kv-eval, export-heads)
Scores = Annotated[
    Path, typer.Option(help="detection run folder, authors'-format score JSON, or ref:<name> (a shipped map)")
]
ScoreName = Annotated[
    str,
    typer.Option(
        "--score",
        help="which score of the detection run ranks the heads: copy (the paper's), topk_mass, needle_mass, "
        "distant_mass, query_focus",
    ),
]
ScoresModel = Annotated[
    str | None, typer.Option(help=f"model (default: the model of the --scores run, else {DEFAULT_MODEL})")
]
EvalNeedles = Annotated[
    Path | None, typer.Option(help="JSONL of {needle, question, answer} (default: evaluation needles)")
]
Haystack = Annotated[Path | None, typer.Option(help="folder of .txt files or one file (default: Paul Graham essays)")]
MaskPhase = Annotated[str, typer.Option(help="all (prefill and decode) or decode (authors': decode steps only)")]
RandomPool = Annotated[
    str,
    typer.Option(
        help="where random-K heads come from: non-retrieval (heads with score <= 0.1 outside the top K, "
        "the paper's control) or outside-top (every head outside the top K: the earlier default)"
    ),
]
Sink = Annotated[int, typer.Option(min=0, help="attention-sink tokens kept by cut heads")]
Window = Annotated[int, typer.Option(min=1, help="recent tokens kept by cut heads (head policies)")]


# ------------------------------------------------------------------ setup
def setup_runtime(threads: int | None) -> None:
    """Quiet library logging and progress bars (ours stay), and set torch's CPU threads."""
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


def open_model(
    model: str = DEFAULT_MODEL,
    *,
    device: str = "auto",
    dtype: str = "auto",
    device_map: str | None = None,
    trust_remote_code: bool = False,
    threads: int | None = None,
    attn_implementation: str = "eager",
) -> LoadedModel:
    """The one way a command loads its model: runtime setup (threads, quiet logs), then
    `models.load_model` with the shared options (`auto` device and dtype resolved there)."""
    from ..models import load_model

    setup_runtime(threads)
    return load_model(
        model,
        device=device,
        dtype=dtype,  # type: ignore[arg-type]  # a CLI string; load_model rejects an unknown dtype in one line
        attn_implementation=attn_implementation,  # type: ignore[arg-type]
        trust_remote_code=trust_remote_code,
        device_map=device_map,
    )


def load_scores(scores: Path, model: str | None, score: str = "copy") -> tuple[DetectionResult, str]:
    """The detection result of `--scores` ranked by `--score`, and the model to run: `--model`,
    else the run's model."""
    from ..results import DetectionResult

    result = DetectionResult.load(scores).with_score(score)
    return result, model or result.config.get("model") or DEFAULT_MODEL


def scores_label(scores: Path, score: str) -> str:
    """What a run records as its score source: the file or folder, and the score when not copy
    (a run made before `--score` existed recorded the plain path, so copy keeps that form)."""
    return str(scores) if score == "copy" else f"{scores} [score: {score}]"


def default_run_folder(lm: LoadedModel, suffix: str = "") -> Path:
    """runs/<model><suffix>, the model's name made a file name: never a path out of runs/
    (`--model ..` or `--model /abs/path` name a folder inside it)."""
    # no separator and no leading dot: neither ".." nor a hidden name
    name = re.sub(r"[^\w.+-]", "_", f"{lm.spec.name}{suffix}").lstrip(".") or "model"
    return Path("runs") / name


@contextmanager
def optional_figure() -> Iterator[None]:
    """Draw a run's figure inside this block; without matplotlib only warn: the numbers are saved."""
    try:
        yield
    except ImportError as e:
        logger.warning("no plot: %s", e)


# ------------------------------------------------------------------ parsing
def comma_floats(text: str, what: str) -> tuple[float, ...]:
    """'0.1,0.5' -> (0.1, 0.5); `what` names the option in the error."""
    try:
        vals = tuple(float(x) for x in text.split(",") if x.strip())
    except ValueError:
        raise ConfigError(f"{what} must be a comma list of numbers, got {text!r}") from None
    if not vals:
        raise ConfigError(f"{what} is empty")
    return vals


def comma_ints(text: str, what: str) -> tuple[int, ...]:
    """'0,5,10' -> (0, 5, 10); `what` names the option in the error."""
    try:
        return tuple(int(x) for x in text.split(",") if x.strip())
    except ValueError:
        raise ConfigError(f"{what} must be a comma list of integers, got {text!r}") from None


def comma_names(text: str) -> tuple[str, ...]:
    """'a, b,' -> ('a', 'b')."""
    return tuple(p.strip() for p in text.split(",") if p.strip())


def parse_lengths(text: str) -> tuple[int, ...]:
    """Document lengths in tokens: start:stop:count or a,b,c."""
    from ..detection import parse_range

    return parse_range(text, integer=True)  # type: ignore[return-value]


def parse_depths(text: str) -> tuple[float, ...]:
    """Needle depths in percent: start:stop:count or a,b,c."""
    from ..detection import parse_range

    return parse_range(text, integer=False)


def check_mask_phase(phase: str) -> None:
    from ..masking import PHASES

    if phase not in PHASES:
        raise ConfigError(f"unknown mask phase {phase!r}; choose from {', '.join(PHASES)}")


def check_random_seeds(n: int) -> None:
    if n < 0:
        raise ConfigError("--random-seeds must be >= 0")


def check_random_pool(pool: str) -> None:
    from ..experiments.conditions import RANDOM_POOLS

    if pool not in RANDOM_POOLS:
        raise ConfigError(f"unknown --random-pool {pool!r}; choose from {', '.join(RANDOM_POOLS)}")
