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


def build_method(cfg, ctx):
    return method_class(cfg.name)(cfg, ctx)


def build_job_method(cfg, models, runtime, train_items):
    """The job's method on ``models`` (:class:`kdlab.student.Models`): its divergence (across tokenizers bound
    to both vocabularies, for the hybrid's shared tokens) and its teacher (:func:`kdlab.teacher.build_teacher`:
    live, cached or served, as the config says)."""
    from kdlab.alignment import CrossTokenizer
    from kdlab.divergences import build_divergence, is_cross_tokenizer
    from kdlab.methods.base import Context
    from kdlab.teacher import build_teacher, check_support, method_needs

    cross = is_cross_tokenizer(cfg.divergence.name)
    divergence = build_divergence(cfg.divergence)
    if cross:
        divergence = divergence.bind(models.tokenizer, models.teacher_tokenizer)
    teacher_tokenizer = models.teacher_tokenizer or models.tokenizer
    teacher = build_teacher(cfg, models.teacher, teacher_tokenizer, runtime, train_items)
    if method_needs(method_class(cfg.method.name), cross):
        check_support(divergence, teacher, len(teacher_tokenizer))
    ctx = Context(teacher=teacher, student=models.student, tokenizer=models.tokenizer, divergence=divergence,
                  runtime=runtime, train_cfg=cfg.train,
                  cross_tokenizer=CrossTokenizer(models.tokenizer, models.teacher_tokenizer, cfg.teacher.template)
                  if cross else None)
    return build_method(cfg.method, ctx)
