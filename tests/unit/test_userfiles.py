"""userfiles: the one bounded reader of user files (regular files only, a size limit per kind) and
the readers built on it (score files, run configs, records, needles, haystacks)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from retrieval_heads.errors import DataError
from retrieval_heads.needles import load_haystack, load_needles
from retrieval_heads.runs import read_config, read_records
from retrieval_heads.scorefile import read_json, read_scores
from retrieval_heads.userfiles import check_regular, read_bytes, read_text

READERS = [read_json, read_scores, read_config, read_records, load_needles, load_haystack]


@pytest.fixture
def fifo(tmp_path: Path) -> Path:
    p = tmp_path / "pipe.json"
    os.mkfifo(p)
    return p


@pytest.mark.parametrize("reader", READERS)
def test_pipes_are_refused_without_hanging(fifo: Path, reader):
    with pytest.raises(DataError, match="not a regular file"):
        reader(fifo)


@pytest.mark.parametrize("reader", READERS)
def test_devices_and_links_to_them_are_refused_before_reading(tmp_path: Path, reader):
    link = tmp_path / "zero.json"
    link.symlink_to("/dev/zero")
    for p in (Path("/dev/zero"), link):
        with pytest.raises(DataError, match="not a regular file"):
            reader(p)


def test_size_limit_is_checked_before_reading(tmp_path: Path):
    p = tmp_path / "big.json"
    p.write_bytes(b" " * 2000)
    with pytest.raises(DataError, match="over the 1000 bytes limit"):
        read_bytes(p, 1000)
    assert read_bytes(p, 2000) == b" " * 2000
    with pytest.raises(DataError, match="over the"):
        read_json(p, limit=100)


def test_missing_folder_and_bad_utf8_are_one_line(tmp_path: Path):
    with pytest.raises(DataError, match="file not found"):
        read_bytes(tmp_path / "missing", 10)
    with pytest.raises(DataError, match="is a folder"):
        check_regular(tmp_path)
    (tmp_path / "bad.txt").write_bytes(b"ok\n\xff\xfe")
    with pytest.raises(DataError, match=r"bad.txt:2: not UTF-8"):
        read_text(tmp_path / "bad.txt", 100)
    assert read_text(tmp_path / "bad.txt", 100, errors="replace").startswith("ok\n")


@settings(max_examples=60, deadline=None)
@given(data=st.binary(max_size=300), limit=st.integers(0, 400))
def test_read_bytes_returns_the_file_or_one_data_error(tmp_path_factory, data: bytes, limit: int):
    p = tmp_path_factory.mktemp("u") / "f"
    p.write_bytes(data)
    if len(data) <= limit:
        assert read_bytes(p, limit) == data
    else:
        with pytest.raises(DataError):
            read_bytes(p, limit)


@settings(max_examples=60, deadline=None)
@given(data=st.binary(max_size=200))
def test_json_readers_take_any_bytes_to_a_value_or_one_data_error(tmp_path_factory, data: bytes):
    p = tmp_path_factory.mktemp("j") / "f.json"
    p.write_bytes(data)
    for reader in (read_json, read_config, read_records):
        try:
            reader(p)
        except DataError as e:
            assert "\n" not in str(e)
