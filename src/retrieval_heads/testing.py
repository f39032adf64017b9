"""Tiny random-weight models of each supported architecture, built in-process (tests, benchmarks).

No download: configs are written here, weights are random with a fixed seed, and the tokenizer
is a word-level fast tokenizer (offsets supported) over a small vocabulary. A random model never
says a needle's answer: at the default recall threshold detection keeps no sample (tests of runs
that kept nothing), and `recall_threshold=-1` keeps every sample (tests that need scores).
"""

from __future__ import annotations

import re
from typing import Any

from .models import LoadedModel, spec_from_config

ARCHITECTURES = ("llama", "gemma3", "qwen2", "mistral", "gpt2")

WORDS = (
    "the a of and to in is was it that for on with as by at from this be are an or his her "
    "their we you they one two three four five six seven eight nine ten secret ingredient stew "
    "password archive room captain airship beekeeper named island smoked tamarind lantern fig "
    "seventy question answer based content book what who where which when how . , ? ! : - ' "
    "startup essay work people good time year money write think made city idea program language"
).split()


def tiny_tokenizer(extra_words: tuple[str, ...] = ()) -> Any:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, "\n": 3}
    for w in (*WORDS, *extra_words):
        vocab.setdefault(w.lower(), len(vocab))
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.normalizer = None
    tok.pre_tokenizer = pre_tokenizers.Split(re.compile(r"\n|\w+|[^\w\s]").pattern, behavior="isolated")
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(pattern=__import__("tokenizers").Regex(r"\n"), behavior="isolated"),
            pre_tokenizers.WhitespaceSplit(),
            pre_tokenizers.Punctuation(),
        ]
    )
    tok.decoder = decoders.WordPiece(prefix="##", cleanup=False)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>")
    return fast


def tiny_config(arch: str, vocab_size: int, **overrides: Any) -> Any:
    import transformers as T

    if arch == "gpt2":
        cfg = T.GPT2Config(n_embd=64, n_layer=2, n_head=4, n_positions=4096, vocab_size=vocab_size)
    else:
        # what each architecture adds to a 64-wide, 4-head model (grouped-query, sliding windows)
        own: dict[str, tuple[Any, dict[str, Any]]] = {
            "llama": (T.LlamaConfig, {"num_hidden_layers": 2, "num_key_value_heads": 2}),
            "qwen2": (T.Qwen2Config, {"num_hidden_layers": 2, "num_key_value_heads": 2}),
            "mistral": (T.MistralConfig, {"num_hidden_layers": 2, "num_key_value_heads": 1, "sliding_window": None}),
            "gemma3": (
                T.Gemma3TextConfig,
                {
                    "num_hidden_layers": 3,
                    "num_key_value_heads": 1,
                    "head_dim": 16,
                    "sliding_window": 16,
                    "layer_types": ["sliding_attention", "sliding_attention", "full_attention"],
                },
            ),
        }
        if arch not in own:
            raise ValueError(f"unknown tiny architecture {arch!r}")
        config_class, fields = own[arch]
        cfg = config_class(
            hidden_size=64,
            intermediate_size=128,
            num_attention_heads=4,
            vocab_size=vocab_size,
            max_position_embeddings=4096,
            **fields,
        )
    for k, v in overrides.items():
        setattr(cfg, k, v)
    return cfg


def tiny_model(
    arch: str = "llama", *, attn_implementation: str = "eager", seed: int = 0, **overrides: Any
) -> LoadedModel:
    """A random-weight model of `arch` with a word-level tokenizer; deterministic for a seed."""
    import torch
    from transformers import AutoModelForCausalLM

    tok = tiny_tokenizer()
    cfg = tiny_config(arch, vocab_size=len(tok), **overrides)
    cfg.bos_token_id, cfg.eos_token_id, cfg.pad_token_id = 1, 2, 2
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(cfg, attn_implementation=attn_implementation, dtype=torch.float32)
    model.eval()
    return LoadedModel(model=model, tokenizer=tok, spec=spec_from_config(model.config, f"tiny-{arch}"))
