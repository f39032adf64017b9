"""One child process of `benchmarks/kv_peers.py`: methods of one kind (`cache:*` or `press:*`) at
one compression ratio and mode on every sample, one dense prefill per sample shared by them.

Each method appends one JSON line per finished sample to its own records file (flushed at once);
a rerun reads those files, drops a partial last line, and computes only the samples a method lacks.
A press that raises (at construction or on a sample) is recorded as failed with its error line; the
run goes on. Per sample and method: the score, the KV bytes after compression, prefill seconds
(the shared prefill plus the method's own compression), decode seconds per generated token (each
decode step's forward, timed), and the child's peak RSS (VmHWM) in the summary.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path
from typing import Any

from kv_peers_presses import ForwardTimer, error_line, make_press, press_answers


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


def result_path(out: Path, method: str, ratio: float, mode: str, probe: bool = False) -> Path:
    """Where a method's summary goes; `probe`: its peak-RSS run on one sample (`rss/`)."""
    return out / ("rss" if probe else "results") / f"{method.replace(':', '-')}-r{ratio:g}-{mode}.json"


def records_path(out: Path, method: str, ratio: float, mode: str) -> Path:
    """A method's per-sample records (JSON lines), appended as samples finish."""
    return out / "records" / f"{method.replace(':', '-')}-r{ratio:g}-{mode}.jsonl"


def read_records(path: Path) -> dict[str, dict[str, Any]]:
    """Finished samples by id; a partial last line (a killed child) is dropped and cut from the file."""
    if not path.exists():
        return {}
    out, good = {}, 0
    with path.open("rb") as f:
        for raw in f:
            try:
                rec = json.loads(raw)
            except ValueError:
                break
            if not raw.endswith(b"\n"):
                break
            out[rec["sample_id"]] = rec
            good += len(raw)
    if good < path.stat().st_size:
        with path.open("r+b") as f:
            f.truncate(good)
    return out


def cut_answer(text: str) -> str:
    """kv-eval's stop rule as text: up to the first newline that follows some text."""
    head = text.lstrip()
    i = head.find("\n")
    return head if i < 0 else head[:i]


def score_fields(row: dict[str, Any], text: str) -> dict[str, Any]:
    """The sample's scores: `score` is its task's primary metric (niah: answer recall; RULER:
    string_match_all, QA: string_match_part, by the task's own extract_answer and score)."""
    task = row.get("task", "niah")
    if task != "niah":
        from retrieval_heads.tasks.base import Doc
        from retrieval_heads.tasks.registry import get_task

        t, doc = get_task(task), Doc(row["id"], {}, tuple(row["answers"]))
        pred = t.extract_answer(text, doc, "answer-only")
        scores = t.score(doc, pred)
        return {**scores, "score": scores[t.metrics[0].name], "prediction": pred, "text": text}
    from rouge_score import rouge_scorer

    from retrieval_heads.scoring import answer_recall
    from retrieval_heads.tasks.niah import exact_match

    answer = cut_answer(text)
    rouge = rouge_scorer.RougeScorer(["rougeL"]).score(row["needle"], answer)["rougeL"].fmeasure
    recall = answer_recall(row["answer"], answer)
    return {
        "score": recall,
        "answer_recall": recall,
        "exact": exact_match(row["answer"], answer),
        "needle_rouge_l": float(rouge),
        "text": text,
    }


# ----------------------------------------------------------------------------------- our cache
def cache_answers(lm: Any, policies: dict[str, Any], row: dict[str, Any], c: int, timing: dict[str, Any]) -> Any:
    """Per policy: (text, bytes after compression, 1 - bytes / full) on `HeadSparseCache`, one dense
    prefill shared (kv-eval's `answers_on`, step by step to time each part)."""
    from retrieval_heads.decoding import StopRule, StopStrings
    from retrieval_heads.kvcache.measure import answer_on, dense_prefill

    ids, tok = row["prompt_ids"], lm.tokenizer
    stop = StopRule(tok) if row.get("task", "niah") == "niah" else StopStrings(tok, ())  # RULER: EOS only
    t0 = time.perf_counter()
    dense = dense_prefill(lm, ids[:c], record_obs=32)
    shared = time.perf_counter() - t0
    out = {}
    for name, policy in policies.items():
        t0 = time.perf_counter()
        cache = policy.make_cache(lm.spec).load_prefill(dense)
        prefill, kv_bytes = shared + time.perf_counter() - t0, cache.nbytes()
        with ForwardTimer(lm.model) as timer:
            gen = answer_on(lm, cache, ids[c:], row.get("max_new_tokens", 24), stop)
        timing[name] = {"prefill_s": round(prefill, 4), **timer.take()}
        out[name] = (tok.decode(gen, skip_special_tokens=True), kv_bytes)
    return out


def cache_policies(lm: Any, names: list[str], args: argparse.Namespace, c: int, extra: dict[str, Any]) -> Any:
    """Our policies sized for this context (kv-eval's `for_budget`): `full`, `sink_window`,
    `snapkv`, `headkv` (HeadKV budgets from the `--press-score` ranking; `headkv-<score>`: another
    score), else `<score>`: the KV heads ranked best by that score of the detection run kept whole."""
    from retrieval_heads.experiments.kv_eval import POLICY_TYPES
    from retrieval_heads.heads import kv_head_scores
    from retrieval_heads.kvcache import FullPolicy, HeadKVPolicy, HeadPolicy
    from retrieval_heads.results import DetectionResult

    rankings = extra.setdefault("_rankings", {})
    spec, budget, out = lm.spec, 1.0 - args.ratio, {}
    for n in names:
        if n == "full":
            out[n] = FullPolicy()
        elif n in ("sink_window", "snapkv"):
            out[n] = POLICY_TYPES[n].for_budget(spec, budget, c, sink=4, window=60)
        else:
            score = n
            if n.startswith("headkv"):
                score = n.removeprefix("headkv").removeprefix("-") or args.press_score
            if score not in rankings:  # kv-eval's order of the KV heads by this score
                found = DetectionResult.load(args.scores).with_score(score).ranking_scores()
                rankings[score] = kv_head_scores(found, spec)
            if n.startswith("headkv"):
                out[n] = HeadKVPolicy.for_budget(spec, budget, c, sink=4, window=60, ranking=rankings[score], name=n)
            else:
                hp = HeadPolicy.for_budget(spec, budget, c, sink=4, window=60, ranking=rankings[score], name=n)
                extra.setdefault(n, {})["n_whole"] = hp.n_whole
                out[n] = hp
    return out


def load_lm(model: str) -> Any:
    """The model, sdpa attention (kvpress's key masking patches sdpa, not eager); `tiny-ARCH`: a tiny
    random model (smoke tests of this script)."""
    if model.startswith("tiny-"):
        from retrieval_heads.testing import tiny_model

        return tiny_model(model.removeprefix("tiny-"), attn_implementation="sdpa")
    from retrieval_heads.models import load_model

    return load_model(model, attn_implementation="sdpa")


def sample_rows(out: Path, limit: int) -> list[dict[str, Any]]:
    if not (out / "samples.jsonl").exists():
        raise SystemExit(f"{out}: no samples.jsonl (the `run` command writes it first)")
    rows = [json.loads(line) for line in (out / "samples.jsonl").read_text().splitlines() if line.strip()]
    return rows[:limit] if limit else rows


def summary(method: str, args: argparse.Namespace, recs: list[dict[str, Any]], **more: Any) -> dict[str, Any]:
    """A method's result: its records in sample order and their means (failed samples left out)."""
    import numpy as np

    ok = [r for r in recs if "failed" not in r]

    def mean(key: str) -> float | None:
        vals = [r[key] for r in ok if r.get(key) is not None]
        return float(np.mean(vals)) if vals else None

    failed, kv = next((r["failed"] for r in recs if "failed" in r), None), mean("kv_bytes")
    return {
        "method": method,
        "ratio": args.ratio,
        "mode": args.mode,
        "model": args.model,
        "n": len(ok),
        "n_failed": len(recs) - len(ok),
        **({"failed": failed} if failed else {}),
        "records": recs,
        "score": mean("score"),
        "kv_mib": None if kv is None else kv / 2**20,
        "kv_share": mean("kv_share"),
        "compression_achieved": mean("compression_achieved"),
        "prefill_s": mean("prefill_s"),
        "decode_s_per_token": mean("decode_s_per_token"),
        **more,
    }


def child(args: argparse.Namespace) -> None:
    """Run the methods of `args.method` (comma list, one kind) on every sample a method has no record
    of: one dense prefill per sample shared by them (ours: `cache_answers`; kvpress: `press_answers`)."""
    import torch

    from retrieval_heads.kvcache import full_cache_bytes

    methods = [m for m in args.method.split(",") if m]
    kinds = {m.split(":", 1)[0] for m in methods}
    if len(kinds) != 1:
        raise SystemExit("a child runs methods of one kind (cache:* or press:*)")
    kind = kinds.pop()
    names = [m.split(":", 1)[1] for m in methods]
    rows = sample_rows(args.out, args.limit)
    paths = {n: records_path(args.out, m, args.ratio, args.mode) for n, m in zip(names, methods, strict=True)}
    done = {n: ({} if args.probe else read_records(p)) for n, p in paths.items()}
    if not any(r["id"] not in done[n] for r in rows for n in names):  # all finished: no model to load
        for n, method in zip(names, methods, strict=True):
            recs = [done[n][r["id"]] for r in rows]
            write_json(
                result_path(args.out, method, args.ratio, args.mode, probe=args.probe), summary(method, args, recs)
            )
        return
    torch.manual_seed(0)
    lm = load_lm(args.model)
    rss_loaded = vm("VmRSS")
    spec, el = lm.spec, next(lm.model.parameters()).element_size()
    extra: dict[str, Any] = {}
    presses, broken = {}, {}
    if kind == "press":
        for n in names:
            try:
                presses[n] = make_press(n, args.ratio, args, lm)
            except Exception as e:  # a press that cannot be built here: recorded as failed
                broken[n] = error_line(e)
    (args.out / "records").mkdir(exist_ok=True)
    files = {n: p.open("a") for n, p in paths.items()} if not args.probe else {}
    t_start = time.perf_counter()
    for row in rows:
        todo = [n for n in names if row["id"] not in done[n]]
        if not todo:
            continue
        ids = row["prompt_ids"]
        c = row["aware_len"] if args.mode == "aware" else row["context_len"]
        full = full_cache_bytes(spec, c, element_size=el)  # as transformers keeps it (sliding layers: window)
        new_tokens = row.get("max_new_tokens", args.max_new_tokens)
        timing: dict[str, dict[str, Any]] = {}
        failures = {n: broken[n] for n in todo if n in broken}
        results: dict[str, tuple[str, int, float]] = {}
        if kind == "cache":
            policies = cache_policies(lm, todo, args, c, extra)
            for n, (text, kv_bytes) in cache_answers(lm, policies, row, c, timing).items():
                results[n] = (text, kv_bytes, 1 - kv_bytes / full)
        else:
            run = {n: presses[n] for n in todo if n in presses}
            if "duo_attention" in run:
                # DuoAttention keeps sink 128 + recent 256 for streaming heads: the head share whose
                # true KV compression is `ratio` at this context length (kvpress issue 228)
                run["duo_attention"].head_compression_ratio = min(1.0, args.ratio / max(1e-9, 1 - 384 / c))
            if run:
                results = press_answers(lm, run, ids, c, new_tokens, timing, failures)
            if "retrieval_heads" in results:
                extra.setdefault("retrieval_heads", {})["n_whole"] = int(presses["retrieval_heads"].whole_mask().sum())
        for n in todo:
            rec: dict[str, Any] = {"sample_id": row["id"], "task": row.get("task", "niah"), "context_tokens": c}
            if n in failures:
                rec["failed"] = failures[n]
            else:
                text, kv_bytes, achieved = results[n]
                rec |= score_fields(row, text)
                rec |= {"kv_bytes": int(kv_bytes), "kv_share": kv_bytes / full, "compression_achieved": achieved}
                rec |= timing.get(n, {})
            done[n][row["id"]] = rec
            if n in files:
                files[n].write(json.dumps(rec) + "\n")
                files[n].flush()
    for f in files.values():
        f.close()
    for n, method in zip(names, methods, strict=True):
        recs = [done[n][r["id"]] for r in rows if r["id"] in done[n]]
        out = summary(
            method,
            args,
            recs,
            peak_rss_mib=vm("VmHWM") if len(methods) == 1 else None,  # a group's peak is no method's
            rss_loaded_mib=rss_loaded,
            seconds=round(time.perf_counter() - t_start, 1),
            **extra.get(n, {}),
        )
        path = result_path(args.out, method, args.ratio, args.mode, probe=args.probe)
        path.parent.mkdir(exist_ok=True)
        write_json(path, out)
