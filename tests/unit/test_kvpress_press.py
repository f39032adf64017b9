"""`RetrievalHeadsPress` inside kvpress on tiny models: its text-generation pipeline, the keys it
masks, agreement with kvpress's own `DuoAttentionPress` for the same heads, the true-KV-budget knob,
Gemma3's sliding layers, score sources (run file, DuoAttention pattern) and bad input; `HeadKVPress`:
the count each KV head keeps.

kvpress 0.5.5 supports transformers < 5.3 (CI runs this file in the venv with the oldest
transformers); elsewhere the press tests skip. That importing our package never imports kvpress is
checked here too, without kvpress."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
import torch

from retrieval_heads.errors import ConfigError
from retrieval_heads.heads import top_mask
from retrieval_heads.kvcache import export_duo_pattern
from retrieval_heads.scorefile import write_scores
from retrieval_heads.testing import tiny_model

CONTEXT = " ".join(["the secret ingredient of the stew is smoked tamarind from the island ."] * 12)
QUESTION = "what is the secret ingredient ?"
# tiny llama: 2 layers x 2 KV heads (4 query heads); KV-head scores, distinct so the order is unique
KV_SCORES = np.array([[0.9, 0.1], [0.2, 0.5]])


def test_importing_the_package_does_not_import_kvpress():
    code = (
        "import sys, retrieval_heads, retrieval_heads.cli.app, retrieval_heads.kvcache, retrieval_heads.integrations; "
        "assert 'kvpress' not in sys.modules, 'kvpress imported'"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr


def _kvpress_or_skip():
    kvpress = pytest.importorskip("kvpress")
    import inspect

    from transformers import LlamaModel

    if "past_key_values" not in inspect.signature(LlamaModel.forward).parameters:
        pytest.skip("kvpress 0.5.5 hooks read the `past_key_values` forward argument; this transformers renamed it")
    return kvpress


@pytest.fixture(scope="module")
def kvp():
    return _kvpress_or_skip()


@pytest.fixture(scope="module")
def llama():
    return tiny_model("llama", attn_implementation="sdpa")


def _pipe(lm):
    from transformers import pipeline

    return pipeline("kv-press-text-generation", model=lm.model, tokenizer=lm.tokenizer)


def _masked(lm):
    """Per layer: (KV head, position) pairs kvpress's attention patch will hide, or None."""
    out = []
    for layer in lm.model.model.layers:
        idx = getattr(layer.self_attn, "masked_key_indices", None)
        out.append(None if idx is None else {(int(h), int(t)) for h, t in zip(idx[1], idx[2], strict=True)})
    return out


def test_press_in_kvpress_pipeline_masks_the_worst_ranked_heads(kvp, llama):
    from retrieval_heads.integrations.kvpress import RetrievalHeadsPress

    pipe = _pipe(llama)
    k_len = len(pipe.preprocess(CONTEXT, [QUESTION], "", 10**9)["context_ids"][0])
    press = RetrievalHeadsPress(scores=KV_SCORES, head_compression_ratio=0.5, sink_size=2, recent_size=8)
    out = pipe(CONTEXT, question=QUESTION, press=press, max_new_tokens=5)
    assert isinstance(out["answer"], str) and out["answer"]
    # half of the 4 KV heads streaming: the two worst-ranked, (0, 1) and (1, 0)
    assert press.whole_mask().tolist() == top_mask(KV_SCORES, 2).tolist() == [[True, False], [False, True]]
    masked = _masked(llama)
    cut = range(2, k_len - 8)
    assert masked[0] == {(1, t) for t in cut} and masked[1] == {(0, t) for t in cut}
    assert press.compression_ratio == pytest.approx(0.5 * len(cut) / k_len)


def test_press_agrees_with_kvpress_duo_attention_on_the_same_heads(kvp, llama, monkeypatch):
    """Same heads, sink and window as kvpress's DuoAttentionPress (pattern injected): same answer and
    compression ratio; ratio 0 = no press at all; a cut that hides the context changes the answer."""
    from retrieval_heads.integrations.kvpress import RetrievalHeadsPress

    pipe = _pipe(llama)
    monkeypatch.setattr(kvp.DuoAttentionPress, "load_attention_pattern", staticmethod(lambda model: (2, 8, KV_SCORES)))
    for ratio in (0.25, 0.75):
        duo = kvp.DuoAttentionPress(head_compression_ratio=ratio)
        ours = RetrievalHeadsPress(scores=KV_SCORES, head_compression_ratio=ratio, sink_size=2, recent_size=8)
        a = pipe(CONTEXT, question=QUESTION, press=duo, max_new_tokens=6)["answer"]
        b = pipe(CONTEXT, question=QUESTION, press=ours, max_new_tokens=6)["answer"]
        assert a == b and ours.compression_ratio == pytest.approx(duo.compression_ratio)
    plain = pipe(CONTEXT, question=QUESTION, max_new_tokens=6)["answer"]
    none = RetrievalHeadsPress(scores=KV_SCORES, head_compression_ratio=0.0)
    assert pipe(CONTEXT, question=QUESTION, press=none, max_new_tokens=6)["answer"] == plain
    assert all(m is None for m in _masked(llama))
    everything = RetrievalHeadsPress(scores=KV_SCORES, head_compression_ratio=1.0, sink_size=0, recent_size=1)
    assert pipe(CONTEXT, question=QUESTION, press=everything, max_new_tokens=6)["answer"] != plain


def test_kv_compression_ratio_is_a_true_kv_budget(kvp, llama):
    """kv_compression_ratio r: the number of streaming heads follows from the context length, and at
    least r of the KV pairs are hidden; kvpress's evaluation sets head_compression_ratio on any
    DuoAttentionPress after construction, which kv_compression_ratio overrides."""
    from retrieval_heads.integrations.kvpress import RetrievalHeadsPress

    pipe = _pipe(llama)
    k_len = len(pipe.preprocess(CONTEXT, [QUESTION], "", 10**9)["context_ids"][0])
    share = (k_len - 10) / k_len  # of a streaming head's KV pairs hidden (sink 2 + recent 8 kept)
    for r, n_stream in ((0.2, 1), (0.45, 2), (0.7, 3)):
        press = RetrievalHeadsPress(scores=KV_SCORES, kv_compression_ratio=r, sink_size=2, recent_size=8)
        assert isinstance(press, kvp.DuoAttentionPress)
        press.head_compression_ratio = 0.0  # what kvpress's evaluate.py does for a DuoAttentionPress
        pipe(CONTEXT, question=QUESTION, press=press, max_new_tokens=2)
        assert int((~press.whole_mask()).sum()) == n_stream  # the fewest streaming heads that reach r
        assert press.compression_ratio == pytest.approx(n_stream / 4 * share)
        assert (n_stream - 1) / 4 * share < r <= press.compression_ratio


def test_press_skips_gemma3_sliding_layers(kvp):
    """Gemma3 (two sliding layers, one global): only the global layer is compressed, ratios count it
    alone; scores of sliding layers are ignored."""
    from retrieval_heads.integrations.kvpress import RetrievalHeadsPress

    lm = tiny_model("gemma3", attn_implementation="sdpa")
    pipe = _pipe(lm)
    scores = np.array([[0.0], [0.0], [0.3]])  # 3 layers x 1 KV head
    press = RetrievalHeadsPress(scores=scores, head_compression_ratio=1.0, sink_size=2, recent_size=4)
    assert pipe(CONTEXT, question=QUESTION, press=press, max_new_tokens=3)["answer"] is not None
    masked = _masked(lm)
    assert masked[0] is None and masked[1] is None and masked[2]
    assert press.whole_mask().tolist() == [[True], [True], [False]]
    k_len = len(pipe.preprocess(CONTEXT, [QUESTION], "", 10**9)["context_ids"][0])
    assert press.compression_ratio == pytest.approx((k_len - 6) / k_len)


def test_score_sources_rank_alike(kvp, llama, tmp_path):
    """An authors'-format file (query heads, max over each KV head's group), our exported DuoAttention
    pattern and the array give the same streaming heads."""
    from retrieval_heads.integrations.kvpress import RetrievalHeadsPress

    per_query = np.repeat(KV_SCORES, 2, axis=1)  # 4 query heads, group of 2 per KV head
    write_scores(tmp_path / "scores.json", per_query[None])
    pattern = export_duo_pattern(tmp_path / "pattern", KV_SCORES, sink=2, recent=8)
    export_duo_pattern(tmp_path / "exported" / "duo_pattern", KV_SCORES, sink=2, recent=8)  # as export-heads writes
    (tmp_path / "exported" / "full_attention_heads.tsv").write_text("0\t1\n1\t0\n")  # its 0/1 table is not read
    pipe = _pipe(llama)
    masks = []
    files = (tmp_path / "scores.json", pattern, pattern / "full_attention_heads.tsv", tmp_path / "exported")
    for source in (KV_SCORES, per_query, *files):
        press = RetrievalHeadsPress(scores=source, head_compression_ratio=0.25, sink_size=2, recent_size=8)
        pipe(CONTEXT, question=QUESTION, press=press, max_new_tokens=1)
        masks.append(press.whole_mask().tolist())
    assert all(m == [[True, False], [True, True]] for m in masks), masks


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({}, "needs scores="),
        ({"scores": KV_SCORES, "head_compression_ratio": 1.5}, "head_compression_ratio"),
        ({"scores": KV_SCORES, "kv_compression_ratio": 1.0}, "kv_compression_ratio"),
        ({"scores": KV_SCORES, "recent_size": 0}, "recent_size"),
    ],
)
def test_bad_press_arguments(kvp, kwargs, match):
    from retrieval_heads.integrations.kvpress import RetrievalHeadsPress

    with pytest.raises(ConfigError, match=match):
        RetrievalHeadsPress(**kwargs)


def test_bad_scores_and_eager_attention(kvp, llama, tmp_path):
    from retrieval_heads.integrations.kvpress import RetrievalHeadsPress

    with pytest.raises(ConfigError, match="needs"):
        with RetrievalHeadsPress(scores=np.zeros((3, 3)))(llama.model):
            pass
    eager = tiny_model("llama", attn_implementation="eager")
    press = RetrievalHeadsPress(scores=KV_SCORES, head_compression_ratio=0.5)
    with pytest.raises(ConfigError, match="not eager"):
        _pipe(eager)(CONTEXT, question=QUESTION, press=press, max_new_tokens=1)
    with torch.no_grad(), pytest.raises(Exception, match="not found"):
        with RetrievalHeadsPress(scores=tmp_path / "missing.json")(llama.model):
            pass


def test_benchmark_shared_prefill_equals_kvpress_pipeline(kvp, llama):
    """benchmarks/kv_peers.py answers every press from one prefill; that gives what kvpress's own
    pipeline gives press by press (answer, bytes held, compression ratio)."""
    import importlib.util
    from pathlib import Path

    from transformers import DynamicCache

    from retrieval_heads.integrations.kvpress import RetrievalHeadsPress

    path = Path(__file__).parents[2] / "benchmarks" / "kv_peers.py"
    spec = importlib.util.spec_from_file_location("kv_peers", path)
    kv_peers = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(kv_peers)

    def presses():
        return {
            "snapkv": kvp.SnapKVPress(compression_ratio=0.5),
            "knorm": kvp.KnormPress(compression_ratio=0.5),
            "adakv": kvp.AdaKVPress(kvp.SnapKVPress(compression_ratio=0.5)),
            "ours": RetrievalHeadsPress(scores=KV_SCORES, kv_compression_ratio=0.5, sink_size=2, recent_size=8),
        }

    pipe = _pipe(llama)
    enc = pipe.preprocess(CONTEXT, [QUESTION], "", 10**9)
    context, question = enc["context_ids"][0].tolist(), enc["questions_ids"][0][0].tolist()
    shared = kv_peers.press_answers(llama, presses(), context + question, len(context), 8)
    for name, press in presses().items():
        cache = DynamicCache()
        with torch.inference_mode():
            (text,) = pipe._forward(
                {"context_ids": torch.tensor([context]), "questions_ids": [torch.tensor([question])]},
                max_new_tokens=8,
                press=press,
                cache=cache,
            )
        assert shared[name] == (text, kv_peers.cache_bytes(cache), press.compression_ratio), name
    assert shared["snapkv"][1] < shared["adakv"][1]  # token eviction frees bytes, AdaKV's masking does not


def test_headkv_press_keeps_the_policys_count_per_head(kvp, llama):
    """Each KV head keeps the count `HeadKVPolicy` gives it for the context (sink and window among
    them); compression 0 is no press at all."""
    from retrieval_heads.integrations.kvpress import HeadKVPress
    from retrieval_heads.kvcache import HeadKVPolicy

    pipe = _pipe(llama)
    k_len = len(pipe.preprocess(CONTEXT, [QUESTION], "", 10**9)["context_ids"][0])
    press = HeadKVPress(scores=KV_SCORES, compression_ratio=0.6, sink_size=2, recent_size=8, window_size=8)
    assert isinstance(press, kvp.BasePress)
    assert pipe(CONTEXT, question=QUESTION, press=press, max_new_tokens=5)["answer"]
    policy = HeadKVPolicy.for_budget(llama.spec, 0.4, k_len, sink=2, window=8, ranking=KV_SCORES)
    assert press.budgets.tolist() == [list(row) for row in policy.budgets]
    for layer, hidden in enumerate(_masked(llama)):
        for h in range(2):
            gone = {t for head, t in hidden if head == h}
            assert k_len - len(gone) == policy.budgets[layer][h]
            assert not gone & {0, 1, *range(k_len - 8, k_len)}  # the sink and the window stay
    assert policy.budgets[0][0] > policy.budgets[0][1]  # the better-scored head keeps more
    plain = pipe(CONTEXT, question=QUESTION, max_new_tokens=6)["answer"]
    none = HeadKVPress(scores=KV_SCORES, compression_ratio=0.0)
    assert pipe(CONTEXT, question=QUESTION, press=none, max_new_tokens=6)["answer"] == plain
    assert all(m is None for m in _masked(llama))


def test_headkv_press_skips_gemma3_sliding_layers_and_refuses_bad_input(kvp):
    from retrieval_heads.integrations.kvpress import HeadKVPress

    lm = tiny_model("gemma3", attn_implementation="sdpa")
    press = HeadKVPress(scores=np.array([[0.0], [0.0], [0.3]]), compression_ratio=0.5, sink_size=2, recent_size=4)
    assert _pipe(lm)(CONTEXT, question=QUESTION, press=press, max_new_tokens=3)["answer"] is not None
    masked = _masked(lm)
    assert masked[0] is None and masked[1] is None and masked[2]
    for kwargs, match in (
        ({}, "needs scores="),
        ({"scores": KV_SCORES, "compression_ratio": 1.0}, "compression_ratio"),
        ({"scores": KV_SCORES, "window_size": 0}, "window_size"),
    ):
        with pytest.raises(ConfigError, match=match):
            HeadKVPress(**kwargs)
    eager = tiny_model("llama", attn_implementation="eager")
    with pytest.raises(ConfigError, match="not eager"):
        _pipe(eager)(CONTEXT, question=QUESTION, press=HeadKVPress(scores=KV_SCORES, compression_ratio=0.5))
