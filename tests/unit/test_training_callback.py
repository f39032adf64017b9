"""RetrievalHeadsCallback on tiny random models: a few Trainer steps, full fine-tuning and LoRA."""

from __future__ import annotations

import logging

import numpy as np
import pytest
import torch
from transformers import Trainer, TrainingArguments

from retrieval_heads.errors import ConfigError
from retrieval_heads.integrations.transformers import PREFIX, RetrievalHeadsCallback, WatchConfig, jaccard, measure
from retrieval_heads.needles import Needle
from retrieval_heads.scorefile import write_scores
from retrieval_heads.testing import tiny_model

NEEDLES = (
    Needle("the secret ingredient is smoked tamarind .", "what is the secret ingredient ?", "smoked tamarind", "stew"),
)


@pytest.fixture
def watch(haystack_file) -> WatchConfig:
    # recall_threshold -1 keeps every sample, so a random model still gets a score map
    return WatchConfig(
        every=2,
        lengths=(80,),
        depths=(50.0,),
        needles=NEEDLES,
        k=3,
        max_new_tokens=4,
        chat=False,
        haystack=str(haystack_file),
        recall_threshold=-1.0,
    )


def _data(lm, n: int = 8, seq: int = 24) -> list[dict[str, torch.Tensor]]:
    ids = torch.randint(4, len(lm.tokenizer), (n, seq), generator=torch.Generator().manual_seed(0))
    return [{"input_ids": x, "labels": x} for x in ids]


def _trainer(model, data, tmp_path, steps: int = 5, callbacks=None) -> Trainer:
    args = TrainingArguments(
        output_dir=str(tmp_path / "trainer"),
        max_steps=steps,
        per_device_train_batch_size=2,
        learning_rate=1e-2,
        logging_steps=1,
        save_strategy="no",
        report_to="none",
        use_cpu=True,
        disable_tqdm=True,
        seed=0,
    )
    return Trainer(model=model, args=args, train_dataset=data, callbacks=callbacks)


def _watch_logs(trainer: Trainer) -> list[dict]:
    return [h for h in trainer.state.log_history if f"{PREFIX}/niah_score" in h]


def test_callback_logs_scores_and_restores_train_mode(tmp_path, watch):
    lm = tiny_model("llama", attn_implementation="sdpa")
    trainer = _trainer(lm.model, _data(lm), tmp_path)
    seen = []
    cb = RetrievalHeadsCallback(lm.tokenizer, watch).attach(trainer)
    # the mode of every forward: training (train mode, gradients) or the callback's detections
    lm.model.register_forward_pre_hook(lambda m, a: seen.append((m.training, torch.is_grad_enabled())))
    trainer.train()

    logs = _watch_logs(trainer)
    assert [h["step"] for h in logs] == [0, 2, 4, 5]  # the start, every 2 steps, the last step
    for h in logs:
        assert 0 <= h[f"{PREFIX}/niah_score"] <= 100
        assert h[f"{PREFIX}/seconds"] > 0
        assert h[f"{PREFIX}/n_kept"] == 1
        assert f"{PREFIX}/jaccard_top3" in h and f"{PREFIX}/pearson" in h
        assert any(k.startswith(f"{PREFIX}/score/L") for k in h)
    assert logs[0][f"{PREFIX}/jaccard_top3"] == 1.0  # step 0 is the reference
    # the Trainer's own loss log of every step survives the callback's logging
    assert [h["step"] for h in trainer.state.log_history if "loss" in h] == [1, 2, 3, 4, 5]
    assert lm.model.training  # put back in train mode
    assert lm.model.config._attn_implementation == "sdpa"
    assert [w.step for w in cb.history] == [0, 2, 4, 5]
    # training forwards ran in train mode with gradients; the detections in eval mode without
    assert (True, True) in seen and (False, False) in seen
    assert (False, True) not in seen


def test_training_is_the_same_with_and_without_the_callback(tmp_path, watch):
    """The callback restores the torch random state: dropout masks, hence weights, are unchanged."""
    weights = []
    for with_cb in (False, True):
        lm = tiny_model("llama", attn_implementation="sdpa", attention_dropout=0.3)
        trainer = _trainer(lm.model, _data(lm), tmp_path / str(with_cb), steps=4)
        if with_cb:
            RetrievalHeadsCallback(lm.tokenizer, watch).attach(trainer)
        trainer.train()
        weights.append(torch.cat([p.detach().flatten() for p in lm.model.parameters()]))
    assert torch.equal(weights[0], weights[1])


def test_callback_with_a_peft_lora_model(tmp_path, watch):
    from peft import LoraConfig, get_peft_model

    lm = tiny_model("llama", attn_implementation="sdpa")
    model = get_peft_model(lm.model, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
    trainer = _trainer(model, _data(lm), tmp_path, steps=3)
    cb = RetrievalHeadsCallback(lm.tokenizer, watch).attach(trainer)
    trainer.train()
    assert [h["step"] for h in _watch_logs(trainer)] == [0, 2, 3]
    assert model.training
    assert cb.results[-1].shape == (2, 4)
    lora_b = [p for n, p in model.named_parameters() if "lora_B" in n]
    assert lora_b and all(p.requires_grad for p in lora_b)
    assert any(p.abs().sum() > 0 for p in lora_b)  # the adapters trained (and were active in detection)


def test_adapters_are_active_during_detection(watch):
    """A LoRA adapter that changes the model changes what the callback measures."""
    from peft import LoraConfig, get_peft_model

    lm = tiny_model("llama", attn_implementation="sdpa")
    _, plain = measure(lm.model, lm.tokenizer, watch)
    model = get_peft_model(lm.model, LoraConfig(r=4, lora_alpha=64, target_modules=["q_proj", "v_proj"]))
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 1.0, generator=torch.Generator().manual_seed(1))
    _, adapted = measure(model, lm.tokenizer, watch)
    with model.disable_adapter():
        _, base = measure(model, lm.tokenizer, watch)
    assert base.records[0]["attention_scores"] == plain.records[0]["attention_scores"]
    assert adapted.records[0]["attention_scores"] != base.records[0]["attention_scores"]


def test_measure_restores_modes_random_state_and_attention(watch):
    lm = tiny_model("llama", attn_implementation="eager")
    model = lm.model
    model.train()
    model.model.layers[0].eval()  # a frozen sub-module stays in eval mode
    torch.manual_seed(123)
    state = torch.get_rng_state()
    w, result = measure(model, lm.tokenizer, watch)
    assert torch.equal(torch.get_rng_state(), state)
    assert model.training and not model.model.layers[0].training and model.model.layers[1].training
    assert model.config._attn_implementation == "eager"
    assert all(p.grad is None for p in model.parameters())
    assert w.n_samples == 1 and w.jaccard == 1.0 and w.seconds > 0
    assert np.array_equal(w.scores, result.scores, equal_nan=True)


def test_unattached_callback_writes_the_log_history(tmp_path, watch, caplog):
    lm = tiny_model("llama", attn_implementation="sdpa")
    cb = RetrievalHeadsCallback(lm.tokenizer, watch)
    trainer = _trainer(lm.model, _data(lm), tmp_path, steps=2, callbacks=[cb])
    with caplog.at_level(logging.WARNING, logger="retrieval_heads"):
        trainer.train()
    assert "not attached" in caplog.text
    assert [h["step"] for h in _watch_logs(trainer)] == [0, 2]


def test_reference_from_a_score_file_and_the_jaccard_warning(tmp_path, watch, caplog):
    lm = tiny_model("llama", attn_implementation="sdpa")
    first, result = measure(lm.model, lm.tokenizer, watch)
    # a reference whose top 3 are heads outside the current top 3: the Jaccard is low, a warning follows
    others = [(l, h) for l in range(result.shape[0]) for h in range(result.shape[1]) if (l, h) not in first.top]
    ref = np.zeros(result.shape)
    for (l, h), v in zip(others[:3], (0.9, 0.8, 0.7), strict=True):
        ref[l, h] = v
    path = tmp_path / "ref.json"
    write_scores(path, ref[None])
    trainer = _trainer(lm.model, _data(lm), tmp_path, steps=2)
    cb = RetrievalHeadsCallback(lm.tokenizer, watch, reference=path).attach(trainer)
    with caplog.at_level(logging.WARNING, logger="retrieval_heads"):
        trainer.train()
    j0 = cb.history[0].jaccard
    assert j0 == pytest.approx(jaccard(list(first.top), others[:3])) == 0.0
    assert j0 < watch.warn_jaccard
    assert "retrieval heads moved" in caplog.text


def test_reference_of_another_shape_is_refused(tmp_path, watch):
    lm = tiny_model("llama", attn_implementation="sdpa")
    path = tmp_path / "ref.json"
    write_scores(path, np.zeros((1, 3, 5)))
    trainer = _trainer(lm.model, _data(lm), tmp_path, steps=1)
    RetrievalHeadsCallback(lm.tokenizer, watch, reference=path).attach(trainer)
    with pytest.raises(ConfigError, match="shape"):
        trainer.train()
    with pytest.raises(ConfigError):
        WatchConfig(every=0)


def test_import_retrieval_heads_does_not_import_the_integration():
    import subprocess
    import sys

    code = "import sys, retrieval_heads; print('retrieval_heads.integrations.transformers' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True).stdout.strip() == "False"


@pytest.mark.parametrize("field", ["lengths", "depths", "needles"])
def test_an_empty_watch_grid_is_refused_not_replaced_by_the_default(field):
    from retrieval_heads.errors import ConfigError
    from retrieval_heads.integrations.transformers import WatchConfig

    with pytest.raises(ConfigError, match="watch grid is empty"):
        WatchConfig(**{field: ()})
