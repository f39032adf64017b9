"""Our head-sparse KV cache side by side with kvpress's presses, on the same samples (issue 16).

    python benchmarks/kv_peers.py run --out runs/kv-peers --scores runs/smollm2-135m \
        --task niah --task ruler_niah_multikey --task ruler_qa --samples 50 --length 4096 \
        --ratios 0.25,0.5,0.75 --modes agnostic,aware --kvpress-python /work/venv-old/bin/python
    python benchmarks/kv_peers.py table --out runs/kv-peers   # table.md and plot.png / plot.svg

`run` writes the samples once (`samples.jsonl`: prompt token ids, the question-agnostic and the
question-aware split), then runs every (method, compression ratio, mode) group in its own child
process (`kv_peers_child.py`), which loads the model and answers every sample, one shared prefill
per sample for all the group's methods. Each child appends one record per finished sample to
`records/<method>-r<ratio>-<mode>.jsonl`; a rerun skips what is finished.

Samples (`--task`, repeatable): `niah` (kv-eval's needle samples: evaluation needles x depths, chat
prompt; answer recall, exact match and ROUGE-L against the needle sentence), and RULER's tasks
(`ruler_niah_single`, `ruler_niah_multikey`, `ruler_niah_multivalue`, `ruler_niah_multiquery`,
`ruler_vt`, `ruler_qa`): `--samples` each, `--seed`, `--length` as the task's context_tokens, built
by the task's own request and scored by its own metric (string_match_all, QA string_match_part);
`--task-arg TASK:key=value` passes a task argument (e.g. `ruler_qa:dataset=hotpotqa`). Each sample's
score is its task's primary metric.

Methods. `cache:*`: our `HeadSparseCache` (a transformers cache that really holds fewer bytes),
sized by each policy's `for_budget` to 1 - ratio of the full cache's bytes: `full`, `sink_window`
(StreamingLLM), `snapkv`, `headkv` (HeadKV budgets from the `--press-score` ranking;
`headkv-<score>`: another score), and head policies ranked by a score of the detection run
(`cache:<score>`, e.g. `cache:needle_mass`, `cache:topk_mass`). `press:*`: kvpress's presses
(`kv_peers_child.PRESSES`) run by kvpress's own steps on the same token ids, and ours inside
kvpress (`retrieval_heads`, `headkv`). A press that fails on a model is recorded as failed.

Modes: `agnostic` compresses the context before the question is seen (kvpress's default, and
kv-eval's); `aware` compresses the context and the question together (kvpress `query_aware`): only
the chat template's end of turn and the answer prefix come after.

kvpress's `DuoAttentionPress(on_the_fly_scoring=True)` downloads BookSum and the tokenizer from the
hub; without network the child runs kvpress's own `duo_attention_on_the_fly` on `--duo-samples`
chunks of the haystack essays (same tokenizer) and hands the scores to the press.
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

sys.path.insert(0, str(Path(__file__).resolve().parent))  # the kv_peers_* modules beside this file
from kv_peers_child import child, load_lm, result_path, write_json
from kv_peers_presses import PRESSES, cache_bytes, press_answers
from kv_peers_table import table

__all__ = ["PRESSES", "cache_bytes", "child", "press_answers", "table"]
ANSWER_MARK = "\nAnswer:"  # end of the question in kv-eval's prompt (needles.QUESTION_TEMPLATE)
RULER_TASKS = (
    "ruler_niah_single",
    "ruler_niah_multikey",
    "ruler_niah_multivalue",
    "ruler_niah_multiquery",
    "ruler_vt",
    "ruler_qa",
)


# ----------------------------------------------------------------------------------- samples
def niah_rows(lm: Any, args: argparse.Namespace) -> list[dict[str, Any]]:
    """kv-eval's needle samples (same builder, needles, depths, haystack)."""
    from retrieval_heads.kvcache.measure import split_prompt
    from retrieval_heads.needles import EVALUATION_NEEDLES, load_haystack, make_sample

    haystack, rows = load_haystack(None), []
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
                    "task": "niah",
                    "prompt_ids": list(s.prompt_ids),
                    "context_len": c,
                    "aware_len": aware,
                    "answers": [s.needle.answer],
                    "max_new_tokens": args.max_new_tokens,
                    "needle": s.needle.needle,
                    "question": s.needle.question,
                    "answer": s.needle.answer,
                    "depth": depth,
                }
            )
    return rows


def split_points(tokenizer: Any, prompt: str, context: str, question: str) -> tuple[list[int], int, int]:
    """(token ids, question-agnostic split, question-aware split) of a prompt: the agnostic context
    is the tokens before the first one that reaches past `context` (so it holds no question text);
    the aware one ends after the last token of the question's last occurrence."""
    start, q = prompt.find(context), prompt.rfind(question)
    if start < 0 or q < start + len(context):
        raise SystemExit("cannot find the context followed by the question in the prompt")
    enc = tokenizer(prompt, add_special_tokens=False, return_offsets_mapping=True)
    offsets = enc["offset_mapping"]
    c = next(i for i, (_, e) in enumerate(offsets) if e > start + len(context))
    aware = next((i for i, (s, _) in enumerate(offsets) if s >= q + len(question)), len(offsets))
    return list(enc["input_ids"]), c, aware


def ruler_rows(lm: Any, name: str, kwargs: dict[str, Any], args: argparse.Namespace) -> list[dict[str, Any]]:
    """`--samples` documents of a RULER task at `--length` context tokens, as the task prompts them
    (chat template, its answer prefix starting the reply)."""
    from retrieval_heads.experiments.masked_task import count_tokens, prompts
    from retrieval_heads.tasks.registry import get_task

    task = get_task(name, **{"context_tokens": args.length, **kwargs})
    task.prepare(lm.tokenizer, chat=True)
    rows = []
    for p in prompts(lm, task, task.docs(args.samples, args.seed, count_tokens(lm)), "answer-only", chat=True):
        f = p.doc.fields
        ids, c, aware = split_points(lm.tokenizer, p.request.prompt(lm.tokenizer, True), f["context"], f["question"])
        assert tuple(ids) == p.ids
        rows.append(
            {
                "id": f"{name}/{p.doc.id}",
                "task": name,
                "prompt_ids": ids,
                "context_len": c,
                "aware_len": aware,
                "answers": list(p.doc.answers),
                "max_new_tokens": p.request.max_new_tokens,
                "question": f["question"],
            }
        )
    return rows


def task_args(pairs: list[str], tasks: list[str]) -> dict[str, dict[str, Any]]:
    """`TASK:key=value` pairs as each task's constructor arguments."""
    from retrieval_heads.errors import ConfigError
    from retrieval_heads.tasks.registry import parse_task_args

    out: dict[str, list[str]] = {t: [] for t in tasks}
    for pair in pairs:
        name, sep, kv = pair.partition(":")
        if not sep or name not in out or name == "niah":
            raise SystemExit(f"--task-arg {pair!r}: expected TASK:key=value with TASK one of the RULER --task given")
        out[name].append(kv)
    try:
        return {t: parse_task_args(t, kvs) for t, kvs in out.items() if t != "niah"}
    except ConfigError as e:
        raise SystemExit(str(e)) from None


def prepare(args: argparse.Namespace) -> Path:
    """The samples of every `--task`, as token ids and split points, written once (atomically)."""
    path = args.out / "samples.jsonl"
    if path.exists():
        return path
    unknown = [t for t in args.tasks if t != "niah" and t not in RULER_TASKS]
    if unknown:
        raise SystemExit(f"unknown task {unknown[0]!r}; choose from niah, {', '.join(RULER_TASKS)}")
    kwargs = task_args(args.task_args, args.tasks)
    lm = load_lm(args.model)
    rows = []
    for t in args.tasks:
        rows += niah_rows(lm, args) if t == "niah" else ruler_rows(lm, t, kwargs[t], args)
    args.out.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".samples.jsonl.{os.getpid()}.tmp")
    tmp.write_text("".join(json.dumps(r) + "\n" for r in rows))
    os.replace(tmp, path)
    return path


# ----------------------------------------------------------------------------------- driver
def versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for pkg in ("torch", "transformers", "kvpress", "retrieval-heads"):
        try:
            out[pkg] = version(pkg)
        except PackageNotFoundError:
            out[pkg] = "-"
    return out


def check_samples(args: argparse.Namespace) -> None:
    """A run folder holds one sample set: a rerun asking for other tasks is refused."""
    rows = [json.loads(x) for x in (args.out / "samples.jsonl").read_text().splitlines() if x.strip()]
    have = list(dict.fromkeys(r.get("task", "niah") for r in rows))
    if set(have) != set(args.tasks):
        raise SystemExit(f"{args.out} holds samples of {', '.join(have)}; use another --out for other tasks")


def run(args: argparse.Namespace) -> None:
    from tqdm import tqdm

    args.out.mkdir(parents=True, exist_ok=True)
    lock = ["flock", args.lock] if args.lock else []  # one real-model job at a time on a shared machine
    common = ["--out", str(args.out), "--model", args.model, "--length", str(args.length)]
    if not (args.out / "samples.jsonl").exists():
        depths = ",".join(f"{d:g}" for d in args.depths)
        prep = [*lock, args.cache_python, __file__, "prepare", *common, "--needles", str(args.needles)]
        prep += ["--depths", depths, "--samples", str(args.samples), "--seed", str(args.seed)]
        prep += ["--max-new-tokens", str(args.max_new_tokens)]
        prep += [x for t in args.tasks for x in ("--task", t)]
        prep += [x for a in args.task_args for x in ("--task-arg", a)]
        if subprocess.run(prep).returncode:
            raise SystemExit("preparing the samples failed (see above)")
    check_samples(args)
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
        "tasks": args.tasks,
        "task_args": args.task_args,
        "samples": args.samples,
        "seed": args.seed,
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


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    p.add_argument("command", choices=("run", "prepare", "child", "table"))
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--scores", default="runs/smollm2-135m", help="detection run (cache:<score>, our presses)")
    p.add_argument("--press-score", default="needle_mass", help="score of --scores for our presses and cache:headkv")
    p.add_argument(
        "--methods",
        default="cache:full,cache:sink_window,cache:snapkv,cache:needle_mass,cache:topk_mass,cache:headkv,"
        + ",".join(f"press:{n}" for n in PRESSES),
    )
    p.add_argument("--aware-methods", default="", help="methods of the question-aware mode (default: --methods)")
    p.add_argument("--ratios", default="0.5", help="kvpress compression ratios (share of KV removed)")
    p.add_argument("--modes", default="agnostic", help="agnostic,aware")
    p.add_argument("--task", dest="tasks", action="append", help=f"niah (default) or {', '.join(RULER_TASKS)}")
    p.add_argument("--task-arg", dest="task_args", action="append", default=[], help="TASK:key=value")
    p.add_argument("--samples", type=int, default=50, help="samples per RULER task")
    p.add_argument("--seed", type=int, default=0, help="seed of the RULER samples")
    p.add_argument("--length", type=int, default=4096, help="context tokens (RULER: the task's context_tokens)")
    p.add_argument("--needles", type=int, default=3, help="niah: first N evaluation needles")
    p.add_argument("--depths", default="10,30,50", help="niah: needle depths in percent")
    p.add_argument("--max-new-tokens", type=int, default=24, help="niah's answer tokens (RULER: the task's own)")
    p.add_argument("--duo-samples", type=int, default=8, help="texts for kvpress's on-the-fly DuoAttention scores")
    p.add_argument("--limit", type=int, default=0, help="first N samples only (0: all)")
    p.add_argument("--cache-python", default=sys.executable, help="python that runs cache:* children")
    p.add_argument("--kvpress-python", default=sys.executable, help="python with kvpress for press:* children")
    p.add_argument("--lock", help="run each model-loading step under `flock LOCK` (shared machines)")
    p.add_argument("--method", help="child: its methods (comma list, one kind)")
    p.add_argument("--ratio", type=float, default=0.5, help="child: one ratio")
    p.add_argument("--mode", default="agnostic", help="child: one mode")
    p.add_argument("--probe", action="store_true", help="child: a peak-RSS probe (writes to rss/)")
    p.add_argument("--no-rss-probe", dest="rss_probe", action="store_false", help="skip the per-method RSS probes")
    args = p.parse_args(argv)
    args.tasks = list(dict.fromkeys(args.tasks or ["niah"]))
    args.depths = [float(x) for x in str(args.depths).split(",")]
    if args.samples < 1 or args.length < 100:
        raise SystemExit("--samples must be >= 1 and --length >= 100")
    if args.command == "child":
        child(args)
    elif args.command == "prepare":
        prepare(args)
    elif args.command == "table":
        print(table(args.out))
    else:
        args.methods = [m.strip() for m in args.methods.split(",") if m.strip()]
        args.aware_methods = [m.strip() for m in args.aware_methods.split(",") if m.strip()]
        args.ratios = [float(x) for x in args.ratios.split(",")]
        args.modes = [m.strip() for m in args.modes.split(",")]
        bad = [m for m in args.modes if m not in ("agnostic", "aware")]
        if bad or any(not 0 < r < 1 for r in args.ratios):
            raise SystemExit("--modes takes agnostic,aware and --ratios values in (0, 1)")
        run(args)


if __name__ == "__main__":
    main()
