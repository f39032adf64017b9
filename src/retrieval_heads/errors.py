"""Exceptions for bad input. The CLI shows them as one line on stderr and exits nonzero."""

from __future__ import annotations


class RetrievalHeadsError(Exception):
    """Base class: anything the user can fix (bad model, bad file, bad option)."""


class ModelLoadError(RetrievalHeadsError):
    """The model or tokenizer cannot be loaded, or is not a causal LM."""


class ConfigError(RetrievalHeadsError):
    """An option or grid is invalid for this model (e.g. length above max context)."""


class DataError(RetrievalHeadsError):
    """A needles file, haystack or score file is malformed or empty."""


class NeedleNotFoundError(RetrievalHeadsError):
    """The needle cannot be located exactly in the tokenized prompt."""


class RunConflictError(RetrievalHeadsError):
    """The output folder holds a run with a different configuration."""


def check_choice(what: str, value: object, choices: tuple[str, ...] | list[str]) -> None:
    """The one message shape for a value outside its choices: "unknown mask phase 'x'; choose from all, decode"."""
    if value not in choices:
        raise ConfigError(f"unknown {what} {value!r}; choose from {', '.join(choices)}")
