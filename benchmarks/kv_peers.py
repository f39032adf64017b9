"""Our head-sparse KV cache side by side with kvpress's presses, on the same samples (issue 16).

    python benchmarks/kv_peers.py run --out runs/kv-peers --scores runs/smollm2-135m \
        --kvpress-python /work/venv-old/bin/python
    python benchmarks/kv_peers.py table --out runs/kv-peers        # markdown table (also table.md)

`run` writes the samples once (kv-eval's needle samples: evaluation needles x depths, chat prompt,
token ids), then runs every (method, compression ratio, mode) in its own child process, which
loads the model, answers every sample and reports per-sample scores, the KV bytes the cache holds
after compression and the child's peak RSS (VmHWM). Finished children are kept (rerun resumes).

Methods. `cache:*`: our `HeadSparseCache` (transformers cache that really holds fewer bytes),
sized by each policy's `for_budget` to 1 - ratio of the full cache's bytes: `full`, `sink_window`
(StreamingLLM), `snapkv`, and head policies ranked by a score of the detection run (`cache:<score>`,
e.g. `cache:needle_mass`, `cache:copy`). `press:*`: kvpress presses run by kvpress's own
`KVPressTextGenerationPipeline._forward` (its prefill-with-press and greedy answer) on the same token
ids: `streaming_llm`, `snapkv`, `knorm`, `expected_attention`, `adakv_snapkv`,
`adakv_expected_attention`, `duo_attention` (kvpress's on-the-fly scoring, see below) and
`retrieval_heads` (our `RetrievalHeadsPress` with `--press-score`, sized by `kv_compression_ratio`).

Modes: `agnostic` compresses the context before the question is seen (kvpress's default, and
kv-eval's); `aware` compresses the context and the question together (kvpress `query_aware`), only
the chat template's answer prefix comes after.

Scores per sample: answer recall (ROUGE-1 recall of the needle's answer, kv-eval's metric), exact
match, and ROUGE-L F1 of the answer against the whole needle sentence (kvpress's NIAH metric; they
use the `rouge` package, here `rouge-score`). Answers are cut at the first newline after some text
(kv-eval's stop rule) for every method.

kvpress's `DuoAttentionPress(on_the_fly_scoring=True)` downloads BookSum and the tokenizer from the
hub; this machine has no network, so the child runs kvpress's own `duo_attention_on_the_fly` on
`--duo-samples` chunks of the haystack essays (same tokenizer) and hands the scores to the press.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

PRESSES = (
    "streaming_llm",
    "snapkv",
    "knorm",
    "expected_attention",
    "adakv_snapkv",
    "adakv_expected_attention",
    "duo_attention",
    "retrieval_heads",
)
CACHE_FIXED = ("full", "sink_window", "snapkv")
ANSWER_MARK = "\nAnswer:"  # end of the question in kv-eval's prompt (needles.QUESTION_TEMPLATE)


def vm(field: str) -> float | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    except OSError:
        return None
    return None


def write_json(path: Path, obj: Any) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(obj, indent=1))
    os.replace(tmp, path)


def cut_answer(text: str) -> str:
    """kv-eval's stop rule as text: up to the first newline that follows some text."""
    head = text.lstrip()
    i = head.find("\n")
    return head if i < 0 else head[:i]


# ----------------------------------------------------------------------------------- samples
def prepare(args: argparse.Namespace) -> Path:
    """kv-eval's needle samples (same builder, needles, depths, haystack), as token ids, written once."""
    from retrieval_heads.kvcache.measure import split_prompt
    from retrieval_heads.needles import EVALUATION_NEEDLES, load_haystack, make_sample

    path = args.out / "samples.jsonl"
    if path.exists():
        return path
    lm = load_lm(args.model)
    haystack = load_haystack(None)
    rows = []
    for needle in EVALUATION_NEEDLES[: args.needles]:
        for depth in args.depths:
            s = make_sample(lm.tokenizer, haystack, needle, args.length, depth, chat=True)
            c = split_prompt(lm, s)  # question-agnostic: the context ends before the question
            end = s.prompt.rfind(ANSWER_MARK) + len(ANSWER_MARK)
            offsets = lm.tokenizer(s.prompt, add_special_tokens=False, return_offsets_mapping=True)["offset_mapping"]
            aware = next(i for i, (start, _) in enumerate(offsets) if start >= end)  # after the question
            rows.append(
                {
                    "id": s.id,
                    "prompt_ids": list(s.prompt_ids),
                    "context_len": c,
                    "aware_len": aware,
                    "needle": s.needle.needle,
                    "question": s.needle.question,
                    "answer": s.needle.answer,
                    "depth": depth,
                }
            )
    tmp = path.with_name(".samples.jsonl.tmp")
    tmp.write_text("".join(json.dumps(r) + "\n" for r in rows))
    os.replace(tmp, path)
    return path


# ----------------------------------------------------------------------------------- one child
def score_fields(row: dict[str, Any], text: str) -> dict[str, Any]:
    from rouge_score import rouge_scorer

    from retrieval_heads.scoring import answer_recall
    from retrieval_heads.tasks.niah import exact_match

    answer = cut_answer(text)
    rouge = rouge_scorer.RougeScorer(["rougeL"]).score(row["needle"], answer)["rougeL"].fmeasure
    return {
        "answer_recall": answer_recall(row["answer"], answer),
        "exact": exact_match(row["answer"], answer),
        "needle_rouge_l": float(rouge),
        "text": text,
    }


def make_press(name: str, ratio: float, args: argparse.Namespace, lm: Any) -> Any:
    import kvpress

    if name == "streaming_llm":
        return kvpress.StreamingLLMPress(compression_ratio=ratio)
    if name == "snapkv":
        return kvpress.SnapKVPress(compression_ratio=ratio)
    if name == "knorm":
        return kvpress.KnormPress(compression_ratio=ratio)
    if name == "expected_attention":
        return kvpress.ExpectedAttentionPress(compression_ratio=ratio)
    if name == "adakv_snapkv":
        return kvpress.AdaKVPress(kvpress.SnapKVPress(compression_ratio=ratio))
    if name == "adakv_expected_attention":
        return kvpress.AdaKVPress(kvpress.ExpectedAttentionPress(compression_ratio=ratio))
    if name == "duo_attention":
        duo_scores_offline(lm, args)
        return kvpress.DuoAttentionPress(head_compression_ratio=ratio, on_the_fly_scoring=True)  # set per sample
    if name == "retrieval_heads":
        from retrieval_heads.integrations.kvpress import RetrievalHeadsPress

        return RetrievalHeadsPress(
            scores=args.scores, score=args.press_score, kv_compression_ratio=ratio, sink_size=4, recent_size=60
        )
    raise SystemExit(f"unknown press {name!r}; choose from {', '.join(PRESSES)}")


def duo_scores_offline(lm: Any, args: argparse.Namespace) -> None:
    """Run kvpress's `duo_attention_on_the_fly` on local text (no hub access here) and put the
    result where `DuoAttentionPress(on_the_fly_scoring=True)` looks it up (its LRU cache)."""
    import pandas as pd
    from kvpress.presses import duo_attention_press as duo

    from retrieval_heads.needles import load_haystack

    text = load_haystack(None)
    words = text.split()
    size = 1500  # words per chunk (about 2,000 tokens), BookSum chapters are longer
    chunks = [" ".join(words[i : i + size]) for i in range(0, len(words) - size, size)][: args.duo_samples]

    class _Data:
        def to_pandas(self) -> Any:
            return pd.DataFrame({"chapter": chunks})

    class _Tok:
        @staticmethod
        def from_pretrained(*_: Any, **__: Any) -> Any:
            return lm.tokenizer

    duo.load_dataset, duo.AutoTokenizer = (lambda *a, **k: _Data()), _Tok
    scores = duo.duo_attention_on_the_fly(lm.model, num_samples=len(chunks))
    duo.cache[(lm.model.config.name_or_path, 50, 500)] = scores  # the key the press asks for


def cache_bytes(cache: Any) -> int:
    n = 0
    for layer in cache.layers:
        for t in (getattr(layer, "keys", None), getattr(layer, "values", None)):
            if t is not None and hasattr(t, "numel"):
                n += t.numel() * t.element_size()
    return n


def load_lm(model: str) -> Any:
    """The model, sdpa attention (kvpress's key masking patches sdpa, not eager); `tiny-ARCH`: a tiny
    random model (smoke tests of this script)."""
    if model.startswith("tiny-"):
        from retrieval_heads.testing import tiny_model

        return tiny_model(model.removeprefix("tiny-"), attn_implementation="sdpa")
    from retrieval_heads.models import load_model

    return load_model(model, attn_implementation="sdpa")


def press_answers(lm: Any, presses: dict[str, Any], ids: list[int], c: int, max_new_tokens: int) -> Any:
    """Per press: (text, bytes after compression, its compression ratio). kvpress's pipeline does
    prefill-with-press then greedy answer per press; a press only rewrites each layer's cache after
    that layer's attention, never its output, so one prefill serves every press: record each
    attention layer's hook arguments once, then apply each press's own `compress` to a fresh cache
    and answer with kvpress's own `generate_answer`."""
    import torch
    from kvpress import KVPressTextGenerationPipeline
    from transformers import DynamicCache

    base = lm.model.model
    layers = [layer.self_attn for layer in base.layers]
    saved: dict[int, tuple[Any, Any, dict[str, Any]]] = {}

    def record(module: Any, _args: Any, kwargs: dict[str, Any], output: Any) -> None:
        rest = {k: v for k, v in kwargs.items() if k != "past_key_values"}
        saved[module.layer_idx] = (kwargs["hidden_states"], output[1], rest)

    pipe = KVPressTextGenerationPipeline(model=lm.model, tokenizer=lm.tokenizer, device=lm.model.device)
    dense = DynamicCache()
    hooks = [m.register_forward_hook(record, with_kwargs=True) for m in layers]
    try:
        with torch.inference_mode():
            base(input_ids=torch.tensor([ids[:c]]), past_key_values=dense)
    finally:
        for h in hooks:
            h.remove()
    out = {}
    for name, press in presses.items():
        press.post_init_from_model(lm.model)  # what `press(model)` does before hooking
        cache = DynamicCache()
        with torch.inference_mode():
            for m in layers:
                m.rotary_emb = base.rotary_emb  # as BasePress.__call__ (ExpectedAttention uses it)
                m.masked_key_indices = None
                hidden, attentions, kwargs = saved[m.layer_idx]
                layer = dense.layers[m.layer_idx]
                keys, values = press.compress(m, hidden, layer.keys, layer.values, attentions, kwargs)
                cache.update(keys, values, m.layer_idx)
            kv_bytes = cache_bytes(cache)
            text = pipe.generate_answer(torch.tensor([ids[c:]]), cache, c, max_new_tokens)
        for m in layers:
            m.masked_key_indices = None
        out[name] = (text, kv_bytes, float(press.compression_ratio))
    return out


def child(args: argparse.Namespace) -> None:
    """Run the methods of `args.method` (comma list, one kind) on every sample: one dense prefill per
    sample shared by them (ours: kv-eval's `answers_on`; kvpress: `press_answers`)."""
    import numpy as np
    import torch

    methods = [m for m in args.method.split(",") if m]
    kinds = {m.split(":", 1)[0] for m in methods}
    if len(kinds) != 1:
        raise SystemExit("a child runs methods of one kind (cache:* or press:*)")
    kind = kinds.pop()
    names = [m.split(":", 1)[1] for m in methods]
    rows = [json.loads(line) for line in (args.out / "samples.jsonl").read_text().splitlines() if line.strip()]
    rows = rows[: args.limit] if args.limit else rows
    torch.manual_seed(0)
    lm = load_lm(args.model)
    rss_loaded = vm("VmRSS")
    spec, el = lm.spec, next(lm.model.parameters()).element_size()
    records: dict[str, list[dict[str, Any]]] = {n: [] for n in names}
    extra: dict[str, dict[str, Any]] = {n: {} for n in names}
    rankings, presses = {}, {}
    if kind == "cache":
        from retrieval_heads.decoding import StopRule
        from retrieval_heads.experiments.kv_eval import POLICY_TYPES
        from retrieval_heads.heads import kv_head_scores
        from retrieval_heads.kvcache import FullPolicy, HeadPolicy
        from retrieval_heads.kvcache.measure import answers_on
        from retrieval_heads.results import DetectionResult

        for n in names:
            if n not in ("full", "sink_window", "snapkv"):  # kv-eval's order of the KV heads by this score
                rankings[n] = kv_head_scores(DetectionResult.load(args.scores).with_score(n).ranking_scores(), spec)
    else:
        presses = {n: make_press(n, args.ratio, args, lm) for n in names}
    t_start = time.perf_counter()
    for row in rows:
        ids = row["prompt_ids"]
        c = row["aware_len"] if args.mode == "aware" else row["context_len"]
        full = 2 * spec.n_layers * spec.n_kv_heads * c * spec.head_dim * el
        t0 = time.perf_counter()
        results: dict[str, tuple[str, int, float]] = {}
        if kind == "cache":
            budget = 1.0 - args.ratio  # sized for this sample's context length, as kv-eval does
            policies = []
            for n in names:
                if n == "full":
                    policies.append(FullPolicy())
                elif n in ("sink_window", "snapkv"):
                    policies.append(POLICY_TYPES[n].for_budget(spec, budget, c, sink=4, window=60))
                else:
                    hp = HeadPolicy.for_budget(spec, budget, c, sink=4, window=60, ranking=rankings[n], name=n)
                    extra[n]["n_whole"] = hp.n_whole
                    policies.append(hp)
            stop = StopRule(lm.tokenizer)
            for n, (gen, kv_bytes, _) in zip(
                names, answers_on(lm, policies, ids, c, args.max_new_tokens, stop), strict=True
            ):
                results[n] = (lm.tokenizer.decode(gen, skip_special_tokens=True), kv_bytes, 1 - kv_bytes / full)
        else:
            if "duo_attention" in presses:
                # DuoAttention keeps sink 128 + recent 256 for streaming heads: the head share whose
                # true KV compression is `ratio` at this context length (kvpress issue 228)
                presses["duo_attention"].head_compression_ratio = min(1.0, args.ratio / (1 - (128 + 256) / c))
            results = press_answers(lm, presses, ids, c, args.max_new_tokens)
            if "retrieval_heads" in presses:
                extra["retrieval_heads"]["n_whole"] = int(presses["retrieval_heads"].whole_mask().sum())
        seconds = round((time.perf_counter() - t0) / len(names), 2)
        for n, (text, kv_bytes, achieved) in results.items():
            records[n].append(
                {
                    "sample_id": row["id"],
                    "context_tokens": c,
                    **score_fields(row, text),
                    "kv_bytes": int(kv_bytes),
                    "kv_share": kv_bytes / full,
                    "compression_achieved": achieved,
                    "seconds": seconds,  # the sample's time (shared prefill included) over its methods
                }
            )
    for n, method in zip(names, methods, strict=True):
        rec = records[n]
        out = {
            "method": method,
            "ratio": args.ratio,
            "mode": args.mode,
            "model": args.model,
            "n": len(rec),
            "records": rec,
            "answer_recall": float(np.mean([r["answer_recall"] for r in rec])),
            "kv_mib": float(np.mean([r["kv_bytes"] for r in rec])) / 2**20,
            "kv_share": float(np.mean([r["kv_share"] for r in rec])),
            "compression_achieved": float(np.mean([r["compression_achieved"] for r in rec])),
            "peak_rss_mib": vm("VmHWM") if len(methods) == 1 else None,  # a group's peak is no method's
            "rss_loaded_mib": rss_loaded,
            "seconds": round(time.perf_counter() - t_start, 1),
            **extra[n],
        }
        path = result_path(args.out, method, args.ratio, args.mode, probe=args.probe)
        path.parent.mkdir(exist_ok=True)
        write_json(path, out)


# ----------------------------------------------------------------------------------- driver
def result_path(out: Path, method: str, ratio: float, mode: str, probe: bool = False) -> Path:
    """Where a method's result goes; `probe`: its peak-RSS run on one sample (`rss/`)."""
    return out / ("rss" if probe else "results") / f"{method.replace(':', '-')}-r{ratio:g}-{mode}.json"


def versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for pkg in ("torch", "transformers", "kvpress", "retrieval-heads"):
        try:
            out[pkg] = version(pkg)
        except PackageNotFoundError:
            out[pkg] = "-"
    return out


def run(args: argparse.Namespace) -> None:
    from tqdm import tqdm

    args.out.mkdir(parents=True, exist_ok=True)
    lock = ["flock", args.lock] if args.lock else []  # one real-model job at a time on a shared machine
    common = ["--out", str(args.out), "--model", args.model, "--length", str(args.length)]
    if not (args.out / "samples.jsonl").exists():
        depths = ",".join(f"{d:g}" for d in args.depths)
        prep = [*lock, args.cache_python, __file__, "prepare", *common, "--needles", str(args.needles)]
        subprocess.run([*prep, "--depths", depths], check=True)
    (args.out / "results").mkdir(exist_ok=True)
    aware = args.aware_methods or args.methods
    jobs = [
        (m, r, mode) for mode in args.modes for r in args.ratios for m in (aware if mode == "aware" else args.methods)
    ]
    jobs = [j for j in jobs if not (j[0] == "cache:full" and (j[1] != args.ratios[0]))]  # full: once per mode
    meta = {
        "created": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "machine": f"{os.cpu_count()}-core CPU ({os.uname().sysname} {os.uname().machine})",
        "model": args.model,
        "scores": str(args.scores),
        "press_score": args.press_score,
        "length": args.length,
        "needles": args.needles,
        "depths": args.depths,
        "max_new_tokens": args.max_new_tokens,
        "duo_samples": args.duo_samples,
        "python_cache": args.cache_python,
        "python_kvpress": args.kvpress_python,
        "argv": [sys.argv],
        "versions": versions(),
    }
    if (args.out / "meta.json").exists():  # a later invocation adds to the run: keep its start, log the command
        old = json.loads((args.out / "meta.json").read_text())
        meta = {**meta, "created": old["created"], "argv": [*old.get("argv", []), sys.argv]}
    write_json(args.out / "meta.json", meta)
    # one child per (mode, ratio, kind): a shared prefill per sample; then, per method, a child on one
    # sample for its peak RSS (a group's peak belongs to no single method)
    groups: dict[tuple[str, float, str], list[str]] = {}
    for method, ratio, mode in jobs:
        if not result_path(args.out, method, ratio, mode).exists():
            groups.setdefault((mode, ratio, method.split(":", 1)[0]), []).append(method)
    steps = [(",".join(ms), ratio, mode, False) for (mode, ratio, _), ms in groups.items()]
    if args.rss_probe:
        steps += [(m, r, mode, True) for m, r, mode in jobs if not result_path(args.out, m, r, mode, True).exists()]
    for methods, ratio, mode, probe in tqdm(steps, desc="kv-peers"):
        py = args.kvpress_python if methods.startswith("press:") else args.cache_python
        cmd = [*lock, py, __file__, "child", *common, "--method", methods, "--ratio", str(ratio), "--mode", mode]
        cmd += ["--scores", str(args.scores), "--press-score", args.press_score]
        cmd += ["--max-new-tokens", str(args.max_new_tokens), "--duo-samples", str(args.duo_samples)]
        cmd += ["--limit", "1" if probe else str(args.limit), *(["--probe"] if probe else [])]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode:
            tail = "\n".join(proc.stderr.strip().splitlines()[-5:])
            print(f"{methods} r={ratio} {mode}: failed\n{tail}", file=sys.stderr)
    print(table(args.out))


# ----------------------------------------------------------------------------------- table
def table(out: Path) -> str:
    import numpy as np

    from retrieval_heads.experiments.stats import bootstrap_ci, fmt_interval, paired_difference

    meta = json.loads((out / "meta.json").read_text())
    res = [json.loads(p.read_text()) for p in sorted((out / "results").glob("*.json"))]
    if not res:
        raise SystemExit(f"{out}: no results yet")
    best_name = f"cache:{meta['press_score']}"
    lines = []
    for mode in ("agnostic", "aware"):
        rows = [r for r in res if r["mode"] == mode]
        if not rows:
            continue
        full = next((r for r in rows if r["method"] == "cache:full"), None)
        lines += [
            f"**{'question-agnostic' if mode == 'agnostic' else 'question-aware'}** "
            f"({rows[0]['n']} samples, {meta['length']} tokens)",
            "",
            "| method | compression ratio | achieved (own accounting) | KV MiB held | % of full bytes | "
            "answer recall [95% CI] | exact | needle ROUGE-L | Δ vs our best at this ratio, paired [95% CI] | "
            "peak RSS MiB (own process, 1 sample) |",
            "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
        ]
        order = {m: i for i, m in enumerate(["cache:full", best_name])}
        rows.sort(
            key=lambda r: (r["ratio"] if r["method"] != "cache:full" else -1, order.get(r["method"], 9), r["method"])
        )
        for r in rows:
            rec = r["records"]
            m, lo, hi = bootstrap_ci([x["answer_recall"] for x in rec])
            best = next((b for b in rows if b["method"] == best_name and b["ratio"] == r["ratio"]), None)
            delta = "-"
            if best is not None and best is not r and r["method"] != "cache:full":
                a = {x["sample_id"]: x["answer_recall"] for x in rec}
                b = {x["sample_id"]: x["answer_recall"] for x in best["records"]}
                delta = fmt_interval(paired_difference(a, b), digits=2)
            ratio = "0" if r["method"] == "cache:full" else f"{r['ratio']:g}"
            exact = np.mean([bool(x["exact"]) for x in rec])
            rouge = np.mean([x["needle_rouge_l"] for x in rec])
            probe = result_path(out, r["method"], r["ratio"], r["mode"], probe=True)
            peak = json.loads(probe.read_text())["peak_rss_mib"] if probe.exists() else r.get("peak_rss_mib")
            rss = "-" if peak is None else f"{peak:.0f}"
            kv_pct = 100 * r["kv_share"]
            label = r["method"] + (f" ({r['n_whole']} whole)" if "n_whole" in r else "")
            lines.append(
                f"| {label} | {ratio} | {r['compression_achieved']:.2f} | {r['kv_mib']:.1f} | {kv_pct:.1f} | "
                f"{m:.2f} [{lo:.2f}, {hi:.2f}] | {100 * exact:.0f}% | {rouge:.2f} | {delta} | {rss} |"
            )
        if full is not None:
            lines.append("")
        lines.append("")
    lines.append(
        f"Generated by `python benchmarks/kv_peers.py table --out {out}` (run started {meta['created']}, "
        f"{meta['machine']}, model {meta['model']})."
    )
    text = "\n".join(lines) + "\n"
    (out / "table.md").write_text(text)
    return text


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("command", choices=("run", "prepare", "child", "table"))
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--scores", default="runs/smollm2-135m", help="detection run (cache:<score>, press:retrieval_heads)")
    p.add_argument("--press-score", default="needle_mass", help="score of --scores used by press:retrieval_heads")
    p.add_argument(
        "--methods",
        default="cache:full,cache:sink_window,cache:snapkv,cache:needle_mass,cache:copy,"
        + ",".join(f"press:{n}" for n in PRESSES),
    )
    p.add_argument("--aware-methods", default="", help="methods of the question-aware mode (default: --methods)")
    p.add_argument("--ratios", default="0.5", help="kvpress compression ratios (share of KV removed)")
    p.add_argument("--modes", default="agnostic", help="agnostic,aware")
    p.add_argument("--length", type=int, default=4096)
    p.add_argument("--needles", type=int, default=3, help="first N evaluation needles")
    p.add_argument("--depths", default="10,30,50")
    p.add_argument("--max-new-tokens", type=int, default=24)
    p.add_argument("--duo-samples", type=int, default=8, help="texts for kvpress's on-the-fly DuoAttention scores")
    p.add_argument("--limit", type=int, default=0, help="first N samples only (0: all)")
    p.add_argument("--cache-python", default=sys.executable, help="python that runs cache:* children")
    p.add_argument("--kvpress-python", default=sys.executable, help="python with kvpress for press:* children")
    p.add_argument("--lock", help="run each model-loading step under `flock LOCK` (shared machines)")
    p.add_argument("--method", help="child: one method")
    p.add_argument("--ratio", type=float, default=0.5, help="child: one ratio")
    p.add_argument("--mode", default="agnostic", help="child: one mode")
    p.add_argument("--probe", action="store_true", help="child: a peak-RSS probe (writes to rss/)")
    p.add_argument("--no-rss-probe", dest="rss_probe", action="store_false", help="skip the per-method RSS probes")
    args = p.parse_args(argv)
    if args.command == "child":
        child(args)
    elif args.command == "prepare":
        args.depths = [float(x) for x in str(args.depths).split(",")]
        prepare(args)
    elif args.command == "table":
        print(table(args.out))
    else:
        args.methods = [m.strip() for m in args.methods.split(",") if m.strip()]
        args.aware_methods = [m.strip() for m in args.aware_methods.split(",") if m.strip()]
        args.ratios = [float(x) for x in args.ratios.split(",")]
        args.modes = [m.strip() for m in args.modes.split(",")]
        args.depths = [float(x) for x in str(args.depths).split(",")]
        run(args)


if __name__ == "__main__":
    main()
