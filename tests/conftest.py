"""Shared fixtures: tiny models built in-process, a CLI runner that shows what a user sees."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing may be fetched from a hub in tests


HAYSTACK = (
    "the startup essay was good . people write money idea . "
    "the city program language was made in one year . they think the work is good . "
) * 60


@pytest.fixture(scope="session", autouse=True)
def _threads():
    import torch

    torch.set_num_threads(2)


@pytest.fixture
def cli(capsys, monkeypatch):
    """Run `retrieval-heads ARGS` in-process; returns (exit code, stdout, stderr)."""
    from retrieval_heads import cli as cli_mod

    def run(*args: str) -> tuple[int, str, str]:
        monkeypatch.setattr(sys, "argv", ["retrieval-heads", *map(str, args)])
        code = 0
        try:
            cli_mod.main()
        except SystemExit as e:
            code = int(e.code or 0) if not isinstance(e.code, str) else 1
        out = capsys.readouterr()
        return code, out.out, out.err

    return run


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory) -> Path:
    """A tiny random Llama saved as a local model folder (loadable by --model PATH)."""
    from retrieval_heads.testing import tiny_model

    d = tmp_path_factory.mktemp("tiny-llama")
    lm = tiny_model("llama")
    lm.model.save_pretrained(d)
    lm.tokenizer.save_pretrained(d)
    return d


@pytest.fixture(scope="session")
def haystack_file(tmp_path_factory) -> Path:
    p = tmp_path_factory.mktemp("hay") / "hay.txt"
    p.write_text(HAYSTACK)
    return p


@pytest.fixture(scope="session")
def needles_file(tmp_path_factory) -> Path:
    import json

    p = tmp_path_factory.mktemp("needles") / "needles.jsonl"
    rows = [
        {
            "id": "stew",
            "needle": "the secret ingredient is smoked tamarind .",
            "question": "what is the secret ingredient ?",
            "answer": "smoked tamarind",
        },
        {
            "id": "pw",
            "needle": "the password is lantern fig seventy .",
            "question": "what is the password ?",
            "answer": "lantern fig seventy",
        },
    ]
    p.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return p
