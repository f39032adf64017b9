"""`retrieval-heads docs-tables`: README and docs tables generated from run folders (tiny runs made
here, then trimmed to config + summary + table by `snapshot`), and the run configs' date and machine."""

from __future__ import annotations

import json
import shutil
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import pytest

from retrieval_heads import docs_tables as D
from retrieval_heads.detection import DetectConfig, Grid, detect
from retrieval_heads.errors import ConfigError, DataError
from retrieval_heads.needles import Needle
from retrieval_heads.results import DetectionResult
from retrieval_heads.runs import NON_SEMANTIC_KEYS, RunFolder
from retrieval_heads.testing import tiny_model

REPO = Path(__file__).resolve().parents[2]
NEEDLES = (
    Needle("the secret ingredient is smoked tamarind .", "what is the secret ingredient ?", "smoked tamarind", "stew"),
    Needle("the password is lantern fig seventy .", "what is the password ?", "lantern fig seventy", "pw"),
)
SCORES = np.array([[0.9, 0.0, 0.2, 0.05], [0.0, 0.6, 0.0, 0.3]])  # tiny llama: 2 layers x 4 heads
# the README's row for this map (typed by hand before the generator existed)
LLAMA_ROW = "| llama-2-7b-80k | authors | 32 x 32 | 586 | 70.2 % | 26.6 % | 2.6 % | 0.59 % | 33 (3.2 %) |"


@pytest.fixture(scope="module")
def runs(tmp_path_factory, haystack_file) -> Path:
    """Tiny runs of each kind in `full/`, their trimmed snapshots in `docs/runs/` (a repo root)."""
    from retrieval_heads.experiments.kv_eval import KVEvalConfig, kv_eval
    from retrieval_heads.experiments.task_eval import TaskEvalConfig, mask_eval, task_eval

    root = tmp_path_factory.mktemp("repo")
    full = root / "full"
    hay = str(haystack_file)
    lm = tiny_model("llama", attn_implementation="sdpa")
    grid = Grid((80,), (0.0, 50.0, 100.0), NEEDLES)
    detect(
        lm,
        grid,
        DetectConfig(max_new_tokens=4, recall_threshold=-1.0, chat=False, haystack=hay),
        out=full / "det",
        show_progress=False,
    )
    one = Grid((80,), (50.0,), NEEDLES[:1])
    mcfg = TaskEvalConfig(
        ks=(0, 2), random_seeds=(0,), grid=one, task_args={"path": hay, "max_new_tokens": 3}, chat=False
    )
    mask_eval(lm, SCORES, mcfg, out=full / "mask", show_progress=False)
    task_args = {"path": hay, "max_new_tokens": 3}
    tcfg = TaskEvalConfig(task="niah", ks=(0, 2), random_seeds=(0,), chat=False, limit=1, grid=one, task_args=task_args)
    task_eval(lm, SCORES, tcfg, out=full / "task", show_progress=False)
    kcfg = KVEvalConfig(
        budgets=(0.5,), policies=("sink_window", "retrieval"), grid=Grid((150,), (20.0,), NEEDLES[:1]),
        window=8, max_new_tokens=2, chat=False, haystack=hay, memory_probe=False,
    )  # fmt: skip
    kv_eval(lm, SCORES, kcfg, out=full / "kv", show_progress=False)
    for name in ("det", "mask", "task", "kv"):
        D.snapshot(full / name, root / "docs" / "runs")
    return root


def _table(text: str) -> list[str]:
    return [l for l in text.split("\n") if l.startswith("|")]


# ---------------------------------------------------------------- when and where a run ran
def test_run_configs_record_date_and_machine(runs):
    for name in ("det", "mask", "task", "kv"):
        config = json.loads((runs / "full" / name / "config.json").read_text())
        created = datetime.fromisoformat(config["created"])
        assert created.tzinfo is not None and created.utcoffset().total_seconds() == 0
        assert abs((datetime.now(timezone.utc) - created).total_seconds()) < 3600
        m = config["machine"]
        assert m["device"] == "cpu" and m["cpu_count"] >= 1 and m["torch"] and m["platform"]
    assert {"created", "machine"} <= NON_SEMANTIC_KEYS


def test_a_resumed_run_keeps_its_first_date(tmp_path):
    base = {"version": "0", "model": "tiny", "grid": {"lengths": [80]}}
    first = {**base, "created": "2020-01-02T03:04:05+00:00", "machine": {"device": "cpu"}}
    folder = RunFolder(tmp_path, first)
    folder.open()
    folder.close()
    later = {**base, "created": "2030-01-01T00:00:00+00:00", "machine": {"device": "cuda:0"}}
    folder = RunFolder(tmp_path, later)
    assert folder.open() == []  # not refused: date and machine are not semantic
    folder.close()
    saved = json.loads((tmp_path / "config.json").read_text())
    assert saved["created"] == later["created"] == "2020-01-02T03:04:05+00:00"  # the run was created then
    assert saved["machine"] == {"device": "cuda:0"}  # where it ran last


def test_detect_resumes_a_run_of_another_date(runs, haystack_file, tmp_path):
    run = tmp_path / "det"
    shutil.copytree(runs / "full" / "det", run)
    cfg = json.loads((run / "config.json").read_text())
    (run / "config.json").write_text(json.dumps({**cfg, "created": "2020-01-02T03:04:05+00:00", "machine": "old"}))
    lm = tiny_model("llama", attn_implementation="sdpa")
    dcfg = DetectConfig(max_new_tokens=4, recall_threshold=-1.0, chat=False, haystack=str(haystack_file))
    res = detect(lm, Grid((80,), (0.0, 50.0, 100.0), NEEDLES), dcfg, out=run, show_progress=False)
    assert len(res.records) == 6 and res.config["created"] == "2020-01-02T03:04:05+00:00"
    assert json.loads((run / "config.json").read_text())["created"] == "2020-01-02T03:04:05+00:00"


# ---------------------------------------------------------------- each kind, from trimmed snapshots
def test_snapshots_hold_no_records(runs):
    for name, files in {
        "det": ["config.json", "summary.json"],
        "mask": ["config.json", "summary.json", "table.md"],
        "task": ["config.json", "summary.json", "table.md"],
        "kv": ["config.json", "summary.json", "table.md"],
    }.items():
        assert sorted(p.name for p in (runs / "docs" / "runs" / name).iterdir()) == files
        for f in files:
            assert (runs / "docs" / "runs" / name / f).read_text() == (runs / "full" / name / f).read_text()


def test_snapshot_keeps_the_run_figures(runs, tmp_path):
    run = tmp_path / "mask"
    shutil.copytree(runs / "full" / "mask", run)
    (run / "mask_eval.png").write_bytes(b"\x89PNG fake figure")
    dest = D.snapshot(run, tmp_path / "snap")
    assert (dest / "mask_eval.png").read_bytes() == b"\x89PNG fake figure"
    assert not (dest / "records.jsonl").exists()


def test_top_heads_from_a_summary_equal_the_full_run(runs):
    full = DetectionResult.load(runs / "full" / "det")
    text = D.generate("top-heads docs/runs/det k=4", runs)
    rows = _table(text)
    assert rows[0] == "| rank | layer | head | retrieval score | 95 % CI | activation frequency |"
    low, high = full.intervals()
    assert rows[2:] == [
        f"| {i} | {h.layer} | {h.head} | {h.score:.3f} | [{low[h.layer, h.head]:.3f}, {high[h.layer, h.head]:.3f}] | "
        f"{h.activation_frequency:.2f} |"
        for i, h in enumerate(full.top(4), 1)
    ]
    config = json.loads((runs / "full" / "det" / "config.json").read_text())
    created = datetime.fromisoformat(config["created"])
    assert text.endswith(
        f"\n\nGenerated by `retrieval-heads docs-tables` from docs/runs/det (run on {created:%Y-%m-%d %H:%M} UTC, "
        f"{config['machine']['platform']}, {config['machine']['cpu_count']} CPUs, cpu, "
        f"torch {config['machine']['torch']})."
    )
    # another of the run's scores: its own ranking, no interval recorded for it
    other = full.with_score("needle_mass")
    rows = _table(D.generate("top-heads docs/runs/det k=3 score=needle_mass", runs))
    assert rows[0].startswith("| rank | layer | head | needle_mass score | 95 % CI |")
    assert rows[2:] == [
        f"| {i} | {h.layer} | {h.head} | {h.score:.3f} | - | {h.activation_frequency:.2f} |"
        for i, h in enumerate(other.top(3), 1)
    ]


def test_sparsity_of_runs_and_reference_maps(runs):
    text = D.generate("sparsity docs/runs/det ref:llama-2-7b-80k", runs)
    rows = _table(text)
    assert rows[0].startswith("| model | source | layers x heads | kept samples | score = 0 |")
    assert rows[2].startswith("| tiny-llama | this repo | 2 x 4 | 6 | ") and rows[3] == LLAMA_ROW
    assert "from docs/runs/det (run on " in text
    assert text.endswith("; ref:llama-2-7b-80k (published score maps shipped with the package).")


def test_other_scores(runs):
    full = DetectionResult.load(runs / "full" / "det")
    rows = _table(D.generate("other-scores docs/runs/det", runs))
    assert rows[0] == "| score | top-5 heads (score) | top-10 stability |"
    assert [r.split(" | ")[0] for r in rows[2:]] == [
        "| copy",
        "| distant_mass",
        "| needle_mass",
        "| query_focus",
        "| topk_mass",
    ]
    needle = full.with_score("needle_mass")
    heads = ", ".join(f"L{h.layer}-H{h.head} {h.score:.3f}" for h in needle.top(5))
    assert f"| needle_mass | {heads} | {needle.top_k_stability(10):.2f} |" in rows


@pytest.mark.parametrize("kind,name", [("mask-eval", "mask"), ("task-eval", "task"), ("kv-eval", "kv")])
def test_experiment_tables(runs, kind, name):
    text = D.generate(f"{kind} docs/runs/{name}", runs)
    table = (runs / "full" / name / "table.md").read_text().strip()
    assert text.startswith(
        table + "\n\nGenerated by `retrieval-heads docs-tables` from docs/runs/" + name + " (run on "
    )


@pytest.mark.parametrize("name", ["mask", "task"])
def test_null_table_of_a_snapshot_is_the_runs_null_table(runs, name, tmp_path):
    table, line = D.generate(f"null docs/runs/{name}", runs).rsplit("\n\n", 1)
    full = (runs / "full" / name / "table.md").read_text()
    pool, _, null = table.partition("\n\n")
    assert pool == full.splitlines()[0] and pool.endswith("(pool 'non-retrieval')")
    assert null.startswith("null distribution: effect = masked minus no mask;") and null in full  # as in table.md
    assert _table(null)[2].split(" | ")[3] == "1"  # its one random draw
    assert line.startswith(f"Generated by `retrieval-heads docs-tables` from docs/runs/{name} (run on ")
    old = tmp_path / "docs" / "runs" / "old"  # saved before the null existed
    shutil.copytree(runs / "docs" / "runs" / name, old)
    summary = json.loads((old / "summary.json").read_text())
    del summary["null_distribution"]
    (old / "summary.json").write_text(json.dumps(summary))
    with pytest.raises(DataError, match="docs/runs/old has no null distribution with a random draw"):
        D.generate("null docs/runs/old", tmp_path)


def test_task_summary_lines_follow_the_runs_rows(runs):
    text = D.generate("task-summary docs/runs/task docs/runs/task", runs)
    summary = json.loads((runs / "full" / "task" / "summary.json").read_text())
    m = summary["metrics"][0]
    rows = {r["kind"]: r for r in summary["rows"]}
    lines = [line for line in text.splitlines() if line.startswith(f"| {summary['task']}")]
    assert len(lines) == 2 and lines[0] == lines[1]
    cells = [c.strip() for c in lines[0].strip("|").split("|")]
    for cell, kind in zip(cells[1:4], ("base", "top", "random"), strict=True):
        v = rows[kind][m]
        assert cell == f"{100 * v['mean']:.1f} [{100 * v['low']:.1f}, {100 * v['high']:.1f}]"
    top = rows["top"][m]
    low, high = 100 * top["minus_random_low"], 100 * top["minus_random_high"]
    assert cells[4] == f"{100 * top['minus_random']:+.1f} [{low:+.1f}, {high:+.1f}]"
    with pytest.raises(DataError, match="not a task-eval run"):
        D.generate("task-summary docs/runs/task docs/runs/mask", runs)


def test_a_run_without_date_or_machine(tmp_path):
    d = tmp_path / "old"
    d.mkdir()
    (d / "config.json").write_text(json.dumps({"version": "0.1.0", "model": "tiny", "task": "mask-eval"}))
    (d / "table.md").write_text("| K |\n|---:|\n| 0 |\n")
    assert D.generate("mask-eval old", tmp_path).endswith(
        "| 0 |\n\nGenerated by `retrieval-heads docs-tables` from old (date not recorded, machine not recorded)."
    )


# ---------------------------------------------------------------- Markdown files and the command
DOC = """# Title

Text before.

<!-- table: top-heads docs/runs/det k=2 -->
stale content
<!-- /table -->

```
<!-- table: an example, not a table -->
<!-- /table -->
```

Middle text.
<!-- table: mask-eval docs/runs/mask -->
<!-- /table -->
Text after.
"""


def test_markers_rewritten_in_place_and_idempotent(runs, cli, monkeypatch):
    monkeypatch.chdir(runs)
    doc = runs / "doc.md"
    doc.write_text(DOC)
    code, out, err = cli("docs-tables", doc)
    assert code == 0, err
    assert "rewrote 2 of 2" in out
    text = doc.read_text()
    top = D.generate("top-heads docs/runs/det k=2", runs)
    mask = D.generate("mask-eval docs/runs/mask", runs)
    assert text == DOC.replace("stale content", top).replace(
        "<!-- table: mask-eval docs/runs/mask -->\n", f"<!-- table: mask-eval docs/runs/mask -->\n{mask}\n"
    )
    code, out, err = cli("docs-tables", doc)  # idempotent
    assert code == 0 and "rewrote 0 of 2" in out and doc.read_text() == text
    code, out, err = cli("docs-tables", "--check", doc)
    assert code == 0 and "2 generated table(s) up to date" in out


def test_check_lists_stale_tables_and_writes_nothing(runs, cli, monkeypatch):
    monkeypatch.chdir(runs)
    doc = runs / "stale.md"
    doc.write_text(DOC)
    cli("docs-tables", doc)
    fresh = doc.read_text()
    edited = fresh.replace("| 1 |", "| 1 (typed by hand) |", 1)
    doc.write_text(edited)
    code, _out, err = cli("docs-tables", "--check", doc)
    assert code == 1
    assert err.splitlines() == [
        f"{doc}:5: table 'top-heads docs/runs/det k=2' is out of date; run `retrieval-heads docs-tables {doc}`"
    ]
    assert doc.read_text() == edited
    assert [t.line for t in D.update([doc], runs, check=True) if t.stale] == [5]


@pytest.mark.parametrize(
    "marker,match",
    [
        ("top-heads docs/runs/nope", r"doc\.md:2: source 'docs/runs/nope' is not a run folder"),
        ("sparsity ref:nope", r"doc\.md:2: no reference map 'nope'"),
        ("top-heads docs/runs/mask", r"doc\.md:2: docs/runs/mask is a mask-eval run, not a detection run"),
        ("kv-eval docs/runs/mask", r"doc\.md:2: docs/runs/mask is a mask-eval run, not a kv-eval run"),
        ("mask-eval docs/runs/det", r"doc\.md:2: docs/runs/det is a detection run, not a mask-eval run"),
        ("null docs/runs/kv", r"docs/runs/kv is a kv-eval run, not a task-eval or mask-eval run"),
        ("heatmap docs/runs/det", r"unknown table kind 'heatmap'"),
        ("top-heads docs/runs/det n=3", r"top-heads takes options k, score, not n="),
        ("top-heads docs/runs/det k=0", r"k=0 must be a positive integer"),
        ("top-heads docs/runs/det score=nope", r"has no score 'nope'; it has: copy, distant_mass"),
        ("top-heads docs/runs/det docs/runs/det", r"top-heads takes one source"),
        ("sparsity", r"sparsity takes one or more sources"),
    ],
)
def test_bad_marker_or_source_is_one_line(runs, cli, monkeypatch, marker, match):
    import re

    monkeypatch.chdir(runs)
    doc = runs / "doc.md"
    good = "<!-- table: top-heads docs/runs/det -->\n<!-- /table -->\n"
    text = f"# t\n<!-- table: {marker} -->\nkept\n<!-- /table -->\n{good}"
    doc.write_text(text)
    code, _out, err = cli("docs-tables", doc)
    lines = [l for l in err.splitlines() if l.strip()]
    assert code == 2 and len(lines) == 1 and lines[0].startswith("error: "), err
    assert re.search(match, lines[0]), lines[0]
    assert doc.read_text() == text  # nothing written, not even the good table


def test_unbalanced_markers(tmp_path):
    with pytest.raises(DataError, match=r"x\.md:1: table marker without its closing <!-- /table -->"):
        D.render("<!-- table: sparsity ref:Yi-6B-200K -->\ntext\n", tmp_path, "x.md")
    with pytest.raises(DataError, match=r"x\.md:2: <!-- /table --> without an opening"):
        D.render("text\n<!-- /table -->\n", tmp_path, "x.md")
    with pytest.raises(DataError, match="without its closing"):  # a second opening before the close
        D.render("<!-- table: sparsity ref:Yi-6B-200K -->\n<!-- table: sparsity ref:Yi-6B-200K -->\n", tmp_path, "x.md")


def test_snapshot_command_and_refusals(runs, cli, tmp_path):
    code, out, err = cli("docs-tables", "--snapshot", runs / "full" / "kv", "--snapshot-dir", tmp_path / "snap")
    assert code == 0 and out.startswith("snapshot: "), err
    assert sorted(p.name for p in (tmp_path / "snap" / "kv").iterdir()) == ["config.json", "summary.json", "table.md"]
    unfinished = tmp_path / "unfinished"
    unfinished.mkdir()
    (unfinished / "config.json").write_text(json.dumps({"version": "0", "model": "tiny"}))
    code, _out, err = cli("docs-tables", "--snapshot", unfinished, "--snapshot-dir", tmp_path / "snap")
    assert code == 2 and "no summary.json" in err and not (tmp_path / "snap" / "unfinished").exists()
    code, _out, err = cli("docs-tables")
    assert code == 2 and "give the Markdown files" in err


def test_readme_and_docs_tables_are_up_to_date():
    """Every generated table of README.md and docs/*.md is what the command writes from the
    committed snapshots (docs/runs/) and shipped maps."""
    files = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
    stale = [str(t) for t in D.update(files, REPO, check=True) if t.stale]
    assert not stale, "\n".join(stale)


def test_a_snapshot_loads_as_a_score_source(runs):
    """A fresh clone can mask, evaluate or export with a committed snapshot instead of a detection run."""
    full = DetectionResult.load(runs / "full" / "det")
    snap = DetectionResult.load(runs / "docs" / "runs" / "det")
    assert not snap.has_per_sample and snap.score_name == full.score_name
    np.testing.assert_allclose(snap.scores, full.scores, atol=1e-6)
    assert snap.top(5) == full.top(5)
    # the snapshot keeps every score's mean map: ranking by another score matches the full run
    assert [(h.layer, h.head) for h in snap.with_score("topk_mass").top(5)] == [
        (h.layer, h.head) for h in full.with_score("topk_mass").top(5)
    ]
    with pytest.raises(ConfigError, match="needs the run folder"):
        snap.require_records("the bootstrap")


def test_a_bad_snapshot_summary_is_one_clear_error(runs, tmp_path):
    bad = tmp_path / "det"
    shutil.copytree(runs / "docs" / "runs" / "det", bad)
    (bad / "summary.json").write_text('{"scores": [[0.1]], "activation_frequency": [[0.1, 0.2]], "n_kept": 1}')
    with pytest.raises(DataError, match="not a detection summary"):
        DetectionResult.load(bad)


def test_correlation_lines_equal_compare(tmp_path):
    from retrieval_heads.analysis import correlation_pairs

    text = D.generate("correlation ref:Mistral-7B-v0.2-hf ref:Mixtral-8x7B-v0.1", tmp_path)
    row = correlation_pairs(
        [DetectionResult.load("ref:Mistral-7B-v0.2-hf"), DetectionResult.load("ref:Mixtral-8x7B-v0.1")]
    ).iloc[0]
    assert f"| 1024 | {row['pearson']:.3f} | {row['spearman']:.3f} |" in text
    with pytest.raises(DataError, match="in pairs"):
        D.generate("correlation ref:Mistral-7B-v0.2-hf", tmp_path)
    with pytest.raises(DataError, match="not of one shape"):
        D.generate("correlation ref:Mistral-7B-v0.2-hf ref:Qwen1.5-14B", tmp_path)


def test_snapshot_never_deletes_or_replaces_a_users_files(runs, tmp_path):
    user = tmp_path / "snap" / "det"  # the snapshot folder of a detection run, holding a user's table.md
    user.mkdir(parents=True)
    (user / "table.md").write_text("my notes\n")
    with pytest.raises(ConfigError, match="no snapshot wrote"):
        D.snapshot(runs / "full" / "det", tmp_path / "snap")
    assert (user / "table.md").read_text() == "my notes\n" and sorted(p.name for p in user.iterdir()) == ["table.md"]
    D.snapshot(runs / "full" / "det", tmp_path / "again")  # our own snapshot is refreshed
    assert D.snapshot(runs / "full" / "det", tmp_path / "again") == tmp_path / "again" / "det"


def test_update_writes_through_a_symlinked_markdown_file(runs, tmp_path):
    target = tmp_path / "real.md"
    target.write_text("<!-- table: top-heads docs/runs/det k=2 -->\n<!-- /table -->\n")
    link = tmp_path / "link.md"
    link.symlink_to(target)
    D.update([link], runs)
    assert link.is_symlink() and "| " in target.read_text()


def test_correlation_of_two_maps_of_one_name_is_a_line_not_a_traceback(runs):
    text = D.generate("correlation docs/runs/det docs/runs/det", runs)
    row = text.splitlines()[2]
    assert row.startswith("| tiny-llama | tiny-llama | 8 |") and row.count("|") == 6


def test_nulls_table_rows_read_each_runs_null_and_give_a_verdict(runs, tmp_path):
    text, line = D.generate("nulls docs/runs/mask docs/runs/task", runs).rsplit("\n\n", 1)
    rows = [r.strip("| ").split(" | ") for r in _table(text)[2:]]
    mask = json.loads((runs / "full" / "mask" / "summary.json").read_text())["null_distribution"][0]
    task = json.loads((runs / "full" / "task" / "summary.json").read_text())
    assert [r[1] for r in rows] == ["needle retrieval (NIAH)"] + ["niah (answer-only)"] * len(task["metrics"])
    assert rows[0][5] == "2" and rows[0][8] == f"{mask['top_effect']:+.1f}" and rows[0][10] == "1"
    assert rows[0][12] == f"{mask['p_value']:.3f}" and rows[0][13] == "no"  # one draw: p >= 0.5
    assert rows[1][7] == f"{100 * task['rows'][0][task['metrics'][0]]['mean']:.1f}"  # the unmasked metric
    assert line.startswith("Generated by `retrieval-heads docs-tables` from docs/runs/mask")
    # 20 draws all less harmful than the top K: p = 1/21, beyond the null
    strong = tmp_path / "docs" / "runs" / "strong"
    shutil.copytree(runs / "docs" / "runs" / "mask", strong)
    summary = json.loads((strong / "summary.json").read_text())
    summary["null_distribution"][0].update(
        top_effect=-50.0, draw_effects=[-10.0] * 20, n_draws=20, n_as_harmful=0, percentile=0.0, p_value=1 / 21
    )
    (strong / "summary.json").write_text(json.dumps(summary))
    row = _table(D.generate("nulls docs/runs/strong", tmp_path).rsplit("\n\n", 1)[0])[2].strip("| ").split(" | ")
    assert row[8:] == ["-50.0", "-10.0 [-10.0, -10.0]", "20", "0", "0.048", "yes"]
    with pytest.raises(DataError, match="docs/runs/kv is a kv-eval run, not a task-eval or mask-eval run"):
        D.generate("nulls docs/runs/mask docs/runs/kv", runs)
