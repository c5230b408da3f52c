"""The teacher group: a frozen causal LM loaded from a folder, a package, the hub, or random init, optionally
fine-tuned on the training split first (``finetune``, :mod:`kdlab.teacher.finetune`).

What a method gets from it is a :class:`kdlab.teacher.interface.Teacher` of one of three kinds, and this
package alone decides which (:func:`teacher_kind`): ``served`` when ``teacher.serve.url`` is set
(:mod:`kdlab.teacher.served`), ``cached`` when ``teacher.cache`` names a top-k cache
(:mod:`kdlab.teacher.topk_cache`), else ``live``. :func:`check_teacher` holds each method's declared needs
(``Method.teacher_needs``) against what that kind provides, before anything loads.
"""
from __future__ import annotations

import torch

from kdlab.config import ConfigError, Type
from kdlab.modeling import SOURCE_SCHEMA, freeze, load_model, load_tokenizer, validate_source
from kdlab.teacher.finetune import validate_finetune


def _validate_serve(key: str, value) -> None:
    from kdlab.teacher.served import validate_serve

    validate_serve(key, value)


SCHEMA = {**SOURCE_SCHEMA, "cache": Type(str, optional=True), "finetune": validate_finetune,
          "serve": _validate_serve}

# How a refusal names each kind as the alternative.
KIND_SETTINGS = {"live": "a live teacher (teacher.cache=null, teacher.serve.url=null)",
                 "cached": "a cached one (teacher.cache=<folder from python -m kdlab.cache_teacher>)",
                 "served": "a served one (teacher.serve.url=<server>)"}


def validate_teacher(cfg) -> None:
    validate_source("teacher", cfg, SCHEMA)
    if teacher_kind(cfg) == "served" and cfg.get("cache"):
        raise ConfigError(f"teacher.cache={cfg.cache} and teacher.serve.url={cfg.serve.url} both stand in for the "
                          f"teacher; set one of them to null")
    if teacher_kind(cfg) == "served" and cfg.get("finetune"):
        raise ConfigError(f"teacher.finetune fine-tunes the teacher in this process, which a served teacher "
                          f"(teacher.serve.url={cfg.serve.url}) is not; set teacher.finetune=null (serve the "
                          f"fine-tuned model instead)")


def teacher_kind(cfg) -> str:
    """``served``, ``cached`` or ``live``: the one place that reads it from the teacher section."""
    if (cfg.get("serve") or {}).get("url"):
        return "served"
    return "cached" if cfg.get("cache") else "live"


def kind_class(kind: str):
    from kdlab.teacher.cached import CachedTeacher
    from kdlab.teacher.interface import LiveTeacher
    from kdlab.teacher.served import ServedTeacher

    return {"live": LiveTeacher, "cached": CachedTeacher, "served": ServedTeacher}[kind]


def method_needs(method, cross: bool):
    """What ``method`` (a Method class) needs of its teacher: a set of capabilities, or across tokenizers
    (``cross``) a sentence saying why it cannot distil there."""
    if not method.teacher_needs:
        return frozenset()   # no teacher during training (sft): nothing to refuse, across tokenizers too
    return method.teacher_needs_across if cross else method.teacher_needs


def lacking(needs: frozenset, kind: str) -> list[str]:
    """What of ``needs`` a ``kind`` teacher does not provide, the most demanding last."""
    from kdlab.teacher.interface import CAPABILITIES

    return sorted(needs - kind_class(kind).provides, key=list(CAPABILITIES).index)


def refusal(name: str, method, kind: str, cross: bool, divergence: str) -> str | None:
    """The one-line refusal of ``method`` with a ``kind`` teacher (None: it works): the table's cell."""
    from kdlab.divergences import DIVERGENCES
    from kdlab.teacher.interface import CAPABILITIES

    needs = method_needs(method, cross)
    if isinstance(needs, str):
        return (f"method={name} cannot distil across tokenizers: it {needs}; use method=kd with "
                f"divergence={divergence}, or a same-tokenizer divergence (e.g. divergence=fkl) with a student of "
                f"the teacher's family")
    kinds = ("live", "cached", "served")
    works = [k for k in kinds if needs <= kind_class(k).provides]
    missing = lacking(needs, kind)
    setting = {"cached": "teacher.cache", "served": "teacher.serve.url", "live": "no teacher.cache/serve"}[kind]
    if missing:
        across = " across tokenizers" if cross else ""
        others = " or ".join(KIND_SETTINGS[k] for k in works if k != kind)
        return (f"method={name} cannot train with a {kind} teacher ({setting}){across}: it needs "
                f"{CAPABILITIES[missing[-1]]}; use {others}")
    if kind != "live" and needs and not DIVERGENCES[divergence].supports_topk:
        return (f"divergence={divergence} needs the teacher's full distribution, which a {kind} teacher "
                f"({setting}) gives only as its top-k; use {KIND_SETTINGS['live']} or another divergence")
    return None


def check_teacher(cfg, method) -> None:
    """Refuse, before anything loads and in one line, a method whose declared needs this job's teacher kind
    does not provide (the method x teacher table of the README)."""
    from kdlab.divergences import is_cross_tokenizer

    if not method_needs(method, False):
        return   # no teacher during training (sft)
    why = refusal(cfg.method.name, method, teacher_kind(cfg.teacher), is_cross_tokenizer(cfg.divergence.name),
                  cfg.divergence.name)
    if why:
        raise ConfigError(why)


def check_support(divergence, teacher, vocab: int) -> None:
    """Refuse reverse KL and its limits (divergences computed on the teacher's support only,
    ``Divergence.restrict_to_support``: ``rkl``, ``jsd`` at beta 1, ``srkl`` at skew 0) from a cached or served
    teacher whose top-k is not the whole vocabulary. Renormalised over k < V tokens their gradient is unrelated
    to the full one (README, "Exact or approximate": cosine -0.001 at k = 20, -0.002 at k = 100): the
    student's own mass outside the teacher's top-k, which the full reverse KL pushes down, is invisible. At
    k = V a cache is exact and is allowed. Checked when the cache is opened or the server probed, where k and
    V are known."""
    k = getattr(teacher, "top_k", None)
    if k is None or k >= vocab or not getattr(divergence, "restrict_to_support", False):
        return
    raise ConfigError(
        f"divergence={divergence.name} from a {teacher.kind} teacher's top-{k} of {vocab} tokens trains in a "
        f"direction unrelated to the full one (it cannot see the student's mass outside the top-k); use a live "
        f"teacher (no teacher.cache/serve), a cache with top_k={vocab}, or divergence=fkl")


def teacher_in_memory(cfg, method) -> bool:
    """Whether the job loads the teacher model: a live teacher that the method needs during training (a
    cached or served one stands in otherwise; its evaluation row and the analysis are then skipped)."""
    return teacher_kind(cfg.teacher) == "live" or not method_needs(method, False)


def build_teacher(cfg, model, tokenizer, runtime, train_items):
    """The job's :class:`kdlab.teacher.interface.Teacher`: the live ``model``, the cache checked against this
    job's ``train_items``, or the server checked by its start-up probe."""
    kind = teacher_kind(cfg.teacher)
    if kind == "cached":
        from kdlab.teacher.cached import CachedTeacher
        from kdlab.teacher.topk_cache import open_cache

        return CachedTeacher(open_cache(cfg, tokenizer, train_items))
    if kind == "served":
        from kdlab.teacher.served import connect

        return connect(cfg.teacher.serve, tokenizer)
    from kdlab.teacher.interface import LiveTeacher

    return None if model is None else LiveTeacher(model, len(tokenizer))


def scoring_teacher(cfg, runtime, tokenizer, items):
    """The teacher ``kdlab.cache_teacher`` scores ``items`` with: the server (``teacher.serve.url``), or the model
    loaded here, fine-tuned as a run with this config would (``teacher.finetune``, shared with it)."""
    from kdlab.teacher.finetune import finetuned_teacher
    from kdlab.teacher.interface import LiveTeacher

    if teacher_kind(cfg.teacher) == "served":
        from kdlab.teacher.served import connect

        return connect(cfg.teacher.serve, tokenizer)
    model, tokenizer = load_teacher(cfg.teacher, runtime.dtype)
    model = model.to(runtime.device)
    if cfg.teacher.get("finetune"):
        model = finetuned_teacher(cfg, runtime, model, tokenizer, items)
    return LiveTeacher(model, len(tokenizer))


def load_teacher(cfg, dtype: torch.dtype):
    """Return ``(model, tokenizer)``; the model is frozen (no gradients, eval mode)."""
    tokenizer = load_tokenizer(cfg, "teacher")
    model = load_model(cfg, "teacher", dtype, vocab_size=len(tokenizer))
    return freeze(model), tokenizer


def capability_table(methods: dict) -> str:
    """The README's method x teacher table (markdown) from the methods' declarations: ``methods`` maps each
    method's name to its class. A cell is ``yes`` or ``no: <the capability that kind lacks>``."""
    def cell(name, method, kind, cross):
        needs = method_needs(method, cross)
        if isinstance(needs, str):
            return "no: not across tokenizers"
        missing = lacking(needs, kind)
        return f"no: {missing[-1]}" if missing else "yes"

    kinds = ("live", "cached", "served")
    lines = ["| method | " + " | ".join(kinds) + " | " + " | ".join(f"{k}, across tokenizers" for k in kinds) + " |",
             "|---" * 7 + "|"]
    for name, method in sorted(methods.items()):
        cells = [cell(name, method, k, cross) for cross in (False, True) for k in kinds]
        lines.append(f"| `{name}` | " + " | ".join(cells) + " |")
    return "\n".join(lines)
