"""Tasks by name: the built-in tasks and any registered with `register_task`.

    task = get_task("extractive-qa", context_tokens=2000)
    task_names()  # ['arith-chain', 'extractive-qa', 'gsm8k', 'hotpotqa', 'mmlu', 'niah', 'ruler_niah_multikey', ...]

    @register_task("my-task")
    class MyTask(Task): ...

The registry imports the task modules, never the reverse (they build on `tasks.base` only).
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Sequence
from typing import Any

from ..errors import ConfigError, check_choice
from .base import Task
from .niah import NIAH
from .qa import ExtractiveQA, HotpotQA
from .reasoning import GSM8K, MMLU, ArithChain
from .ruler import RulerNIAHMultiKey, RulerNIAHMultiQuery, RulerNIAHMultiValue, RulerNIAHSingle, RulerQA, RulerVT

TASKS: dict[str, type[Task]] = {}
TYPE_NAMES = {int: "an integer", float: "a number", str: "text"}


def register_task(name: str) -> Callable[[type[Task]], type[Task]]:
    """Class decorator: make a Task subclass available to `get_task(name)` (sets its `name`)."""

    def deco(cls: type[Task]) -> type[Task]:
        if name in TASKS:
            raise ValueError(f"task {name!r} registered twice")
        cls.name = name
        TASKS[name] = cls
        return cls

    return deco


RULER = (RulerNIAHSingle, RulerNIAHMultiKey, RulerNIAHMultiValue, RulerNIAHMultiQuery, RulerVT, RulerQA)
for _builtin in (NIAH, ExtractiveQA, HotpotQA, GSM8K, MMLU, ArithChain, *RULER):
    register_task(_builtin.name)(_builtin)


def task_names() -> list[str]:
    return sorted(TASKS)


def get_task(name: str, **kwargs: Any) -> Task:
    """Build the task registered as `name`; keyword arguments go to its constructor."""
    check_choice("task", name, task_names())
    params = task_parameters(name)
    unknown = [k for k in kwargs if k not in params]
    if unknown:
        raise ConfigError(f"task {name!r} takes no argument {unknown[0]!r}; it takes: {', '.join(params) or 'none'}")
    return TASKS[name](**kwargs)


def task_parameters(name: str) -> dict[str, Any]:
    """The arguments of task `name`'s constructor and their defaults."""
    sig = inspect.signature(TASKS[name].__init__)
    return {k: p.default for k, p in sig.parameters.items() if k != "self" and p.kind == p.POSITIONAL_OR_KEYWORD}


def parse_task_args(name: str, pairs: Sequence[str]) -> dict[str, Any]:
    """`key=value` pairs (the CLI's `--task-arg`) as arguments of task `name`, each value read as
    the type of the argument's default: int, float, bool, text, or a comma list of numbers (niah's
    lengths=500,1000)."""
    check_choice("task", name, task_names())
    params, out = task_parameters(name), dict[str, Any]()
    for pair in pairs:
        key, sep, text = pair.partition("=")
        key = key.strip().replace("-", "_")
        if not sep or key not in params:
            takes = ", ".join(f"{k}=" for k in params) or "no arguments"
            raise ConfigError(f"--task-arg {pair!r}: task {name!r} takes {takes}")
        default = params[key]
        if isinstance(default, (tuple, list)):
            if not all(isinstance(x, (int, float)) for x in default):
                raise ConfigError(f"--task-arg {key}: not given on the command line; use get_task({name!r}, {key}=...)")
            out[key] = tuple(_value(key, x, type(default[0])) for x in text.split(",") if x.strip())
        else:
            out[key] = _value(key, text, type(default) if isinstance(default, (bool, int, float)) else str)
    return out


def _value(key: str, text: str, kind: type) -> Any:
    if kind is bool:
        if text.lower() not in ("true", "false", "1", "0", "yes", "no"):
            raise ConfigError(f"--task-arg {key}: {text!r} is not true or false")
        return text.lower() in ("true", "1", "yes")
    try:
        return kind(text.strip())
    except ValueError:
        raise ConfigError(f"--task-arg {key}: {text!r} is not {TYPE_NAMES[kind]}") from None
