"""One interface for downstream tasks (paper section 4), in the manner of lm-evaluation-harness:
a task knows nothing of models. It loads its documents, turns each into a `Request` (a user
message, an optional start of the assistant's answer, a token budget), extracts the answer from
the generated text and scores it. The model side (chat template, greedy decoding, masking) lives
in `task_eval`.

    task = get_task("extractive-qa")
    docs = task.docs(limit=50, seed=0, count_tokens=lambda s: len(tok(s)["input_ids"]))
    req = task.request(docs[0], "answer-only")
    ... text = generate(req) ...
    task.score(docs[0], task.extract_answer(text, docs[0], "answer-only"))  # {"f1": .., "exact": ..}

Tasks are registered by name with `@register_task("name")`; `get_task(name)` builds one.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, ClassVar, Literal

from ..errors import ConfigError, DataError
from ..models import package_dir

PromptStyle = Literal["answer-only", "cot"]
PROMPT_STYLES: tuple[str, ...] = ("answer-only", "cot")
CountTokens = Callable[[str], int]


@dataclass(frozen=True)
class Doc:
    """One task example: a stable id, the fields the prompt needs and the gold answer(s)."""

    id: str
    fields: dict[str, Any]
    answers: tuple[str, ...]

    def to_dict(self) -> dict[str, Any]:
        return {"id": self.id, "answers": list(self.answers)}


@dataclass(frozen=True)
class Request:
    """What the model is asked: `user` is the user message; `assistant_prefix` starts the answer
    (e.g. "The answer is" for answer-only prompts); generation stops at EOS, at any of `stop` or
    after `max_new_tokens`."""

    id: str
    user: str
    assistant_prefix: str = ""
    max_new_tokens: int = 32
    stop: tuple[str, ...] = ("\n",)


@dataclass(frozen=True)
class Metric:
    name: str
    higher_is_better: bool = True
    scale: float = 100.0  # shown as percent


class Task(ABC):
    """A downstream task. Subclasses set `name`, `metrics` (primary first) and implement the four
    methods; `prompt_styles` lists the styles the task supports."""

    name: ClassVar[str]
    metrics: ClassVar[tuple[Metric, ...]]
    prompt_styles: ClassVar[tuple[str, ...]] = PROMPT_STYLES
    default_limit: ClassVar[int] = 50

    def config(self) -> dict[str, Any]:
        """What changes the task's documents and prompts (saved in the run config)."""
        return {"name": self.name}

    @abstractmethod
    def docs(self, limit: int, seed: int, count_tokens: CountTokens) -> list[Doc]:
        """`limit` documents, deterministic for `seed`. `count_tokens` measures text length in the
        model's tokens (for tasks that pad a context to a target length)."""

    @abstractmethod
    def request(self, doc: Doc, style: str) -> Request:
        """The prompt for one document in a prompt style."""

    @abstractmethod
    def extract_answer(self, text: str, doc: Doc, style: str) -> str:
        """The answer inside the generated text (without the assistant prefix)."""

    @abstractmethod
    def score(self, doc: Doc, prediction: str) -> dict[str, float]:
        """Per-example metric values in [0, 1], keyed by metric name."""

    def check_style(self, style: str) -> None:
        if style not in self.prompt_styles:
            raise ConfigError(f"task {self.name!r} has no prompt style {style!r}; choose from {', '.join(self.prompt_styles)}")


TASKS: dict[str, type[Task]] = {}


def register_task(name: str) -> Callable[[type[Task]], type[Task]]:
    def deco(cls: type[Task]) -> type[Task]:
        if name in TASKS:
            raise ValueError(f"task {name!r} registered twice")
        cls.name = name
        TASKS[name] = cls
        return cls

    return deco


def _load_builtin() -> None:
    from . import qa, reasoning  # noqa: F401  (registration side effect of the task modules)


def task_names() -> list[str]:
    _load_builtin()
    return sorted(TASKS)


def get_task(name: str, **kwargs: Any) -> Task:
    """Build the task registered as `name`; keyword arguments go to its constructor."""
    _load_builtin()
    if name not in TASKS:
        raise ConfigError(f"unknown task {name!r}; choose from {', '.join(sorted(TASKS))}")
    return TASKS[name](**kwargs)


# ----------------------------------------------------------------------------------- data files
def package_file(package: str, relative: str, install: str) -> Path:
    """A data file inside an installed package, found without importing the package (its own
    dependencies may be missing: these packages are installed with --no-deps)."""
    pkg = package_dir(package)
    if pkg is None:
        raise DataError(f"package {package!r} is not installed; run: {install}")
    path = pkg / relative
    if not path.exists():
        raise DataError(f"{path} not found in package {package!r}; expected version: {install}")
    return path


@dataclass(frozen=True)
class DataSource:
    """Where a task's data come from: an explicit path, else a file inside a PyPI package."""

    package: str
    relative: str
    install: str
    path: str | None = field(default=None)

    def resolve(self) -> Path:
        if self.path:
            p = Path(self.path)
            if not p.exists():
                raise DataError(f"data file {p} not found")
            return p
        return package_file(self.package, self.relative, self.install)
