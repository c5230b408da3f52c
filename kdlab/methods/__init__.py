"""One method per module: ``conf/method/<name>.yaml`` <-> ``kdlab/methods/<name>.py`` (``METHOD``)."""
from __future__ import annotations

import importlib
from pathlib import Path

from kdlab.config import ConfigError

CONF_DIR = Path(__file__).resolve().parents[2] / "conf" / "method"


def method_class(name: str):
    try:
        return importlib.import_module(f"kdlab.methods.{name}").METHOD
    except ModuleNotFoundError:
        valid = ", ".join(sorted(p.stem for p in CONF_DIR.glob("*.yaml")))
        raise ConfigError(f"method={name} is unknown; valid methods: {valid}") from None


def trains_on_cached_teacher(cfg) -> bool:
    """Whether the job's teacher stands in as its top-k cache (``teacher.cache`` with a method that needs a
    teacher): none is kept in memory, and the evaluation rows that need it (its own, the analysis) are skipped."""
    return bool(cfg.teacher.get("cache")) and method_class(cfg.method.name).needs_teacher


def build_method(cfg, ctx):
    return method_class(cfg.name)(cfg, ctx)


def build_job_method(cfg, models, runtime, train_items):
    """The job's method on ``models`` (:class:`kdlab.student.Models`): its divergence (across tokenizers bound
    to both vocabularies, for the hybrid's shared tokens), and, when ``models`` holds no teacher
    (``teacher.cache``), the cache checked against this job's training examples."""
    from kdlab.alignment import CrossTokenizer
    from kdlab.divergences import build_divergence, is_cross_tokenizer
    from kdlab.methods.base import Context
    from kdlab.teacher.topk_cache import open_cache

    cross = is_cross_tokenizer(cfg.divergence.name)
    divergence = build_divergence(cfg.divergence)
    if cross:
        divergence = divergence.bind(models.tokenizer, models.teacher_tokenizer)
    ctx = Context(teacher=models.teacher, student=models.student, tokenizer=models.tokenizer, divergence=divergence,
                  runtime=runtime, train_cfg=cfg.train,
                  teacher_cache=open_cache(cfg, models.tokenizer, train_items) if models.teacher is None else None,
                  cross_tokenizer=CrossTokenizer(models.tokenizer, models.teacher_tokenizer, cfg.teacher.template)
                  if cross else None)
    return build_method(cfg.method, ctx)
