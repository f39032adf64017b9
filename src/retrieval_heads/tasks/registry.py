"""Tasks by name: the built-in tasks and any registered with `register_task`.

    task = get_task("extractive-qa", context_tokens=2000)
    task_names()  # ['arith-chain', 'extractive-qa', 'gsm8k', 'hotpotqa', 'mmlu', 'niah']

    @register_task("my-task")
    class MyTask(Task): ...

The registry imports the task modules, never the reverse (they build on `tasks.base` only).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from ..errors import ConfigError
from .base import Task
from .niah import NIAH
from .qa import ExtractiveQA, HotpotQA
from .reasoning import GSM8K, MMLU, ArithChain

TASKS: dict[str, type[Task]] = {}


def register_task(name: str) -> Callable[[type[Task]], type[Task]]:
    """Class decorator: make a Task subclass available to `get_task(name)` (sets its `name`)."""

    def deco(cls: type[Task]) -> type[Task]:
        if name in TASKS:
            raise ValueError(f"task {name!r} registered twice")
        cls.name = name
        TASKS[name] = cls
        return cls

    return deco


for _builtin in (NIAH, ExtractiveQA, HotpotQA, GSM8K, MMLU, ArithChain):
    register_task(_builtin.name)(_builtin)


def task_names() -> list[str]:
    return sorted(TASKS)


def get_task(name: str, **kwargs: Any) -> Task:
    """Build the task registered as `name`; keyword arguments go to its constructor."""
    if name not in TASKS:
        raise ConfigError(f"unknown task {name!r}; choose from {', '.join(sorted(TASKS))}")
    return TASKS[name](**kwargs)
