"""The detection grid's ranges (detection.parse_range): no inf or nan, a bounded count."""

from __future__ import annotations

import pytest

from retrieval_heads.errors import ConfigError


@pytest.mark.parametrize("text", ["inf", "nan", "80,inf", "1:inf:3", "-inf:80:2", "nan:nan:2"])
def test_infinite_or_nan_lengths_are_refused(text):
    from retrieval_heads.detection import parse_range

    with pytest.raises(ConfigError, match="inf or nan"):
        parse_range(text, integer=True)
    with pytest.raises(ConfigError, match="inf or nan"):
        parse_range(text, integer=False)


def test_huge_range_count_is_refused():
    from retrieval_heads.detection import parse_range

    with pytest.raises(ConfigError, match="at most 10000"):
        parse_range("80:160:1000000000", integer=True)
