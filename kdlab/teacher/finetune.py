"""Teacher fine-tuning (``teacher.finetune``): MLE on the training split before the method runs.

Every seed paper distils from a teacher first fine-tuned on the task's data: MiniLLM (Gu et al. 2024,
Sec. 3.1) fine-tunes "a large model on the dataset D" as the teacher, OKD (Rao et al., Sec. III-D) uses
"the supervised fine-tuned GPT2-XLarge on Dolly", GKD and DPKD likewise. With ``teacher.finetune`` set,
the loaded teacher is trained exactly as ``method=sft`` trains a student (:class:`kdlab.methods.sft.SFT`,
the mean token NLL of the gold responses, in :class:`kdlab.trainer.Trainer`: AdamW, warm-up + linear
decay, gradient clipping), and the result is what the method distils from, what the ``teacher``
evaluation row measures and what OKD adds its module to. A student cut from the teacher's layers
(``student.init=teacher_layers``) is cut from the teacher as loaded, so it starts where it would without
fine-tuning. No validation runs during fine-tuning: the final weights are published.
``mode: lora`` trains a LoRA adapter (Hu et al. 2022; peft) on the attention's query and value projections
(:func:`kdlab.modeling.lora_config`, the layer OKD's online module uses: on GPT-2 the q and v thirds of
the fused ``c_attn``, k untouched) and merges it into the weights (``merge_and_unload``), so the
published teacher is a plain model either way.

A fine-tuned teacher is computed once and shared, under ``<output_dir>/teachers/``:

- ``<key>/``: the teacher (``save_pretrained`` + tokenizer, float32; ``from_pretrained`` loads it),
  its fine-tuning log ``metrics.jsonl`` and ``finetune.json`` (what it was built from). The folder is
  filled under a temporary name and renamed (:func:`kdlab.checkpoint.atomic_dir`) with
  ``finetune.json`` written last: a folder without it is never used.
- ``<key>.work/``: a fine-tuning in progress, with the trainer's resumable checkpoints; a killed job
  resumes from it (bitwise on CPU) and it is removed once the teacher is published.
- ``<key>.lock``: held (``fcntl.flock``) by the job fine-tuning; concurrent jobs of a sweep block on it
  and then load the published teacher instead of training it again.

A kill while a teacher is published leaves ``.<key>.*.tmp``, a full copy of it: every job that opens the
store removes those no live job is writing (:func:`kdlab.runlock.remove_stale_temporaries`).

The key (:func:`key_components`) covers the teacher section, the completed fine-tuning settings but
``save_every`` (checkpointing does not change the result), the training examples' token ids (so the
rows, the prompt template, truncation and the tokenizer), the template and the hardware dtype; not the
method and not the job's seed (``finetune.seed`` seeds the fine-tuning), so every method and seed of
a sweep reuses one teacher.
"""
from __future__ import annotations

import contextlib
import fcntl
import json
import random
import shutil
from pathlib import Path

import torch

from kdlab import runlock
from kdlab.checkpoint import atomic_dir, read_json, recover_dir
from kdlab.config import ConfigError, OneOf, Range, Type, check_section, check_under, content_key, plain
from kdlab.modeling import ModelUnavailable, check_folder, lora_config
from kdlab.trainer import SCHEMA as TRAIN_SCHEMA, check_length

DEFAULTS = {
    "mode": "full",          # full | lora
    "max_steps": None,       # optimizer steps (null: use epochs)
    "epochs": None,
    "batch_size": 8,
    "grad_accum": 1,
    "lr": 5e-5,
    "warmup_ratio": 0.03,
    "schedule": "linear",
    "weight_decay": 0.01,
    "grad_clip": 1.0,
    "save_every": 25,        # resumable checkpoint every N steps (not part of the key)
    "seed": 0,               # the fine-tuning's own seed: the job's seed does not change the teacher
    "lora_rank": 8,          # mode=lora only
    "lora_alpha": 16,
    "lora_dropout": 0.0,
    "target_modules": None,  # null: the architecture's q/v projections (kdlab.modeling.LORA_TARGETS)
}
LORA_KEYS = ("lora_rank", "lora_alpha", "lora_dropout", "target_modules")
SCHEMA = {
    "mode": OneOf("full", "lora"),
    "lr": Range(0, low_open=True),
    **{key: TRAIN_SCHEMA[key] for key in ("max_steps", "epochs", "batch_size", "grad_accum", "warmup_ratio",
                                          "schedule", "weight_decay", "grad_clip", "save_every")},
    "seed": Range(0, integer=True),
    "lora_rank": Range(1, integer=True),
    "lora_alpha": Range(0, low_open=True),
    "lora_dropout": Range(0, 1, high_open=True),
    "target_modules": Type(list, optional=True),
}
COMPLETE = "finetune.json"


def settings(finetune) -> dict:
    """``teacher.finetune`` completed with :data:`DEFAULTS` (LoRA keys dropped for ``mode=full``)."""
    out = {**DEFAULTS, **plain(finetune)}
    return {k: v for k, v in out.items() if out["mode"] == "lora" or k not in LORA_KEYS}


def validate_finetune(key: str, value) -> None:
    """The ``teacher.finetune`` check of :data:`kdlab.teacher.SCHEMA`."""
    if value is None:
        return
    if not isinstance(plain(value), dict):
        raise ConfigError(f"{key}={value!r} is neither null nor a mapping; set {key}=null or "
                          f"{key}={{max_steps:150,lr:5e-5}}")
    check_section(key, {**DEFAULTS, **plain(value)}, SCHEMA, ignore=())
    s = settings(value)
    check_length(key, s["max_steps"], s["epochs"])
    if s["batch_size"] % s["grad_accum"]:
        raise ConfigError(f"{key}.batch_size={s['batch_size']} is not divisible by {key}.grad_accum="
                          f"{s['grad_accum']}; make batch_size a multiple of grad_accum")


def key_components(cfg, train_items) -> dict:
    """What a fine-tuned teacher depends on (and nothing it does not: no method, no job seed)."""
    from kdlab.data import prompt_template
    from kdlab.teacher.topk_cache import data_hash

    teacher = {k: v for k, v in plain(cfg.teacher).items() if k not in ("cache", "finetune")}
    finetune = {k: v for k, v in settings(cfg.teacher.finetune).items() if k != "save_every"}
    if finetune["mode"] == "lora":
        # the q/v-only GPT-2 layer replaced one on all of q, k and v: teachers built before it are not reused
        finetune["lora_layer"] = "query-value"
    return {"teacher": teacher, "finetune": finetune, "template": prompt_template(cfg),
            "data": data_hash(train_items), "examples": len(train_items), "dtype": cfg.hardware.get("dtype")}


def teacher_key(cfg, train_items) -> str:
    return f"{cfg.teacher.name}-{cfg.dataset.name}-{content_key(key_components(cfg, train_items))}"


@contextlib.contextmanager
def _preserved_rng():
    """Fine-tuning (or not, when the teacher is reused) leaves the job's RNG streams as they were, so
    what is built after it (OKD's module, say) does not depend on whether this job trained the teacher."""
    state = random.getstate()
    with torch.random.fork_rng(devices=[torch.cuda.current_device()] if torch.cuda.is_available() else []):
        yield
    random.setstate(state)


@contextlib.contextmanager
def _locked(path: Path, what: str):
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            print(f"kdlab: waiting for {path} (another job is building {what})", flush=True)
            fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _train(cfg, runtime, teacher, tokenizer, train_items, work: Path):
    """Fine-tune ``teacher`` in ``work`` (resuming its checkpoint) with the SFT method; return the model."""
    from omegaconf import OmegaConf

    from kdlab.hardware import seed_everything
    from kdlab.loggers import JsonlSink, Logger
    from kdlab.methods.base import Context
    from kdlab.methods.sft import SFT
    from kdlab.trainer import Trainer

    s = settings(cfg.teacher.finetune)
    train_keys = ("max_steps", "epochs", "batch_size", "grad_accum", "warmup_ratio", "schedule", "weight_decay",
                  "grad_clip", "save_every")
    job = OmegaConf.create({
        "train": {**{k: s[k] for k in train_keys}, "log_every": 10, "eval_every": None, "valid_examples": None,
                  "select_best": False},
        "eval": plain(cfg.eval), "seed": s["seed"]})
    seed_everything(s["seed"])
    # float32 master weights, as students train (nn.Module's own cast: transformers refuses .float() on a
    # model loaded from GGUF, which kdlab has already dequantised)
    model = torch.nn.Module.float(teacher).train()
    peft_model = None
    if s["mode"] == "lora":
        from peft import get_peft_model

        peft_model = get_peft_model(model, lora_config(model, s["target_modules"], "teacher.finetune.target_modules",
                                                       rank=s["lora_rank"], alpha=s["lora_alpha"],
                                                       dropout=s["lora_dropout"]))
        model = peft_model.base_model.model   # the causal LM with the adapter injected (response_logits' interface)
    else:
        model.requires_grad_(True)
    method = SFT(OmegaConf.create({"name": "sft", "lr": s["lr"]}),
                 Context(teacher=None, student=model, tokenizer=tokenizer, divergence=None, runtime=runtime,
                         train_cfg=job.train))
    work.mkdir(parents=True, exist_ok=True)
    logger = Logger([JsonlSink(work)])
    info = Trainer(method, train_items, [], job, runtime, logger, work, tokenizer).fit()
    logger.finish()
    if peft_model is not None:
        model = peft_model.merge_and_unload()
    return model, info


def published(folder: Path, trust_remote_code: bool) -> float:
    """The training time recorded in a published teacher's ``finetune.json``, once the folder is checked: a
    damaged one is one line naming the folder to delete (it is rebuilt), not a loader's message about a
    ``teacher.path`` the user never set."""
    try:
        check_folder(folder, str(folder), trust_remote_code=trust_remote_code, trust_key="teacher.trust_remote_code")
        return float(read_json(folder / COMPLETE)["train_time_s"])
    except (ModelUnavailable, ValueError, KeyError, TypeError) as err:
        what = str(err).rsplit("; ", 1)[0] if isinstance(err, ModelUnavailable) else (
            f"{folder / COMPLETE} is damaged ({type(err).__name__}: {str(err)[:80]})")
        raise ConfigError(f"teacher.finetune: the fine-tuned teacher does not load: {what}; delete {folder} and run "
                          f"again to fine-tune it anew") from None


def finetuned_teacher(cfg, runtime, teacher, tokenizer, train_items):
    """The teacher fine-tuned on ``train_items`` per ``cfg.teacher.finetune``, frozen, on the runtime's
    device in the teacher's dtype: loaded from ``<output_dir>/teachers/<key>/`` (trained there first, under
    the lock, if no job has published it). ``teacher`` is the loaded teacher; it is trained in place."""
    from omegaconf import OmegaConf

    from kdlab.data import check_batch_size
    from kdlab.modeling import freeze, load_model

    if runtime.strategy == "zero3":   # the teacher is already sharded when the hook runs
        raise ConfigError("teacher.finetune does not work with hardware=zero3 (the teacher is sharded); build the "
                          "teacher with hardware=zero2 or ddp once (same output_dir), then pass teacher.path="
                          "<output_dir>/teachers/<key> and teacher.finetune=null")
    root = Path(cfg.output_dir).expanduser() / "teachers"
    key = teacher_key(cfg, train_items)
    folder, work = check_under(root, root / key, "teacher.finetune"), root / f"{key}.work"
    with _preserved_rng():
        if runtime.is_main:
            runlock.remove_stale_temporaries(root)
        if not (folder / COMPLETE).exists():
            if runtime.world_size > 1:
                raise ConfigError(f"teacher.finetune: {folder} is not built yet and fine-tuning runs in one "
                                  f"process; run this job once without hardware={runtime.strategy} (same "
                                  f"output_dir) to build it, then launch the distributed job, which loads it")
            with _locked(root / f"{key}.lock", f"the fine-tuned teacher {cfg.teacher.name}"):
                recover_dir(folder)
                if not (folder / COMPLETE).exists():
                    check_batch_size(settings(cfg.teacher.finetune)["batch_size"], len(train_items),
                                     f"{len(train_items)} usable examples", key="teacher.finetune.batch_size")
                    print(f"kdlab: fine-tuning teacher {cfg.teacher.name} on {len(train_items)} training examples "
                          f"-> {folder}", flush=True)
                    model, info = _train(cfg, runtime, teacher, tokenizer, train_items, work)
                    with atomic_dir(folder) as tmp:
                        model.save_pretrained(tmp, safe_serialization=True)
                        tokenizer.save_pretrained(tmp)
                        shutil.copy(work / "metrics.jsonl", tmp / "metrics.jsonl")
                        (tmp / COMPLETE).write_text(json.dumps(
                            {"key": key, "components": key_components(cfg, train_items),
                             "train_time_s": info["train_time_s"]}, indent=2, sort_keys=True) + "\n")
                    shutil.rmtree(work, ignore_errors=True)
                    del model
        train_time = published(folder, cfg.teacher.trust_remote_code)
        print(f"kdlab: teacher {cfg.teacher.name} fine-tuned: {folder} ({train_time:.0f} s of training)", flush=True)
        del teacher
        spec = dict(plain(cfg.teacher), path=str(folder), gguf_file=None, revision=None)
        model = load_model(OmegaConf.create(spec), "teacher", runtime.dtype, vocab_size=len(tokenizer))
    return freeze(model).to(runtime.device)
