"""Prompts, tokenisation and batches.

Tokenisation follows MiniLLM (LMOps ``process_data_dolly.py``):
``prompt_ids = encode(prompt)``, ``response_ids = encode(prompt + output)[len(prompt_ids):] + [eos]``
(encoding prompt and response together keeps the tokens a tokenizer would merge across the
boundary), without special tokens. Examples whose prompt is longer than ``max_prompt_length`` are
dropped (as LMOps does); responses are cut so that prompt + response fits ``max_length`` (the EOS is
kept when the cut response still has room for it, otherwise the response simply ends at the limit).

Each set is encoded with its own dataset config's limits (:func:`encode_sets`: the training splits with
``dataset``'s, every ``eval.datasets`` entry with its own), and what the limits cost is counted: rows
``dropped`` (prompt too long) and ``truncated`` (response cut, its EOS included), kept in
``results.json`` under ``data`` and said once on the console.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from kdlab.config import ConfigError
from kdlab.data.sources import (eval_datasets, load_splits, load_test_sets,  # noqa: F401  (the group's entry points)
                                validate_dataset)

ALPACA = ("Below is an instruction that describes a task. Write a response that appropriately completes "
          "the request.\n\n### Instruction:\n{instruction}\n\n### Response:\n")
ALPACA_INPUT = ("Below is an instruction that describes a task, paired with an input that provides further "
                "context. Write a response that appropriately completes the request.\n\n### Instruction:\n"
                "{instruction}\n\n### Input:\n{input}\n\n### Response:\n")


def format_prompt(example: dict, template: str, tokenizer=None) -> str:
    """The Alpaca/MiniLLM prompt, or the tokenizer's chat template with one user turn."""
    instruction, context = example["instruction"], example.get("input") or ""
    if template == "alpaca":
        return (ALPACA_INPUT if context else ALPACA).format(instruction=instruction, input=context)
    user = f"{instruction}\n\n{context}" if context else instruction
    return tokenizer.apply_chat_template([{"role": "user", "content": user}], tokenize=False,
                                         add_generation_prompt=True)


def prompt_template(cfg) -> str:
    """The student side's template: ``dataset.template``, or with ``auto`` the teacher's (the two share a
    tokenizer), or across tokenizers (divergence=uld) the student's own; the teacher then renders its own
    (:mod:`kdlab.alignment`). ``cfg`` may lack a divergence section (``kdlab.cache_teacher``)."""
    from kdlab.divergences import is_cross_tokenizer

    cross = "divergence" in cfg and is_cross_tokenizer(cfg.divergence.name)
    own = cfg.student if cross else cfg.teacher
    return own.template if cfg.dataset.template == "auto" else cfg.dataset.template


@dataclass
class Encoded:
    prompt_ids: list[int]
    response_ids: list[int]
    example: dict


def encode_counted(examples: list[dict], tokenizer, template: str, max_prompt_length: int,
                   max_length: int) -> tuple[list[Encoded], dict]:
    """:func:`encode`, and a count of what the limits cost: ``{rows, kept, dropped, truncated,
    max_prompt_length, max_length}``."""
    if template == "chat" and not getattr(tokenizer, "chat_template", None):
        raise ConfigError("the prompt template is chat (dataset.template=chat, or dataset.template=auto and the "
                          "model's template: chat), but the model's tokenizer has no chat template; set "
                          "dataset.template=alpaca")
    out, truncated = [], 0
    for ex in examples:
        prompt = format_prompt(ex, template, tokenizer)
        prompt_ids = tokenizer.encode(prompt, add_special_tokens=False)
        if len(prompt_ids) > max_prompt_length:
            continue
        full = tokenizer.encode(prompt + ex["output"], add_special_tokens=False)
        response = full[len(prompt_ids):] + [tokenizer.eos_token_id]
        room = max_length - len(prompt_ids)
        truncated += len(response) > room
        out.append(Encoded(prompt_ids, response[:room], ex))
    counts = {"rows": len(examples), "kept": len(out), "dropped": len(examples) - len(out), "truncated": truncated,
              "max_prompt_length": max_prompt_length, "max_length": max_length}
    return out, counts


def encode(examples: list[dict], tokenizer, template: str, max_prompt_length: int, max_length: int) -> list[Encoded]:
    return encode_counted(examples, tokenizer, template, max_prompt_length, max_length)[0]


def counts_note(name: str, counts: dict, key: str) -> str | None:
    """One console line for a set that lost rows or response tokens to its limits (None if none)."""
    lost = []
    if counts["dropped"]:
        lost.append(f"{counts['dropped']} of {counts['rows']} rows dropped (prompt over "
                    f"{key}.max_prompt_length={counts['max_prompt_length']} tokens)")
    if counts["truncated"]:
        lost.append(f"{counts['truncated']} of {counts['kept']} responses truncated at "
                    f"{key}.max_length={counts['max_length']} tokens")
    return f"kdlab: {name}: {', '.join(lost)}" if lost else None


def check_batch_size(batch_size: int, usable: int, what: str, key: str = "train.batch_size") -> None:
    """A training set smaller than one batch (of ``key``) can make no optimizer step: say so before any
    evaluation."""
    if usable < batch_size:
        raise ConfigError(f"{key}={batch_size} is larger than the training set ({what}); lower "
                          f"{key} to at most {usable} or add training data")


def encode_sets(cfg, tokenizer, splits: dict | None, test_sets: dict,
                auto_template: str | None = None) -> tuple[dict, dict, list[str]]:
    """Encode a job's sets, each with its own dataset config's limits and template (``auto``: the
    ``auto_template``, by default the teacher's; across tokenizers each side renders its own).

    ``splits``: the training dataset's ``{split: rows}`` (train and valid are used; None for an
    evaluation-only job); ``test_sets``: ``{name: (rows, dataset config)}``. Returns ``(items, counts, notes)``: ``items`` has ``train``,
    ``valid`` and ``test`` (``{name: [Encoded]}``, the first ``eval.test_examples`` rows), ``counts`` the
    same layout of :func:`encode_counted` counts (for results.json), ``notes`` the console lines of
    :func:`counts_note`. A set left empty is a :class:`ConfigError`, and so is a training set smaller
    than ``train.batch_size``.
    """
    def one(name, rows, dcfg, key, cap=None):
        template = (auto_template or cfg.teacher.template) if dcfg.get("template", "auto") == "auto" else dcfg["template"]
        items, counts = encode_counted(rows[:cap] if cap else rows, tokenizer, template,
                                       dcfg["max_prompt_length"], dcfg["max_length"])
        if not items:
            raise ConfigError(f"every {name} prompt is longer than {key}.max_prompt_length="
                              f"{dcfg['max_prompt_length']} tokens; raise {key}.max_prompt_length")
        notes.append(counts_note(name, counts, key))
        return items, counts

    notes = []
    items, counts = {"test": {}}, {"test": {}}
    if splits is not None:
        items["train"], counts["train"] = one("train", splits["train"], cfg.dataset, "dataset")
        dropped = f", {counts['train']['dropped']} dropped" if counts["train"]["dropped"] else ""
        check_batch_size(cfg.train.batch_size, len(items["train"]),
                         f"{len(items['train'])} usable examples of {len(splits['train'])} rows{dropped}")
        items["valid"], counts["valid"] = one("valid", splits["valid"], cfg.dataset, "dataset",
                                              cfg.train.valid_examples)
    for name, (rows, dcfg) in test_sets.items():
        key = "dataset" if dcfg is cfg.dataset else f"eval.datasets.{name}"
        items["test"][name], counts["test"][name] = one(f"test {name}", rows, dcfg, key, cfg.eval.test_examples)
    return items, counts, [n for n in notes if n]


def eval_dataset_cfgs(cfg) -> dict:
    """The job's test sets as dataset configs: the training dataset's test split plus every
    ``eval.datasets`` entry (:func:`kdlab.data.sources.eval_datasets`), by name."""
    return {cfg.dataset.name: cfg.dataset, **eval_datasets(cfg.eval.datasets, cfg.dataset)}


def load_training_splits(cfg) -> dict:
    """The ``dataset`` group's train, valid and test rows (all three required), checked against
    ``train.batch_size``."""
    splits = load_splits(cfg.dataset, cfg.seed)
    for split in ("train", "valid", "test"):
        if not splits.get(split):
            raise ConfigError(f"dataset={cfg.dataset.name} has no {split} split; training needs train, valid and "
                              f"test (e.g. dataset=dolly dataset.path=../shared/data/dolly-1k)")
    check_batch_size(cfg.train.batch_size, len(splits["train"]), f"{len(splits['train'])} rows")
    return splits


@dataclass
class JobSets:
    """A job's encoded sets. Across tokenizers the teacher is fine-tuned and evaluated on its own
    tokenization and template (``teacher_train``, ``teacher_test``); otherwise those are the student's."""
    train: list[Encoded] | None
    valid: list[Encoded] | None
    test: dict[str, list[Encoded]]
    counts: dict                      # results.json's ``data``: what each set's limits cost
    teacher_train: list[Encoded] | None = None
    teacher_test: dict[str, list[Encoded]] | None = None


def encode_job_sets(cfg, tokenizer, teacher_tokenizer, splits: dict | None, test_sets: dict, cross: bool,
                    say: bool = True) -> JobSets:
    """:func:`encode_sets` for the student side (``splits=None``: test sets only) and, across tokenizers
    (``cross``), the teacher side; a set that lost rows to its limits is said once when ``say``."""
    template = (cfg.student if cross else cfg.teacher).template
    items, counts, notes = encode_sets(cfg, tokenizer, splits, test_sets, template)
    if say and notes:
        print("\n".join(notes))
    sets = JobSets(items.get("train"), items.get("valid"), items["test"], counts, items.get("train"), items["test"])
    if cross:
        teacher_items = encode_sets(cfg, teacher_tokenizer, splits if cfg.teacher.get("finetune") else None,
                                    test_sets, cfg.teacher.template)[0]
        sets.teacher_train, sets.teacher_test = teacher_items.get("train"), teacher_items["test"]
    return sets


@dataclass
class Batch:
    """A training batch; see docs/DESIGN.md for the meaning of each field."""
    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    labels: torch.Tensor
    response_mask: torch.Tensor
    prompt_ids: torch.Tensor
    prompt_mask: torch.Tensor
    examples: list[dict] = field(default_factory=list)

    def to(self, device) -> "Batch":
        tensors = {k: v.to(device) for k, v in vars(self).items() if isinstance(v, torch.Tensor)}
        return Batch(**tensors, examples=self.examples)

    def __len__(self) -> int:
        return self.input_ids.shape[0]


def left_pad(seqs: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for i, s in enumerate(seqs):
        if s:
            ids[i, width - len(s):] = torch.tensor(s)
            mask[i, width - len(s):] = 1
    return ids, mask


def collate(items: list[Encoded], pad_id: int) -> Batch:
    seqs = [it.prompt_ids + it.response_ids for it in items]
    width = max(len(s) for s in seqs)
    input_ids = torch.full((len(items), width), pad_id, dtype=torch.long)
    attention_mask = torch.zeros_like(input_ids)
    labels = torch.full_like(input_ids, -100)
    for i, (it, s) in enumerate(zip(items, seqs)):
        input_ids[i, : len(s)] = torch.tensor(s)
        attention_mask[i, : len(s)] = 1
        start = len(it.prompt_ids)
        # position t predicts token t + 1: the response tokens are predicted from start - 1 on
        labels[i, start - 1: len(s) - 1] = torch.tensor(it.response_ids)
    prompt_ids, prompt_mask = left_pad([it.prompt_ids for it in items], pad_id)
    return Batch(input_ids, attention_mask, labels, labels != -100, prompt_ids, prompt_mask,
                 [it.example for it in items])


def epoch_order(n: int, seed: int, epoch: int) -> list[int]:
    """The example order of one epoch: a permutation fixed by (seed, epoch), so a resumed run sees the
    same batches as an uninterrupted one."""
    g = torch.Generator().manual_seed(seed * 100_003 + epoch)
    return torch.randperm(n, generator=g).tolist()


def batches(items: list[Encoded], batch_size: int, pad_id: int, seed: int, start_epoch: int = 0,
            start_batch: int = 0):
    """Yield ``(epoch, index_in_epoch, Batch)`` forever, from a given position; the last partial batch
    of an epoch is dropped so every optimizer step sees the same number of sequences."""
    per_epoch = len(items) // batch_size
    if per_epoch == 0:
        raise ValueError(f"the training split has {len(items)} usable examples, fewer than "
                         f"train.batch_size={batch_size}; lower train.batch_size or add data")
    epoch, index = start_epoch, start_batch
    while True:
        order = epoch_order(len(items), seed, epoch)
        while index < per_epoch:
            chosen = [items[j] for j in order[index * batch_size: (index + 1) * batch_size]]
            yield epoch, index, collate(chosen, pad_id)
            index += 1
        epoch, index = epoch + 1, 0
