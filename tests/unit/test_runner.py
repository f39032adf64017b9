"""The run skeleton (runner.py): a run opens its folder at the first record, results load from a
run folder with one error line, the header records where and how the run ran."""

from __future__ import annotations

import json

import pytest

from retrieval_heads.errors import ConfigError, DataError
from retrieval_heads.runs import NON_SEMANTIC_KEYS, semantic

CONFIG = {"version": "0.1.0", "model": "tiny", "grid": {"lengths": [80]}}


def test_experiment_folders_with_malformed_records_are_one_error(tmp_path):
    from retrieval_heads.runner import ExperimentResult

    class Picky(ExperimentResult):
        kind = "picky"

        @classmethod
        def from_run(cls, config, records, **kwargs):
            return sum(r["k"] for r in records)  # a field of the wrong kind: TypeError

    d = tmp_path / "m"
    d.mkdir()
    (d / "config.json").write_text(json.dumps({"version": "0", "model": "tiny"}))
    (d / "records.jsonl").write_text(json.dumps({"id": "a", "k": "x"}) + "\n")
    with pytest.raises(DataError, match="do not fit a picky run"):
        Picky.load(d)


def test_an_experiment_run_opens_its_folder_at_the_first_record(tmp_path):
    from retrieval_heads.runner import Run

    out = tmp_path / "exp"
    with pytest.raises(ConfigError), Run(dict(CONFIG), out=out, show_progress=False):
        raise ConfigError("a sample cannot be built")  # before any record
    assert not out.exists()
    with Run(dict(CONFIG), out=out, show_progress=False) as run:
        assert not out.exists()
        run.item("a", lambda: {"x": 1})
        assert json.loads((out / "config.json").read_text()) == CONFIG
    with Run(dict(CONFIG), out=tmp_path / "empty", show_progress=False):
        pass
    assert (tmp_path / "empty" / "config.json").exists()  # a run without records still has its config


def test_the_header_records_the_resolved_device_and_dtype_without_changing_what_is_semantic():
    from retrieval_heads.runner import run_header
    from retrieval_heads.testing import tiny_model

    lm = tiny_model("llama")
    head = run_header(lm, "mask-eval", {"k": 1})
    assert head["machine"]["device"] == "cpu" and head["machine"]["dtype"] == head["dtype"] == "float32"
    assert "machine" in NON_SEMANTIC_KEYS
    older = {**head, "machine": {k: v for k, v in head["machine"].items() if k != "dtype"}}
    assert semantic(older) == semantic(head)  # a run written before the key still resumes
    assert head["task"] == "mask-eval"
    assert "task" not in run_header(lm, "detect", {}, kind_key=None)


@pytest.mark.parametrize(
    "n_boot, ci, match",
    [(10**9, 0.95, "within 1..100000"), (0, 0.95, "resamples"), (2.5, 0.95, "resamples"), (100, 1.5, "confidence")],
)
def test_bootstrap_settings_are_capped_before_the_run_folder(tmp_path, n_boot, ci, match):
    from retrieval_heads.experiments.task_eval import TaskEvalConfig, task_eval
    from retrieval_heads.runner import check_bootstrap
    from retrieval_heads.testing import tiny_model

    from .test_tasks import SCORES

    with pytest.raises(ConfigError, match=match):
        check_bootstrap(n_boot, ci)
    lm = tiny_model("llama")
    cfg = TaskEvalConfig(task="arith-chain", ks=(0,), random_seeds=(), limit=1)
    with pytest.raises(ConfigError, match=match):
        task_eval(lm, SCORES, cfg, out=tmp_path / "run", show_progress=False, n_boot=n_boot, ci=ci)
    assert not (tmp_path / "run").exists()
    check_bootstrap(2000, 0.95)
