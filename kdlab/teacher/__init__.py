"""The teacher group: a frozen causal LM loaded from a folder, a package, the hub, or random init, optionally
fine-tuned on the training split first (``finetune``, :mod:`kdlab.teacher.finetune`)."""
from __future__ import annotations

import torch

from kdlab.config import Type
from kdlab.modeling import SOURCE_SCHEMA, freeze, load_model, load_tokenizer, validate_source
from kdlab.teacher.finetune import validate_finetune

SCHEMA = {**SOURCE_SCHEMA, "cache": Type(str, optional=True), "finetune": validate_finetune}


def validate_teacher(cfg) -> None:
    validate_source("teacher", cfg, SCHEMA)


def load_teacher(cfg, dtype: torch.dtype):
    """Return ``(model, tokenizer)``; the model is frozen (no gradients, eval mode)."""
    tokenizer = load_tokenizer(cfg, "teacher")
    model = load_model(cfg, "teacher", dtype, vocab_size=len(tokenizer))
    return freeze(model), tokenizer
