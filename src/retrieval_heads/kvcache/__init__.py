"""Head-level KV-cache compression (paper section 5): a cache that keeps every token only for
chosen KV heads (`cache`), what the other heads keep (`evictions`), the policies that choose them
(`policies`), measurements on a model with such caches (`measure`) and exports for other tools
(`export`)."""

from ..heads import kv_head_scores, random_kv_scores, top_mask
from .cache import ATTN_NAME, CutGroup, HeadSparseCache, HeadSparseLayer, Step, full_cache_bytes, head_sparse_attention
from .evictions import Eviction, HeadKVEviction, SinkWindowEviction, SnapKVEviction, query_heads
from .export import (
    PATTERN_CONFIG,
    PATTERN_TSV,
    export_authors_json,
    export_duo_pattern,
    export_duo_tsv,
    pattern_values,
    read_duo_pattern,
    read_duo_tsv,
)
from .policies import FullPolicy, HeadKVPolicy, HeadPolicy, KVPolicy, SinkWindowPolicy, SnapKVPolicy

__all__ = [
    "ATTN_NAME",
    "PATTERN_CONFIG",
    "PATTERN_TSV",
    "CutGroup",
    "Eviction",
    "FullPolicy",
    "HeadKVEviction",
    "HeadKVPolicy",
    "HeadPolicy",
    "HeadSparseCache",
    "HeadSparseLayer",
    "KVPolicy",
    "SinkWindowEviction",
    "SinkWindowPolicy",
    "SnapKVEviction",
    "SnapKVPolicy",
    "Step",
    "export_authors_json",
    "export_duo_pattern",
    "export_duo_tsv",
    "full_cache_bytes",
    "head_sparse_attention",
    "kv_head_scores",
    "pattern_values",
    "query_heads",
    "random_kv_scores",
    "read_duo_pattern",
    "read_duo_tsv",
    "top_mask",
]
