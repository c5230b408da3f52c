"""A cached teacher: its top-k log-probs at the response positions of a training set, on disk.

Built once by ``python -m kdlab.cache_teacher`` (:func:`build_cache`), read by training runs with
``teacher.cache=<folder>`` (:class:`TeacherCache`), which then hold no teacher in memory: off-policy
methods (``kd``) distil from the sparse teacher :class:`kdlab.divergences.TopKLogProbs`, i.e. the
teacher's distribution renormalised over its top-k tokens (exact for ``k = V``).

A cache folder ``<cache.out>/<teacher>-<dataset>-k<k>-<hash>`` holds:

- ``values-NNNNN.npy`` ``(rows, k)`` float16/float32: ``log softmax`` of the teacher's top-k logits
  renormalised over the k entries (``topk_logprobs(logits, k, tau=1)``; divergences apply their own
  temperature), and ``indices-NNNNN.npy`` ``(rows, k)`` int32 token ids. Shards are opened with numpy's
  ``mmap_mode="r"``: a run reads only the rows of its batches.
- ``index.json``: ``{example key: [shard, first row, number of rows]}``. An example's key is the SHA-1
  of its token ids (prompt + response + EOS, as :func:`kdlab.data.collate` lays them out) and its rows
  are its response positions in order, the layout of :func:`kdlab.modeling.response_logits`.
- ``manifest.json``: what it was built from (:func:`key_components`: the teacher section without
  ``cache``, the dataset section, the prompt template, a tokenizer fingerprint) plus a hash of all the
  training examples' tokens, k, dtype, counts. The folder name's hash covers the components, k and dtype.

The folder is written under a temporary name and renamed when complete, so a crash never leaves a
partial cache that looks complete; a build first removes the temporaries that killed builds left beside
it (:func:`kdlab.runlock.remove_stale_temporaries`). A run checks the manifest against its own config and
examples and names the first mismatch.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
from pathlib import Path

import numpy as np
import torch

from kdlab import runlock
from kdlab.checkpoint import atomic_dir, read_json
from kdlab.config import ConfigError, content_key, plain
from kdlab.divergences import TopKLogProbs

FORMAT = 1


def _sha1(blob: bytes) -> str:
    return hashlib.sha1(blob).hexdigest()


def example_key(token_ids) -> str:
    return _sha1(np.asarray(token_ids, dtype=np.int64).tobytes())


def item_key(item) -> str:
    return example_key(item.prompt_ids + item.response_ids)


def data_hash(items) -> str:
    """One hash over every training example's tokens, in order."""
    return _sha1("".join(item_key(it) for it in items).encode())


def tokenizer_fingerprint(tokenizer) -> str:
    vocab = sorted(tokenizer.get_vocab().items(), key=lambda kv: kv[1])
    blob = json.dumps([vocab, tokenizer.eos_token_id, tokenizer.pad_token_id,
                       getattr(tokenizer, "chat_template", None)], sort_keys=True)
    return _sha1(blob.encode())[:16]


def key_components(cfg, tokenizer) -> dict:
    """What cached top-k log-probs depend on, from a run's (or ``cache_teacher``'s) config."""
    from kdlab.data import prompt_template

    # where the teacher runs (a server, teacher.serve) is not what it computes: a cache built from a server
    # serves a run of the same teacher
    teacher = {k: v for k, v in plain(cfg.teacher).items() if k not in ("cache", "serve")}
    dataset = dict(plain(cfg.dataset))
    if dataset.get("source", dataset.get("name")) == "synthetic" and dataset.get("data_seed", 0) is None:
        dataset["run_seed"] = cfg.seed   # data_seed: null draws the examples from the run seed
    return {"teacher": teacher, "dataset": dataset, "template": prompt_template(cfg),
            "tokenizer": tokenizer_fingerprint(tokenizer)}


def folder_name(components: dict, top_k: int, dtype: str) -> str:
    digest = content_key([components, top_k, dtype])
    return f"{components['teacher']['name']}-{components['dataset']['name']}-k{top_k}-{digest}"


def _differences(cached, current, prefix: str) -> list[str]:
    if isinstance(cached, dict) and isinstance(current, dict):
        return [d for k in sorted(set(cached) | set(current), key=str)
                for d in _differences(cached.get(k), current.get(k), f"{prefix}.{k}")]
    return [] if cached == current else [f"{prefix}: cache has {cached!r}, this run {current!r}"]


class _ShardWriter:
    def __init__(self, folder: Path, shard_rows: int, dtype: np.dtype):
        self.folder, self.shard_rows, self.dtype = folder, shard_rows, dtype
        self.values, self.indices, self.rows, self.shard = [], [], 0, 0

    def add(self, values: torch.Tensor, indices: torch.Tensor) -> list[int]:
        """Append one example's rows (never split across shards); return [shard, first row, rows]."""
        if self.rows and self.rows + len(values) > self.shard_rows:
            self.flush()
        where = [self.shard, self.rows, len(values)]
        self.values.append(values.float().cpu().numpy().astype(self.dtype))
        self.indices.append(indices.cpu().numpy().astype(np.int32))
        self.rows += len(values)
        return where

    def flush(self) -> None:
        if not self.values:
            return
        np.save(self.folder / f"values-{self.shard:05d}.npy", np.concatenate(self.values))
        np.save(self.folder / f"indices-{self.shard:05d}.npy", np.concatenate(self.indices))
        self.values, self.indices, self.rows, self.shard = [], [], 0, self.shard + 1


@torch.no_grad()
def build_cache(teacher, tokenizer, items, folder: Path, components: dict, *, top_k: int, dtype: str = "float16",
                batch_size: int = 8, shard_rows: int = 262_144, runtime=None, progress: bool = False) -> Path:
    """Run ``teacher`` (a model, or a :class:`kdlab.teacher.interface.Teacher`: live or served) over ``items``
    (:class:`kdlab.data.Encoded`) and write a cache into ``folder``."""
    from kdlab.data import collate
    from kdlab.loggers import progress as progress_bar
    from kdlab.teacher.interface import as_teacher

    vocab = len(tokenizer)
    teacher = as_teacher(teacher, vocab)
    if not 1 <= top_k <= vocab:
        raise ConfigError(f"cache.top_k={top_k} is out of range; the vocabulary has {vocab} tokens: set 1..{vocab}")
    device = (runtime.device if runtime is not None else next(teacher.model.parameters()).device if teacher.model
              else torch.device("cpu"))
    unique = {item_key(it): it for it in items}     # duplicated examples are computed once
    order = sorted(unique, key=lambda k: len(unique[k].prompt_ids) + len(unique[k].response_ids))
    index, total = {}, 0
    folder = Path(folder)
    runlock.remove_stale_temporaries(folder.parent)
    with atomic_dir(folder) as tmp:
        writer = _ShardWriter(tmp, shard_rows, np.dtype(dtype))
        for start in progress_bar(range(0, len(order), batch_size), desc="teacher top-k", disable=not progress):
            keys = order[start: start + batch_size]
            batch = collate([unique[k] for k in keys], tokenizer.pad_token_id).to(device)
            with runtime.autocast() if runtime is not None else contextlib.nullcontext():
                top = teacher.topk(batch, top_k)
            counts = batch.response_mask.sum(dim=1).tolist()
            for key, values, indices in zip(keys, top.values.split(counts), top.indices.split(counts)):
                index[key] = writer.add(values, indices)
            total += sum(counts)
        writer.flush()
        (tmp / "index.json").write_text(json.dumps(index))
        manifest = {"format": FORMAT, "components": components, "data": data_hash(items), "top_k": top_k,
                    "dtype": dtype, "examples": len(items), "unique_examples": len(unique), "rows": total,
                    "shards": writer.shard,
                    "teacher_dtype": str(next(teacher.model.parameters()).dtype) if teacher.model else teacher.kind}
        # written last: a folder with a manifest is complete (and the rename makes it appear at once)
        (tmp / "manifest.json").write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")
    return folder


REBUILD = "rebuild it with `python -m kdlab.cache_teacher teacher=<name> dataset=<name>` and pass the folder it prints"


class TeacherCache:
    """A cache folder opened for reading; :meth:`lookup` gives a batch's teacher targets."""

    def __init__(self, folder):
        self.folder = Path(folder)
        rebuild = REBUILD
        manifest = self.folder / "manifest.json"
        if not manifest.exists():
            raise ConfigError(f"teacher.cache={folder} is not a complete teacher cache (no manifest.json); {rebuild}")
        try:
            self.manifest = read_json(manifest)
        except ValueError as err:
            raise ConfigError(f"teacher.cache={folder}: manifest.json is not valid JSON ({err}); {rebuild}") from None
        lacking = [k for k in ("components", "data", "top_k", "shards")
                   if not isinstance(self.manifest, dict) or k not in self.manifest]
        if lacking:
            raise ConfigError(f"teacher.cache={folder}: manifest.json lacks {', '.join(lacking)}; {rebuild}")
        shards, self.top_k = self.manifest["shards"], self.manifest["top_k"]
        try:
            self.index = read_json(self.folder / "index.json")
        except FileNotFoundError:
            raise ConfigError(f"teacher.cache={folder} has no index.json; {rebuild}") from None
        except ValueError as err:
            raise ConfigError(f"teacher.cache={folder}: index.json is not valid JSON ({err}); {rebuild}") from None
        self.values, self.indices = [], []
        for i in range(shards):
            for kind, out in (("values", self.values), ("indices", self.indices)):
                path = self.folder / f"{kind}-{i:05d}.npy"
                try:
                    out.append(np.load(path, mmap_mode="r"))
                except (OSError, ValueError) as err:   # missing, truncated (mmap longer than the file), not .npy
                    raise ConfigError(f"teacher.cache={folder}: {path.name} is missing or damaged "
                                      f"({type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}); "
                                      f"{rebuild}") from None
            if self.values[i].shape != self.indices[i].shape or self.values[i].shape[1:] != (self.top_k,):
                raise ConfigError(f"teacher.cache={folder}: values-{i:05d}.npy and indices-{i:05d}.npy do not "
                                  f"match the manifest (top_k={self.top_k}); {rebuild}")

    def check(self, components: dict, items) -> None:
        """Raise :class:`ConfigError` naming the first thing this run differs in from the cache's build."""
        for part in ("teacher", "dataset", "template", "tokenizer"):
            diffs = _differences(self.manifest["components"].get(part), components[part], part)
            if diffs:
                shown = "; ".join(diffs[:3]) + ("; ..." if len(diffs) > 3 else "")
                raise ConfigError(f"teacher.cache={self.folder} was built for a different {part} ({shown}); "
                                  f"rebuild it with `python -m kdlab.cache_teacher` and this run's teacher, dataset "
                                  f"and template, or set teacher.cache=null")
        if data_hash(items) != self.manifest["data"]:
            raise ConfigError(f"teacher.cache={self.folder} was built from other training examples than this run's "
                              f"(same config: have the dataset files changed?); rebuild it with "
                              f"`python -m kdlab.cache_teacher`")
        problem = self.index_problem(items)
        if problem:
            raise ConfigError(f"teacher.cache={self.folder}: index.json {problem}; {REBUILD}")

    def index_problem(self, items) -> str | None:
        """What is wrong with ``index.json`` against this run's examples and the shards, or None: every example
        needs an entry with as many rows as it has response tokens, and each shard's entries must tile its rows
        exactly (no gap, no overlap, nothing past the end). An index shifted by a row would otherwise have the
        student trained on its neighbour's rows, silently."""
        if not isinstance(self.index, dict):
            return "is not a JSON object"
        for where in self.index.values():
            if (not isinstance(where, list) or len(where) != 3 or not all(isinstance(v, int) for v in where)
                    or not 0 <= where[0] < len(self.values)):
                return f"has a malformed entry {where!r} (not [shard, first row, rows])"
        for item in items:
            where = self.index.get(item_key(item))
            if where is None:
                return f"has no entry for {len(items) - sum(item_key(it) in self.index for it in items)} of this " \
                       f"run's {len(items)} training examples"
            if where[2] != len(item.response_ids):
                return f"gives {where[2]} rows to an example with {len(item.response_ids)} response tokens"
        spans = sorted(tuple(where) for where in self.index.values())
        for shard in range(len(self.values)):
            end = 0
            for first, rows in [(f, r) for s, f, r in spans if s == shard]:
                if first != end:
                    return f"puts an example at row {first} of shard {shard}, where row {end} is next"
                end += rows
            if end != len(self.values[shard]):
                return f"covers {end} of the {len(self.values[shard])} rows of shard {shard}"
        return None

    def lookup(self, batch) -> TopKLogProbs:
        """The cached top-k ``(N, k)`` at the batch's response positions, row-major like ``response_logits``."""
        lengths = batch.attention_mask.sum(dim=1).tolist()
        counts = batch.response_mask.sum(dim=1).tolist()
        values, indices = [], []
        for ids, length, count in zip(batch.input_ids.cpu().numpy(), lengths, counts):
            where = self.index.get(example_key(ids[:length]))
            if where is None or where[2] != count:
                raise KeyError(f"an example of this batch is not in teacher.cache={self.folder}; rebuild the cache")
            shard, first, rows = where
            values.append(self.values[shard][first: first + rows])
            indices.append(self.indices[shard][first: first + rows])
        device = batch.input_ids.device
        return TopKLogProbs(torch.from_numpy(np.concatenate(values)).to(device, torch.float32),
                            torch.from_numpy(np.concatenate(indices)).to(device, torch.long))


def open_cache(cfg, tokenizer, train_items) -> TeacherCache:
    """The cache named by ``cfg.teacher.cache``, checked against this run's config and examples."""
    cache = TeacherCache(Path(cfg.teacher.cache).expanduser())
    cache.check(key_components(cfg, tokenizer), train_items)
    return cache
