"""Passage ranking with retrieval heads (QRHead-like): HotpotQA distractor setting, recall@2.

    result = passage_rank(lm, DetectionResult.load("runs/smollm2-135m"), PassageConfig(), out="runs/passages")
    print(result.table())

Each HotpotQA dev question (seeded draw) comes with 10 titled paragraphs in the dataset's order, 2
of them gold (its supporting facts). The prompt holds the paragraphs, then the question
(`attribution.build_trace_prompt`); one prefill, and the question's rows of every head are read
(`attribution.question_attention`: per head and paragraph, the attention mass summed over the
question's tokens). A head set ranks the paragraphs by that mass summed over its heads (QRHead's
score, without its calibration by a content-free query):

- ``retrieval heads``: the top-K heads of the detection run's copy score (the paper's);
- ``query_focus heads``: the top-K heads of its `query_focus` score (QRHead-like, when the run has it);
- ``all heads``: every head;
- ``BM25``: rank-bm25 (Okapi, lowercased word tokens) of the question against title + paragraph.

Recall@2 = share of the 2 gold paragraphs among the 2 best-ranked (chance: 0.2), with percentile
bootstrap intervals over questions and paired differences against BM25 (`stats`, seeded).
"""

from __future__ import annotations

import re
import time
from dataclasses import asdict, dataclass
from functools import partial
from typing import TYPE_CHECKING, Any

import numpy as np

from ..attribution import Passage, build_trace_prompt, question_attention, watched_heads
from ..errors import ConfigError
from ..models import LoadedModel
from ..results import DetectionResult
from ..runner import check_scores
from ..tasks.qa import ANSWER_ONLY, HotpotQA
from .heads_run import BootstrapResult, RunOptions, run_on_heads
from .stats import bootstrap_ci, fmt_interval, paired_difference

if TYPE_CHECKING:
    from typing_extensions import Unpack

KIND = "passage-rank"
TOP = 2  # recall@2: HotpotQA has two gold paragraphs
_WORD = re.compile(r"\w+")


@dataclass(frozen=True)
class PassageConfig:
    limit: int = 50
    seed: int = 0
    k: int = 10
    chat: bool = True
    data: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def hotpot_questions(lm: LoadedModel, cfg: PassageConfig) -> list[dict[str, Any]]:
    """Seeded draw of HotpotQA dev questions (the hotpotqa task's documents): id, question,
    paragraphs (title, text), gold indices."""
    count = lambda text: len(lm.tokenizer(text, add_special_tokens=False)["input_ids"])  # noqa: E731
    out = []
    for doc in HotpotQA(cfg.data).docs(cfg.limit, cfg.seed, count):
        paras = doc.fields["paragraphs"]
        gold = set(doc.fields["gold_titles"])
        out.append(
            {
                "id": doc.id,
                "question": str(doc.fields["question"]),
                "paragraphs": paras,
                "gold": [j for j, (t, _) in enumerate(paras) if t in gold],
            }
        )
    return out


def bm25_scores(question: str, paragraphs: list[tuple[str, str]]) -> list[float]:
    try:
        from rank_bm25 import BM25Okapi
    except ImportError:
        raise ConfigError("the BM25 baseline needs rank-bm25: pip install 'retrieval-heads[attribution]'") from None

    docs = [_WORD.findall(f"{t} {p}".lower()) for t, p in paragraphs]
    return [float(x) for x in BM25Okapi(docs).get_scores(_WORD.findall(question.lower()))]


def recall_at(scores: np.ndarray, gold: list[int], k: int = TOP) -> float:
    """Share of `gold` indices among the k highest `scores` (ties: the lower index first)."""
    order = sorted(range(len(scores)), key=lambda j: (-float(scores[j]), j))[:k]
    return len(set(order) & set(gold)) / len(gold) if gold else float("nan")


def head_sets(scores: DetectionResult, k: int) -> dict[str, list[tuple[int, int]]]:
    L, H = scores.shape
    sets = {"retrieval heads": watched_heads(scores.with_score("copy"), k)}
    if "query_focus" in scores.score_names():
        sets["query_focus heads"] = watched_heads(scores.with_score("query_focus"), k)
    sets["all heads"] = [(l, h) for l in range(L) for h in range(H)]
    return sets


def run_item(lm: LoadedModel, q: dict[str, Any], cfg: PassageConfig) -> dict[str, Any]:
    t0 = time.perf_counter()
    passages = [Passage(t, f"{t}: {p}") for t, p in q["paragraphs"]]
    tp = build_trace_prompt(lm.tokenizer, passages, q["question"], chat=cfg.chat, instruction=ANSWER_ONLY, titled=False)
    if tp.n > lm.spec.max_context:
        raise ConfigError(f"{q['id']}: prompt of {tp.n} tokens exceeds {lm.spec.name}'s context")
    mass = question_attention(lm, tp)  # [L, H, paragraphs]
    return {
        "gold": q["gold"],
        "prompt_tokens": tp.n,
        "bm25": bm25_scores(q["question"], q["paragraphs"]),
        "mass": np.round(mass, 5).tolist(),
        "seconds": round(time.perf_counter() - t0, 2),
    }


class PassageResult(BootstrapResult):
    """Recall@2 per ranking method (see the module docstring)."""

    kind = KIND

    def per_question(self) -> dict[str, dict[str, float]]:
        """method -> {question id: recall@2}."""
        sets = {name: [tuple(h) for h in heads] for name, heads in self.config["head_sets"]}
        out: dict[str, dict[str, float]] = {name: {} for name in (*sets, "BM25")}
        for r in self.records:
            mass = np.asarray(r["mass"], dtype=float)
            for name, heads in sets.items():
                idx = tuple(np.array(heads).T)
                out[name][r["id"]] = recall_at(mass[idx].sum(0), r["gold"])
            out["BM25"][r["id"]] = recall_at(np.asarray(r["bm25"]), r["gold"])
        return out

    def rows(self) -> list[dict[str, Any]]:
        per = self.per_question()
        rows = []
        for name, vals in per.items():
            mean, lo, hi = bootstrap_ci(list(vals.values()), n_boot=self.n_boot, seed=self.seed)
            diff = None if name == "BM25" else paired_difference(vals, per["BM25"], n_boot=self.n_boot, seed=self.seed)
            n_heads = len(dict(self.config["head_sets"]).get(name, []))
            rows.append({"method": name, "heads": n_heads, "recall": mean, "low": lo, "high": hi, "vs_bm25": diff})
        return rows

    def to_dict(self) -> dict[str, Any]:
        return {
            "kind": KIND,
            "n": len(self.records),
            "recall_at": TOP,
            "rows": self.rows(),
            "bootstrap": {"n_boot": self.n_boot, "seed": self.seed},
        }

    def table(self) -> str:
        lines = [
            f"| ranking | heads | recall@{TOP} [95 % CI] | minus BM25, paired [95 % CI] | n |",
            "|---|---:|---|---|---:|",
        ]
        for r in self.rows():
            heads = str(r["heads"]) if r["heads"] else "-"
            diff = fmt_interval(r["vs_bm25"], digits=2)
            lines.append(
                f"| {r['method']} | {heads} | {r['recall']:.2f} [{r['low']:.2f}, {r['high']:.2f}] | {diff} "
                f"| {len(self.records)} |"
            )
        lines.append(f"| chance | - | {TOP / 10:.2f} | - | - |")
        return "\n".join(lines)


def passage_rank(
    lm: LoadedModel, scores: DetectionResult, config: PassageConfig = PassageConfig(), **run: Unpack[RunOptions]
) -> PassageResult:
    """Read the question's attention to each paragraph for every question; `run`: out (resumable
    run folder), overwrite, show_progress, scores_source, n_boot, boot_seed (`heads_run.run_on_heads`)."""
    check_scores(lm, scores.scores)
    if config.limit < 1:
        raise ConfigError(f"limit must be >= 1, got {config.limit}")
    questions = hotpot_questions(lm, config)
    bm25_scores("a", [("a", "a"), ("b", "b")])  # the baseline is installed (before any model work)
    sets = head_sets(scores, config.k)
    cfg = {**config.to_dict(), "head_sets": [[n, [list(h) for h in hs]] for n, hs in sets.items()]}  # ordered
    todo = [(q["id"], partial(run_item, lm, q, config)) for q in questions]
    return run_on_heads(lm, KIND, cfg, scores, todo, PassageResult, unit="question", **run)
