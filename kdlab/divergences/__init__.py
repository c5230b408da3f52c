"""Token-level divergences for distillation (``conf/divergence/*.yaml``).

``build_divergence(cfg) -> Divergence``; ``div(student_logits, teacher, mask=None) -> scalar`` and
``div.per_token(student_logits, teacher)``; see :mod:`kdlab.divergences.base` for the contract, the
chunked memory layout and the sparse (top-k) teacher, and :mod:`kdlab.divergences.losses` for the
definitions and analytic gradients.
"""
from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from kdlab.config import ConfigError, check_section
from kdlab.divergences.base import Divergence, TopKLogProbs, topk_logprobs
from kdlab.divergences.losses import (
    AdaptiveKL,
    ForwardKL,
    GeneralizedJSD,
    ReverseKL,
    SkewForwardKL,
    SkewReverseKL,
    TotalVariation,
)
from kdlab.divergences.uld import ULD, ULDHybrid

DIVERGENCES: dict[str, type] = {
    cls.name: cls
    for cls in (ForwardKL, ReverseKL, GeneralizedJSD, TotalVariation, SkewForwardKL, SkewReverseKL, AdaptiveKL,
                ULD, ULDHybrid)   # uld*: across tokenizers, over aligned groups (kdlab.divergences.uld)
}
SCHEMA: dict[str, dict] = {name: cls.SCHEMA for name, cls in DIVERGENCES.items()}


def _as_dict(cfg: Any) -> dict:
    if isinstance(cfg, Mapping):
        return dict(cfg)
    if hasattr(cfg, "items"):  # omegaconf DictConfig
        return {k: v for k, v in cfg.items()}
    raise ConfigError(f"divergence config must be a mapping, got {type(cfg).__name__}")


def validate_divergence(cfg: Any) -> dict:
    """Check a divergence config (dict or DictConfig); returns it as a plain dict."""
    section = _as_dict(cfg)
    name = section.get("name")
    if name not in DIVERGENCES:
        raise ConfigError(f"divergence.name={name!r} is not valid; choose one of: {', '.join(DIVERGENCES)}")
    check_section("divergence", section, SCHEMA[name])
    return section


def is_cross_tokenizer(name: str) -> bool:
    return getattr(DIVERGENCES.get(name), "cross_tokenizer", False)


def build_divergence(cfg: Any) -> Divergence:
    """The :class:`Divergence` named by ``cfg.name`` with the config's parameters (others default)."""
    section = validate_divergence(cfg)
    params = {k: v for k, v in section.items() if k != "name"}
    return DIVERGENCES[section["name"]](**params)


__all__ = ["DIVERGENCES", "SCHEMA", "Divergence", "TopKLogProbs", "build_divergence", "is_cross_tokenizer",
           "topk_logprobs", "validate_divergence"]
