"""The student group: a pretrained checkpoint, a subset of the teacher's layers, the teacher pruned by
measured importance (``init: pruned``, :mod:`kdlab.pruning`), or random init.

``init: teacher_layers`` derives the student from the teacher (as DistilBERT does): the same config
with ``num_layers`` blocks, evenly spaced over the teacher's depth and always including the first and
the last, initialised from those blocks' weights; embeddings, final norm and LM head are copied. The
student shares the teacher's tokenizer.
"""
from __future__ import annotations

import copy
import re
from dataclasses import dataclass

import torch
from torch import nn

from kdlab import distributed
from kdlab.config import ConfigError, OneOf, Range
from kdlab.modeling import (SOURCE_SCHEMA, check_available, check_vocabularies, layer_list, load_config, load_model,
                            load_tokenizer, source_kind, validate_source)
from kdlab.pruning import Shape, pruned_student, settings, target_shape, validate_prune
from kdlab.teacher import load_teacher
from kdlab.teacher.finetune import finetuned_teacher

SCHEMA = {
    **SOURCE_SCHEMA,
    "init": OneOf("pretrained", "teacher_layers", "pruned"),
    "num_layers": Range(1, integer=True, optional=True),
    "prune": validate_prune,
}


def validate_student(cfg) -> None:
    validate_source("student", cfg, SCHEMA)
    if cfg.init == "teacher_layers" and not cfg.get("num_layers"):
        raise ConfigError("student.init=teacher_layers needs student.num_layers; set student.num_layers=<int>")
    if cfg.init == "pruned" and cfg.get("num_layers"):
        raise ConfigError(f"student.num_layers={cfg.num_layers} is for student.init=teacher_layers; a pruned student "
                          f"takes student.prune.num_layers={cfg.num_layers} (and student.num_layers=null)")
    if cfg.init == "pruned" and not cfg.get("prune"):
        raise ConfigError("student.init=pruned needs student.prune, the target shape; set e.g. "
                          "student.prune={num_layers:15}")
    if cfg.init != "pruned" and cfg.get("prune"):
        raise ConfigError(f"student.prune is set but student.init={cfg.init}; set student.init=pruned or "
                          f"student.prune=null")


def kept_layers(num_teacher_layers: int, num_layers: int) -> list[int]:
    if not 1 <= num_layers <= num_teacher_layers:
        raise ConfigError(f"student.num_layers={num_layers} is out of range; the teacher has "
                          f"{num_teacher_layers} layers: set student.num_layers to 1..{num_teacher_layers}")
    if num_layers == 1:
        return [num_teacher_layers - 1]
    step = (num_teacher_layers - 1) / (num_layers - 1)
    return [round(i * step) for i in range(num_layers)]


def student_from_teacher_layers(teacher: nn.Module, num_layers: int) -> nn.Module:
    from transformers import AutoModelForCausalLM

    keep = kept_layers(len(layer_list(teacher)), num_layers)
    config = copy.deepcopy(teacher.config)
    config.num_hidden_layers = num_layers
    if getattr(config, "layer_types", None):
        config.layer_types = [config.layer_types[i] for i in keep]
    student = AutoModelForCausalLM.from_config(config, dtype=next(teacher.parameters()).dtype)
    new_index = {old: new for new, old in enumerate(keep)}
    blocks = re.compile(r"^(.*?\.(?:layers|h)\.)(\d+)\.(.*)$")
    state = {}
    for key, value in teacher.state_dict().items():
        match = blocks.match(key)
        if match is None:
            state[key] = value.clone()
        elif int(match.group(2)) in new_index:
            state[f"{match.group(1)}{new_index[int(match.group(2))]}.{match.group(3)}"] = value.clone()
    student.load_state_dict(state, strict=True)
    return student


def build_student(cfg, teacher: nn.Module, teacher_tokenizer, teacher_name: str, dtype: torch.dtype,
                  own_tokenizer: bool = False):
    """Return ``(model, tokenizer)`` for training; the tokenizer must be the teacher's unless
    ``own_tokenizer`` (a cross-tokenizer divergence, ``divergence=uld``): then it is the student's own."""
    if cfg.init == "teacher_layers":
        return student_from_teacher_layers(teacher, cfg.num_layers).train(), teacher_tokenizer
    if own_tokenizer:
        tokenizer = load_tokenizer(cfg, "student")
        return load_model(cfg, "student", dtype, vocab_size=len(tokenizer)).train(), tokenizer
    # a random student's own tokenizer is the byte-level one (load_tokenizer): one beside a teacher of another
    # vocabulary (student=tiny-bytes) is refused here rather than silently given the teacher's vocabulary
    check_vocabularies(teacher_tokenizer, load_tokenizer(cfg, "student"), teacher_name, cfg.name)
    model = load_model(cfg, "student", dtype, vocab_size=len(teacher_tokenizer))
    return model.train(), teacher_tokenizer


@dataclass
class Models:
    """A job's models, on its device."""
    teacher: nn.Module | None     # None: a cached teacher stands in (teacher.cache), or kdlab.eval needs none
    student: nn.Module | None     # None until :func:`derive_models` prunes it (student.init=pruned)
    tokenizer: object             # the student's: the teacher's too, unless across tokenizers
    teacher_tokenizer: object | None


def load_models(cfg, runtime, *, with_teacher: bool = True, checkpoint: bool = False, cross: bool = False) -> Models:
    """The teacher as loaded (frozen; sharded under ZeRO-3) and the student built from ``cfg.student``, in fp32.

    ``with_teacher=False`` keeps no teacher in memory (``teacher.cache``; ``kdlab.eval`` without a teacher row
    or analysis): it is loaded only to cut a ``teacher_layers`` student from it. ``checkpoint`` (``kdlab.eval``):
    ``student.path`` is a trained student, loaded with its own tokenizer whatever ``student.init`` says
    (without a path, the student is built from its group as in training).
    ``cross``: the student keeps its own tokenizer (a cross-tokenizer divergence). Availability is checked
    first, so a model that is neither cached nor reachable stops the job in seconds.
    """
    pruned = cfg.student.init == "pruned" and not (checkpoint and cfg.student.path)
    cut = cfg.student.init == "teacher_layers" and not (checkpoint and cfg.student.path) or pruned
    if with_teacher or cut:
        check_available(cfg.teacher, "teacher")
    if pruned:   # a shape the teacher cannot give is refused before its weights load
        target_shape(cfg.student.prune, Shape.of(load_config(cfg.teacher, "teacher")))
    if not cut:
        check_available(cfg.student, "student")
    if with_teacher or cut:
        teacher, teacher_tokenizer = load_teacher(cfg.teacher, runtime.dtype)
    else:
        teacher, teacher_tokenizer = None, None if checkpoint else load_tokenizer(cfg.teacher, "teacher")
    if checkpoint and not cut:
        tokenizer = load_tokenizer(cfg.student, "student")
        if teacher_tokenizer is not None:
            check_vocabularies(teacher_tokenizer, tokenizer, cfg.teacher.name, cfg.student.path or cfg.student.name)
        student = load_model(cfg.student, "student", torch.float32, vocab_size=len(tokenizer))
    elif pruned:   # built by derive_models, from the teacher as loaded or fine-tuned
        student, tokenizer = None, teacher_tokenizer
    else:
        student, tokenizer = build_student(cfg.student, teacher, teacher_tokenizer, cfg.teacher.name, torch.float32,
                                           own_tokenizer=cross)
    if not with_teacher and not pruned:
        teacher = None
    elif runtime.strategy == "zero3":
        teacher = distributed.shard_teacher(teacher.to(runtime.device), distributed.teacher_deepspeed_config(
            cfg.hardware.dtype, cfg.train, runtime.world_size))
    else:
        teacher.to(runtime.device)
    return Models(teacher, student and student.to(runtime.device), tokenizer, teacher_tokenizer)


def derive_models(cfg, runtime, models: Models, sets, with_teacher: bool = True) -> Models:
    """The fine-tuned teacher (``teacher.finetune``) and the pruned student (``student.init=pruned``), each
    from the teacher its config names: a pruned student is cut before fine-tuning with ``prune.source:
    teacher``, after it with ``finetuned``. ``with_teacher=False`` (``teacher.cache``): the teacher, loaded only
    to prune from, is dropped at the end."""
    source = settings(cfg.student.prune)["source"] if models.student is None else None
    if source == "teacher":
        models.student = pruned_student(cfg, runtime, models.teacher, models.teacher_tokenizer, sets.train)
    if models.teacher is not None and cfg.teacher.get("finetune") and (with_teacher or source == "finetuned"):
        models.teacher = finetuned_teacher(cfg, runtime, models.teacher, models.teacher_tokenizer, sets.teacher_train)
    if source == "finetuned":
        models.student = pruned_student(cfg, runtime, models.teacher, models.teacher_tokenizer, sets.train)
    if not with_teacher:
        models.teacher = None
    return models


def load_student(folder, runtime, spec) -> nn.Module:
    """A student saved by a job (``student/``, ``student_best/``), in fp32 on ``runtime``'s device, with the
    settings of ``spec`` (the job's ``student`` section) that loading depends on (``trust_remote_code``: a
    custom architecture's code is saved with it)."""
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32,
                                                trust_remote_code=spec.trust_remote_code).to(runtime.device)
