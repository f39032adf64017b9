"""Does retrieval-head support catch hallucination? AUROC of answer-level scores on labelled answers.

    result = grounding_eval(lm, DetectionResult.load("runs/smollm2-135m"), GroundingConfig(), out="runs/grounding")
    print(result.table())

Labelled answers, built offline (`attribution.trace` on each, the watched heads = the top-K of the
detection run):

- ``niah``: needle samples at long context (the evaluation needles, never used by detection);
  grounded = the needle's answer retrieved (stemmed ROUGE-1 recall > 0.5, detection's criterion),
  else a natural failure;
- ``niah-masked``: the same at shorter lengths with the top `masked_k` heads masked (uniform), so
  that most answers fail; the watched heads are then the top K *unmasked* heads (a masked head's
  attention is uniform by construction);
- ``squad``: SQuAD v2 dev, one passage; an unanswerable question's answer is ungrounded by
  construction, an answerable one's is grounded when it matches a gold answer (SQuAD F1 >=
  `grounded_f1`); answerable questions answered wrongly are left out.

Scores (higher = more grounded; `attribution.answer_scores`, means over content tokens): support
(top-K copy share, ours), top-K context mass, the same over all heads, the model's mean token
log-probability and its negated mean entropy. Per set and pooled: AUROC with a percentile
bootstrap interval resampled within each class (`stats.bootstrap_auroc`, seeded).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from functools import partial
from typing import TYPE_CHECKING, Any

import numpy as np

from ..attribution import (
    ENGINES,
    Passage,
    TracePrompt,
    answer_scores,
    build_trace_prompt,
    prompt_of_sample,
    token_scores,
    trace,
    watched_heads,
)
from ..decoding import StopStrings
from ..errors import ConfigError, DataError
from ..heads import Head
from ..models import LoadedModel
from ..needles import EVALUATION_NEEDLES, Sample
from ..results import DetectionResult
from ..runner import check_scores
from ..scoring import answer_recall
from ..tasks.niah import NIAH, NeedleStop, error_kind
from ..tasks.qa import ANSWER_ONLY, ExtractiveQA, extract_qa_answer, f1_score, read_json, squad_paragraphs
from .heads_run import BootstrapResult, RunOptions, run_on_heads
from .stats import bootstrap_auroc, bootstrap_auroc_difference

if TYPE_CHECKING:
    from typing_extensions import Unpack

KIND = "grounding-eval"
SETS = ("niah", "niah-masked", "squad")
# (answer score, label in tables, sign: +1 when a higher value means more grounded)
SCORES: tuple[tuple[str, str, int], ...] = (
    ("copy", "**support** (top-K copy share, ours)", 1),
    ("context_mass", "top-K attention mass on the context", 1),
    ("all_copy", "copy share, all heads", 1),
    ("all_context_mass", "attention mass on the context, all heads", 1),
    ("logprob", "mean token log-probability", 1),
    ("entropy", "mean token entropy (lower = grounded)", -1),
)
SUBSETS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("NIAH, natural failures", ("niah",)),
    ("NIAH + masked-head failures", ("niah", "niah-masked")),
    ("SQuAD v2", ("squad",)),
    ("all", SETS),
)


@dataclass(frozen=True)
class GroundingConfig:
    k: int = 10
    lengths: tuple[int, ...] = (3000, 5000, 7600)
    depths: tuple[float, ...] = (10.0, 50.0, 90.0)
    masked_k: int = 10
    masked_lengths: tuple[int, ...] = (1000, 2000)
    masked_depths: tuple[float, ...] = (10.0, 50.0, 90.0)
    squad_answerable: int = 40
    squad_unanswerable: int = 30
    seed: int = 0
    max_new_tokens: int = 32
    chat: bool = True
    engine: str = "fast"
    recall_threshold: float = 0.5
    grounded_f1: float = 0.5
    squad_data: str | None = None

    def __post_init__(self) -> None:
        if self.engine not in ENGINES:
            raise ConfigError(f"unknown engine {self.engine!r}; choose from {', '.join(ENGINES)}")

    def to_dict(self) -> dict[str, Any]:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}


@dataclass(frozen=True)
class LabelledItem:
    """One answer to label: its prompt and gold (built when the run reaches it) and masked heads."""

    id: str
    set: str
    build: Callable[[], tuple[TracePrompt, dict[str, Any]]]  # -> (prompt, gold)
    masked: tuple[Head, ...] = ()


def squad_questions(cfg: GroundingConfig) -> list[dict[str, Any]]:
    """Seeded draw of answerable and unanswerable SQuAD v2 dev questions with their passage (the
    extractive-qa task's data file)."""
    data = read_json(str(ExtractiveQA(path=cfg.squad_data).source.resolve()))
    rng = np.random.default_rng(cfg.seed)
    out = []
    for answerable, n in ((True, cfg.squad_answerable), (False, cfg.squad_unanswerable)):
        pool = [
            {
                "id": qid,
                "title": par["title"],
                "context": par["context"],
                "question": question,
                "answers": list(answers),
                "answerable": answerable,
            }
            for par in squad_paragraphs(data, answerable)
            for qid, question, answers in par["qas"]
        ]
        if n > len(pool):
            raise DataError(f"asked for {n} {'answerable' if answerable else 'unanswerable'} questions; {len(pool)}")
        out += [pool[int(i)] for i in rng.permutation(len(pool))[:n]]
    return out


def niah_samples(lm: LoadedModel, lengths: tuple[int, ...], depths: tuple[float, ...], chat: bool) -> list[Sample]:
    """The evaluation needles' samples (the niah task's documents), needle by length by depth."""
    if not lengths:
        return []
    task = NIAH(EVALUATION_NEEDLES, lengths, depths)
    task.prepare(lm.tokenizer, chat)
    return [d.fields["sample"] for d in task.docs(task.size, 0, lambda text: 0)]


def items(lm: LoadedModel, ranking: list[Head], cfg: GroundingConfig) -> list[LabelledItem]:
    tok = lm.tokenizer
    out: list[LabelledItem] = []
    masked = tuple(ranking[: cfg.masked_k])
    for group, lengths, depths, mask in (
        ("niah", cfg.lengths, cfg.depths, ()),
        ("niah-masked", cfg.masked_lengths if masked else (), cfg.masked_depths, masked),
    ):
        for s in niah_samples(lm, lengths, depths, cfg.chat):

            def build(s: Sample = s) -> tuple[TracePrompt, dict[str, Any]]:
                return prompt_of_sample(tok, s), {"sample": s}

            out.append(LabelledItem(f"{group}/{s.needle.id}-L{s.length}-D{s.depth:g}", group, build, mask))
    for q in squad_questions(cfg):

        def build_q(q: dict[str, Any] = q) -> tuple[TracePrompt, dict[str, Any]]:
            tp = build_trace_prompt(
                tok,
                [Passage(q["title"], q["context"])],
                q["question"],
                chat=cfg.chat,
                instruction=ANSWER_ONLY,
                assistant_prefix="Answer:",
            )
            return tp, {"squad": q}

        out.append(LabelledItem(f"squad/{q['id']}", "squad", build_q))
    groups = [[it for it in out if it.set == g] for g in SETS]  # interleaved: a partial run holds every set
    return [g[i] for i in range(max(map(len, groups))) for g in groups if i < len(g)]


def label_answer(text: str, gold: dict[str, Any], cfg: GroundingConfig) -> dict[str, Any]:
    """{"grounded": True/False/None (left out), "answer": the extracted answer, ...}."""
    if "sample" in gold:
        s = gold["sample"]
        recall = answer_recall(s.needle.answer, text)
        kind = error_kind(s, text)[0]
        out = {"answer": text.strip(), "recall": recall, "error_kind": kind, "gold": s.needle.answer}
        return {"grounded": recall > cfg.recall_threshold, **out}
    q = gold["squad"]
    answer = extract_qa_answer(text, "answer-only")
    if not q["answerable"]:
        return {"grounded": False, "answer": answer, "answerable": False}
    f1 = max(f1_score(answer, a) for a in q["answers"])
    out = {"answer": answer, "f1": f1, "answerable": True, "gold": q["answers"][0]}
    return {"grounded": True if f1 >= cfg.grounded_f1 else None, **out}


def run_item(lm: LoadedModel, item: LabelledItem, ranking: list[Head], cfg: GroundingConfig) -> dict[str, Any]:
    t0 = time.perf_counter()
    tp, gold = item.build()
    watched = [h for h in ranking if h not in item.masked][: cfg.k]
    stop: Any = NeedleStop(lm.tokenizer) if "sample" in gold else StopStrings(lm.tokenizer, ("\n",))
    tr = trace(lm, tp, watched, max_new_tokens=cfg.max_new_tokens, stop=stop, engine=cfg.engine, masked=item.masked)
    text = lm.tokenizer.decode(tr.generated_ids, skip_special_tokens=True)
    if isinstance(stop, StopStrings):
        text = stop.cut(text)
    toks = token_scores(tp, tr, lm.tokenizer)
    return {
        "set": item.set,
        "prompt_tokens": tp.n,
        "generated_text": text,
        **label_answer(text, gold, cfg),
        "scores": answer_scores(toks),
        "watched": [list(h) for h in watched],
        "tokens": [{"text": t.text, "copy": t.copy, "logprob": round(t.logprob, 4)} for t in toks],
        "seconds": round(time.perf_counter() - t0, 2),
    }


class GroundingResult(BootstrapResult):
    """AUROC of each answer score per labelled set (see the module docstring)."""

    kind = KIND

    def labelled(self, sets: tuple[str, ...]) -> list[dict[str, Any]]:
        return [r for r in self.records if r["set"] in sets and r.get("grounded") is not None]

    def aurocs(self) -> list[dict[str, Any]]:
        """One row per score (AUROC, low, high per subset), then support minus log-probability on
        the same bootstrap resamples (paired)."""
        signs = {score: sign for score, _, sign in SCORES}

        def values(rs: list[dict[str, Any]], score: str) -> list[float]:
            return [signs[score] * float(np.nan if r["scores"][score] is None else r["scores"][score]) for r in rs]

        boot = {"n_boot": self.n_boot, "seed": self.seed}
        rows: list[dict[str, Any]] = [{"score": score, "label": label} for score, label, _ in SCORES]
        rows.append({"score": "copy-logprob", "label": "support minus log-probability, paired", "paired": True})
        for name, sets in SUBSETS:
            rs = self.labelled(sets)
            y = [bool(r["grounded"]) for r in rs]
            for row in rows[:-1]:
                row[name] = bootstrap_auroc(values(rs, row["score"]), y, **boot)
            rows[-1][name] = bootstrap_auroc_difference(values(rs, "copy"), values(rs, "logprob"), y, **boot)
        return rows

    def counts(self) -> dict[str, tuple[int, int]]:
        out = {}
        for name, sets in SUBSETS:
            rs = self.labelled(sets)
            out[name] = (sum(bool(r["grounded"]) for r in rs), sum(not r["grounded"] for r in rs))
        return out

    def to_dict(self) -> dict[str, Any]:
        return {
            "kind": KIND,
            "n_records": len(self.records),
            "counts": {k: {"grounded": g, "ungrounded": u} for k, (g, u) in self.counts().items()},
            "auroc": [
                {"score": r["score"], **{n: dict(zip(("auroc", "low", "high"), r[n], strict=True)) for n, _ in SUBSETS}}
                for r in self.aurocs()
            ],
            "bootstrap": {"n_boot": self.n_boot, "seed": self.seed, "resampling": "within each class"},
        }

    def table(self) -> str:
        names = [n for n, _ in SUBSETS]
        counts = self.counts()
        lines = [
            "| answer score | " + " | ".join(names) + " |",
            "|---|" + "---|" * len(names),
            "| n grounded / ungrounded | " + " | ".join(f"{g} / {u}" for g, u in (counts[n] for n in names)) + " |",
        ]
        for r in self.aurocs():
            f = "{:+.2f} [{:+.2f}, {:+.2f}]" if r.get("paired") else "{:.2f} [{:.2f}, {:.2f}]"
            cells = ["-" if np.isnan(v[0]) else f.format(*v) for v in (r[n] for n in names)]
            lines.append(f"| {r['label']} | " + " | ".join(cells) + " |")
        return "\n".join(lines)


def grounding_eval(
    lm: LoadedModel, scores: DetectionResult, config: GroundingConfig = GroundingConfig(), **run: Unpack[RunOptions]
) -> GroundingResult:
    """Trace every labelled answer and compute the AUROC table; `run`: out (resumable run
    folder), overwrite, show_progress, scores_source, n_boot, boot_seed (`heads_run.run_on_heads`)."""
    check_scores(lm, scores.scores)
    for length in (*config.lengths, *config.masked_lengths):
        if length + config.max_new_tokens + 200 > lm.spec.max_context:
            raise ConfigError(f"length {length} leaves no room in {lm.spec.name}'s context of {lm.spec.max_context}")
    ranking = watched_heads(scores, lm.spec.n_layers * lm.spec.n_heads)
    todo = [(it.id, partial(run_item, lm, it, ranking, config)) for it in items(lm, ranking, config)]
    cfg = {**config.to_dict(), "ranking_top": [list(h) for h in ranking[: config.k + config.masked_k]]}
    return run_on_heads(lm, KIND, cfg, scores, todo, GroundingResult, unit="answer", **run)
