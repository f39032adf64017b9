"""Score files (scorefile.py): bounded before any allocation, one error for unparsable JSON, and
files written with the user's umask."""

from __future__ import annotations

import os
import stat
import time

import pytest

from retrieval_heads.errors import DataError


@pytest.mark.parametrize(
    "obj, message",
    [
        ({"100000-100000": [0.1]}, "out of range"),  # would allocate 10^10 head names
        ({"4096-0": [0.1]}, "out of range"),
        ({"0-4096": [0.1]}, "out of range"),
        ({"9" * 400 + "-0": [0.1]}, "out of range"),
        ({"0-0": [int("9" * 400)]}, "out of range"),  # a number no float holds
        ({"3-3": [0.1]}, "15 head(s) missing, e.g. 0-0"),
    ],
)
def test_score_files_are_bounded_before_allocation(obj, message):
    from retrieval_heads.scorefile import parse_scores

    t0 = time.perf_counter()
    with pytest.raises(DataError, match=message.replace("(", r"\(").replace(")", r"\)")):
        parse_scores(obj, "s.json")
    assert time.perf_counter() - t0 < 1


def test_score_file_with_a_huge_integer_text_is_one_error(tmp_path):
    from retrieval_heads.scorefile import read_scores

    p = tmp_path / "s.json"
    p.write_text('{"0-0": [' + "9" * 5000 + "]}")  # beyond Python's int-parsing limit
    with pytest.raises(DataError, match="not valid JSON"):
        read_scores(p)
    p.write_text("[" * 100_000)
    with pytest.raises(DataError, match="not valid JSON"):
        read_scores(p)


def test_files_get_the_users_umask(tmp_path):
    from retrieval_heads.scorefile import atomic_write_text

    old = os.umask(0o022)
    try:
        atomic_write_text(tmp_path / "a.json", "{}")
        os.umask(0o002)
        atomic_write_text(tmp_path / "b.json", "{}")
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "a.json").stat().st_mode) == 0o644
    assert stat.S_IMODE((tmp_path / "b.json").stat().st_mode) == 0o664
