"""What the commands share, defined once: option types (`Annotated` aliases, so each flag has one
name, help and type everywhere), option groups (model loading, run folder, masking: decorators
that add a group to a command), the runtime setup, comma-list parsing and optional figures.

Heavy imports (torch, transformers, the experiments) stay inside functions: `--help` is fast.
"""

from __future__ import annotations

import functools
import inspect
import logging
import os
import re
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, get_args

import typer

from ..errors import ConfigError
from ..models import DEFAULT_MODEL, default_model_note  # stdlib-only module: --help stays fast
from ..models import DType as DTypeChoice

if TYPE_CHECKING:
    from ..models import LoadedModel
    from ..results import DetectionResult

logger = logging.getLogger("retrieval_heads.cli")


# ------------------------------------------------------------------ options shared by commands
def choices(names: tuple[str, ...] | list[str]) -> str:
    """The metavar that shows an option's choices in --help (`<a|b|c>`, as typer shows a Literal).
    The option stays a string: the Python API checks it, with the same one-line error for every caller."""
    return f"<{'|'.join(names)}>"


# The choices of the shared options, spelled here so that --help imports nothing heavy; tests check
# them against the modules that define them.
SCORE_NAMES = ("copy", "topk_mass", "needle_mass", "distant_mass", "query_focus")
MASK_PHASES = ("all", "decode")
RANDOM_POOLS = ("non-retrieval", "outside-top", "layer-matched", "score-matched-low")
MASK_METHODS = ("uniform", "zero", "mean")  # masking.METHODS
RANDOM_SEED_COUNT = 2  # len(experiments.conditions.RANDOM_SEEDS): the random draws of every command

# Defaults are given at the parameter (`progress: Progress = True`), so one alias serves commands
# with different defaults.
# Model loading: every command that loads a model takes these seven, with these defaults
# (model=DEFAULT_MODEL, device="auto", dtype="auto", device_map=None, trust_remote_code=False,
# threads=None), and loads through `open_model`.
ModelName = Annotated[
    str,
    typer.Option(
        "--model",
        "-m",
        help=f"alias (smollm2-135m, gemma3-270m), hub id, local folder or .gguf file; {default_model_note()}",
    ),
]
Device = Annotated[str, typer.Option(help="auto (CUDA, then MPS, then CPU), cpu, cuda, cuda:1, mps")]
DType = Annotated[
    str,
    typer.Option(
        metavar=choices(get_args(DTypeChoice)),
        help="weights dtype; auto: bfloat16 on a GPU, float32 on a CPU",
    ),
]
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
Progress = Annotated[bool, typer.Option("--progress/--no-progress", help="show a progress bar on stderr")]
Chat = Annotated[bool, typer.Option("--chat/--no-chat", help="use the model's chat template when it has one")]
MaxNewTokens = Annotated[int, typer.Option(min=1, help="most tokens generated per answer")]
BootSamples = Annotated[int, typer.Option(min=100, help="bootstrap resamples")]
Watch = Annotated[int, typer.Option("--watch", min=1, help="watched heads: the top K of the score map")]
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
        metavar=choices(SCORE_NAMES),
        help="which score of the detection run ranks the heads (copy: the paper's retrieval score)",
    ),
]
KVScoreName = Annotated[  # kv-eval, export-heads: the best KV ranking by default
    str | None,
    typer.Option(
        "--score",
        metavar=choices(SCORE_NAMES),
        help="which score of the detection run ranks the KV heads (default: needle_mass when the source holds "
        "it, else copy with a warning)",
    ),
]
ScoresModel = Annotated[
    str | None,
    typer.Option(
        help=f"model (default: the model of the --scores run, else {DEFAULT_MODEL}, a dequantized 4-bit GGUF)"
    ),
]
EvalNeedles = Annotated[
    Path | None, typer.Option(help="JSONL of {needle, question, answer} (default: evaluation needles)")
]
Haystack = Annotated[Path | None, typer.Option(help="folder of .txt files or one file (default: Paul Graham essays)")]
MaskPhase = Annotated[
    str,
    typer.Option(
        metavar=choices(MASK_PHASES),
        help="mask during all steps (prefill and decode) or decode steps only (the authors')",
    ),
]
RandomPool = Annotated[
    str,
    typer.Option(
        metavar=choices(RANDOM_POOLS),
        help="where random-K heads come from: non-retrieval (heads with score <= 0.1 outside the top K, "
        "the paper's control), outside-top (every head outside the top K: the earlier default), "
        "layer-matched (heads outside the top K in its layers, as many per layer as the top K has) or "
        "score-matched-low (heads with score <= 0.1 outside the top K, one per top-K head, in ranking order, "
        "drawn among the 3 not yet chosen whose needle_mass attention is nearest to that head's; needs a "
        "detection run folder or summary, which hold needle_mass)",
    ),
]
RandomSeeds = Annotated[
    int,
    typer.Option(
        "--random-seeds",
        "--random-draws",
        help="random draws, seeds 0..n-1 (K random heads; kv-eval: random KV-head rankings); the masking "
        "experiments place the top-K effect in the null of these draws (percentile, p-value)",
    ),
]
MaskMethod = Annotated[
    str,
    typer.Option(
        metavar=choices(MASK_METHODS),
        help="how a head is masked: uniform (query zeroed: uniform attention, the authors'), zero (output "
        "zeroed), mean (each head's mean output over the first 512 tokens of the haystack: mean ablation)",
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


# ------------------------------------------------------------------ option groups
# A group of options that several commands share, declared once: a decorator adds them after the
# command's own options in --help (same names, defaults and help everywhere) and hands them to the
# command as one dict, its `<group>` argument.
SharedOption = tuple[str, Any, Any]  # parameter name, its Annotated type, its default
MODEL_OPTIONS: tuple[SharedOption, ...] = (
    ("device", Device, "auto"),
    ("dtype", DType, "auto"),
    ("device_map", DeviceMap, None),
    ("trust_remote_code", TrustRemoteCode, False),
    ("threads", Threads, None),
)
RUN_OPTIONS: tuple[SharedOption, ...] = (
    ("out", Out, None),
    ("overwrite", Overwrite, False),
    ("progress", Progress, True),
)
ConditionBatch = Annotated[
    int | None,
    typer.Option(
        "--batch-size",
        help="with --mask-phase decode: conditions decoded together as one batch per prompt (default: all; "
        "1: one after the other)",
    ),
]
MASK_OPTIONS: tuple[SharedOption, ...] = (
    ("random_seeds", RandomSeeds, RANDOM_SEED_COUNT),
    ("random_pool", RandomPool, "non-retrieval"),
    ("method", MaskMethod, "uniform"),
    ("mask_phase", MaskPhase, "all"),
    ("batch_size", ConditionBatch, None),
)


def option_group(group: str, options: tuple[SharedOption, ...]) -> Callable[[Callable[..., None]], Callable[..., None]]:
    """The decorator that adds `options` to a command and passes them as the dict `group`."""

    def decorate(command: Callable[..., None]) -> Callable[..., None]:
        sig = inspect.signature(command, eval_str=True)
        shared = [
            inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, annotation=annotation, default=default)
            for name, annotation, default in options
        ]

        @functools.wraps(command)
        def run(**kwargs: Any) -> None:
            chosen = {p.name: kwargs.pop(p.name, p.default) for p in shared}  # a Python caller may leave some out
            command(**kwargs, **{group: chosen})

        own = [p for p in sig.parameters.values() if p.name != group]
        run.__signature__ = sig.replace(parameters=[*own, *shared])  # type: ignore[attr-defined]  # what typer reads
        run.__annotations__ = {**command.__annotations__, **{p.name: p.annotation for p in shared}}
        return run

    return decorate


# --device, --dtype, --device-map, --trust-remote-code, --threads: for `open_model(name, **model_options)`
with_model_options = option_group("model_options", MODEL_OPTIONS)
# --out, --overwrite, --progress of a command that writes a run folder: for `run_args`
with_run_options = option_group("run_options", RUN_OPTIONS)
# --random-seeds, --random-pool, --method, --mask-phase of the masking experiments: for `mask_condition_args`
with_mask_options = option_group("mask_options", MASK_OPTIONS)


def run_args(
    lm: LoadedModel,
    run_options: dict[str, Any] | None,
    suffix: str = "",
    scores: Path | None = None,
    score: str = "copy",
) -> dict[str, Any]:
    """The keyword arguments of a run from the run options: its folder (`--out`, else
    runs/<model><suffix>), --overwrite and --progress; with `scores`, the score source it records."""
    chosen = run_options or {}
    args = {
        "out": chosen.get("out") or default_run_folder(lm, suffix),
        "overwrite": chosen.get("overwrite", False),
        "show_progress": chosen.get("progress", True),
    }
    if scores is not None:
        args["scores_source"] = scores_label(scores, score)
    return args


def mask_condition_args(mask_options: dict[str, Any] | None) -> dict[str, Any]:
    """The masking options as `TaskEvalConfig` arguments; --random-seeds checked here, the rest by the config."""
    chosen = {name: default for name, _, default in MASK_OPTIONS} | (mask_options or {})
    check_random_seeds(chosen["random_seeds"])
    if chosen["batch_size"] is not None and chosen["batch_size"] < 1:
        raise ConfigError(f"--batch-size must be >= 1, got {chosen['batch_size']}")
    return {
        "random_seeds": tuple(range(chosen["random_seeds"])),
        "random_pool": chosen["random_pool"],
        "method": chosen["method"],
        "phase": chosen["mask_phase"],
        "batch_size": chosen["batch_size"],
    }


def load_scores(scores: Path, model: str | None, score: str = "copy") -> tuple[DetectionResult, str]:
    """The detection result of `--scores` ranked by `--score`, and the model to run: `--model`,
    else the run's model."""
    from ..results import DetectionResult, require_kept

    result = require_kept(DetectionResult.load(scores), scores).with_score(score)
    return result, model or result.config.get("model") or DEFAULT_MODEL


def open_scored_model(
    scores: Path,
    model: str | None,
    score: str,
    model_options: dict[str, Any] | None,
    *,
    attn: str = "sdpa",
    check: Callable[[DetectionResult], object] | None = None,
) -> tuple[DetectionResult, LoadedModel]:
    """`load_scores`, then the model it names, loaded with the command's shared model options:
    a bad score source (or one that `check` refuses) fails before the model loads."""
    result, name = load_scores(scores, model, score)
    if check is not None:
        check(result)
    return result, open_model(name, attn_implementation=attn, **(model_options or {}))


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


def null_figure(result: Any, out: Path) -> None:
    """Draw a masking run's null figure (`plots.mask.plot_null_distribution`) into its folder, or
    say on stderr why there is none (no finished random draw)."""
    from ..plots.mask import NULL_STEM, plot_null_distribution

    if not plot_null_distribution(result, out / NULL_STEM):
        typer.echo(f"note: no finished random draw, so no {NULL_STEM}.png", err=True)


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
