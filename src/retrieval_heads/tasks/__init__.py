"""Downstream experiments with masked heads (paper section 4). Each task builds its samples and
scores the model's answers; masking comes from `retrieval_heads.masking`."""

from __future__ import annotations

from .niah import Condition, MaskEvalConfig, MaskEvalResult, mask_eval

__all__ = ["Condition", "MaskEvalConfig", "MaskEvalResult", "mask_eval"]
