"""experiments.passages: recall@k and BM25, and an end-to-end run on HotpotQA-format data (the
hotpotqa task's reader) with a tiny model."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from retrieval_heads.experiments.passages import PassageConfig, PassageResult, bm25_scores, passage_rank, recall_at
from retrieval_heads.results import DetectionResult
from retrieval_heads.testing import tiny_model

from .attribution_helpers import peaked


def test_recall_and_bm25():
    assert recall_at(np.array([0.1, 0.9, 0.5, 0.9]), [1, 2]) == 0.5  # tie: index 1 and 3, lower first
    assert recall_at(np.array([0.1, 0.9, 0.5, 0.2]), [1, 2]) == 1.0
    paras = [("A", "a song about rivers"), ("B", "she painted a lighthouse"), ("C", "trains"), ("D", "a dog")]
    s = bm25_scores("who painted the lighthouse", paras)
    assert s[1] > 0 and s[1] == max(s) and s[0] == s[2] == 0


def hotpot_file(path: Path) -> Path:
    words = "the captain was named seven . people think a good idea is to write ."
    records = []
    for i in range(3):
        context = [[f"t{j}", [f"{words} {j} ."]] for j in range(5)]
        records.append(
            {
                "_id": f"q{i}",
                "question": "who was the captain ?",
                "answer": "seven",
                "context": context,
                "supporting_facts": [["t1", 0], ["t3", 0]],
                "type": "bridge",
            }
        )
    path.write_text(json.dumps(records))
    return path


def test_passage_rank_end_to_end(tmp_path: Path):
    lm = peaked(tiny_model("llama", attn_implementation="sdpa"))
    scores = DetectionResult.from_aggregate("tiny", np.arange(8.0).reshape(2, 4), np.ones((2, 4)), 5)
    cfg = PassageConfig(limit=3, k=2, chat=False, data=str(hotpot_file(tmp_path / "h.json")))
    res = passage_rank(lm, scores, cfg, out=tmp_path / "run", show_progress=False, n_boot=200)
    assert dict(res.config["head_sets"])["retrieval heads"] == [[1, 3], [1, 2]]
    assert len(res.records) == 3 and all(r["gold"] == [1, 3] for r in res.records)
    mass = np.asarray(res.records[0]["mass"])
    assert mass.shape == (2, 4, 5) and (mass >= 0).all()
    table = res.table()
    assert "retrieval heads" in table and "all heads" in table and "BM25" in table and "chance" in table
    again = PassageResult.load(tmp_path / "run", n_boot=200)
    assert again.table() == table
    assert (tmp_path / "run" / "table.md").read_text().strip() == table
