"""Where examples come from: ``load_splits(cfg.dataset, seed) -> {split: [example, ...]}``.

An example is ``{"id", "instruction", "input", "output"}`` plus, where the source has several gold
responses, ``references`` (ROUGE-L is the maximum over them). ``cfg.source`` picks the loader:

- ``synthetic``: :func:`kdlab.data.synthetic.make_synthetic`. The data are drawn with
  ``cfg.data_seed`` (default 0), not the run seed, so that every training seed sees the same data,
  as papers report seeds; ``data_seed: null`` falls back to the run seed.
- ``dolly``: databricks-dolly-15k. With ``path`` (a folder of ``train/valid/test.jsonl`` in the
  schema of ``shared/data/README.md``) the files present are read; a missing split is simply absent
  (e.g. ``shared/data/dolly`` has no train) and the caller decides whether it needs it. Without
  ``path`` it comes from the Hugging Face hub, by ``split_rule``:
  ``minillm`` (default, ``hub_id: MiniLLM/dolly``): MiniLLM's exact split, ``raw.jsonl[:valid_size]``
  is valid, the rest train, and ``valid.jsonl`` (500 rows) is test (LMOps
  ``tools/process_data_dolly.py``; ``raw.jsonl`` ships pre-shuffled).
  ``shuffle`` (``hub_id: databricks/databricks-dolly-15k``): the original file, shuffled with
  ``random.Random(split_seed)``, then ``valid_size`` valid, ``test_size`` test, the rest train. This
  does not reproduce MiniLLM's rows; use ``minillm`` or ``path=`` for comparable numbers.
- ``vicuna``, ``selfinst``, ``sni``, ``unni``: eval-only, ``{"test": [...]}``, from a local jsonl
  ``path`` or from ``hub_file`` of ``hub_id`` (MiniLLM's hub copies).
- ``jsonl``: any local folder of ``train/valid/test.jsonl`` or a single file (read as ``file_split``).

Hub files are fetched with ``huggingface_hub.hf_hub_download`` (a dependency of transformers; the
``datasets`` package is not needed) and read as plain jsonl. The local cache is tried first; with
``HF_HUB_OFFLINE=1`` or no network a missing file is a one-line :class:`ConfigError` naming the fix.

``min_response_words`` keeps only examples whose ``output`` has at least that many
whitespace-separated words (MiniLLM's paper evaluates S-NI/UnNI on responses of length >= 11). Note
that MiniLLM's own S-NI/UnNI eval files are already its ``[11, +inf)`` bucket measured in tokens,
not words, so a word filter on them removes rows MiniLLM scored: it keeps 1183 of the 1694 rows of
``shared/data/sni/test.jsonl``, and none of the 1050 of ``shared/data/uinst/test.jsonl`` (which is
not the bucket at all). The yaml defaults therefore leave it ``null``.

Relative paths are resolved against the directory kdlab was launched from (Hydra runs with
``hydra.job.chdir=False``; when Hydra is active its original cwd is used either way).
``max_examples`` (an int for every split, or ``{split: int}``) keeps the first rows of each split
(synthetic data are drawn at the capped size instead, see :func:`_capped_sizes`).

A malformed row (not UTF-8, not JSON, not an object, no string ``instruction`` or ``output``) is a
one-line :class:`ConfigError` naming the file and the line, raised while the data are read, before any
model loads. :func:`eval_datasets` turns ``eval.datasets`` (names, or a mapping of dataset keys) into
dataset configs.
"""
from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

from kdlab import network
from kdlab.config import ConfigError, OneOf, Range, Type, check_name, check_section, plain
from kdlab.data.synthetic import FAMILIES, LEVELS, SPLITS, make_synthetic

CONF_DIR = Path(__file__).resolve().parents[2] / "conf"

EVAL_ONLY = ("vicuna", "selfinst", "sni", "unni")
SOURCES = ("synthetic", "dolly", "jsonl", *EVAL_ONLY)


# --- schemas ------------------------------------------------------------------------------------
def _sizes(key: str, value: Any) -> None:
    if not isinstance(value, dict) or not value:
        raise ConfigError(f"{key}={value!r} must be a mapping like {{train: 2000, valid: 100, test: 100}}")
    for split, n in value.items():
        if split not in SPLITS:
            raise ConfigError(f"{key}.{split} is not a split; valid splits: {', '.join(SPLITS)}")
        Range(0, integer=True)(f"{key}.{split}", n)


def _max_examples(key: str, value: Any) -> None:
    if isinstance(value, dict):
        for split, n in value.items():
            if split not in SPLITS:
                raise ConfigError(f"{key}.{split} is not a split; valid splits: {', '.join(SPLITS)}")
            Range(1, integer=True, optional=True)(f"{key}.{split}", n)
    else:
        Range(1, integer=True, optional=True)(key, value)


def _families(key: str, value: Any) -> None:
    if value is None:
        return
    if not isinstance(value, list) or not value or any(f not in FAMILIES for f in value):
        raise ConfigError(f"{key}={value!r} is not valid; use null (all) or a list from: {', '.join(sorted(FAMILIES))}")


def _levels(key: str, value: Any) -> None:
    if not isinstance(value, list) or not value or any(lv not in LEVELS for lv in value):
        raise ConfigError(f"{key}={value!r} is not valid; use a non-empty list from: {', '.join(map(str, LEVELS))}")


COMMON = {
    "source": OneOf(*SOURCES),
    "template": OneOf("auto", "alpaca", "chat"),
    "max_prompt_length": Range(1, integer=True),
    "max_length": Range(2, integer=True),
    "max_examples": _max_examples,
}
_PATH = Type(str, optional=True)
_HUB = {"path": _PATH, "hub_id": Type(str, optional=True), "hub_file": Type(str, optional=True)}
_FILTER = {"min_response_words": Range(1, integer=True, optional=True)}
SCHEMAS = {
    "synthetic": {**COMMON, "data_seed": Range(0, integer=True, optional=True), "sizes": _sizes,
                  "families": _families, "levels": _levels},
    "dolly": {**COMMON, **_HUB, **_FILTER, "split_rule": OneOf("minillm", "shuffle"),
              "split_seed": Range(0, integer=True), "valid_size": Range(0, integer=True),
              "test_size": Range(0, integer=True)},
    "jsonl": {**COMMON, **_FILTER, "path": _PATH, "file_split": OneOf(*SPLITS)},
    **{name: {**COMMON, **_HUB, **_FILTER} for name in EVAL_ONLY},
}


def _as_dict(cfg: Any) -> dict:
    if isinstance(cfg, dict):
        return dict(cfg)
    from omegaconf import OmegaConf  # only when called with a Hydra/OmegaConf config

    return OmegaConf.to_container(cfg, resolve=True)


def validate_dataset(cfg: Any, prefix: str = "dataset") -> dict:
    """Check ``cfg`` (the ``dataset`` group, or an ``eval.datasets`` entry named by ``prefix``) against its
    source's schema; returns it as a dict."""
    cfg = _as_dict(cfg)
    source = cfg.get("source", cfg.get("name"))
    OneOf(*SOURCES)(f"{prefix}.source", source)
    check_name(f"{prefix}.name", cfg.get("name"))
    check_section(prefix, cfg, SCHEMAS[source])
    if cfg.get("max_prompt_length", 0) >= cfg.get("max_length", 1):
        raise ConfigError(f"{prefix}.max_prompt_length={cfg['max_prompt_length']} must be below "
                          f"{prefix}.max_length={cfg['max_length']}; raise max_length or lower max_prompt_length")
    if source == "jsonl" and not cfg.get("path"):
        raise ConfigError(f"{prefix}.path is not set; a jsonl dataset needs {prefix}.path=<folder or .jsonl file>")
    return cfg


def eval_datasets(entries: Any, train: Any, conf_dir: Path = CONF_DIR) -> dict[str, dict]:
    """The ``eval.datasets`` entries as full dataset configs, each validated, by name.

    ``entries`` is a list of names (``[sni, unni]``: conf/dataset/<name>.yaml as it is) or a mapping
    ``{name: {key: value, ...}}`` whose values (``path=``, ``max_prompt_length=``, any dataset key;
    null for none) are merged over conf/dataset/<source>.yaml, ``source`` defaulting to the name (so
    ``{mine: {source: jsonl, path: x.jsonl}}`` adds a local file under its own name). An entry named
    like the training dataset (``train``, the ``dataset`` group) is that dataset, with the user's
    overrides, unless the mapping gives it keys of its own.
    """
    entries = plain(entries) or {}
    train = _as_dict(train)
    if isinstance(entries, list):
        entries = {name: None for name in entries}
    out = {}
    for name, overrides in entries.items():
        key = f"eval.datasets.{name}"
        if overrides is not None and not isinstance(overrides, dict):
            raise ConfigError(f"{key}={overrides!r} is not a mapping; give dataset keys, e.g. "
                              f"eval.datasets.{name}.path=<file>, or list names: eval.datasets=[{name}]")
        if name == train.get("name") and not overrides:
            continue   # the training dataset's test split is evaluated anyway, with the user's overrides
        source = (overrides or {}).get("source", name)
        path = Path(conf_dir) / "dataset" / f"{source}.yaml"
        if not isinstance(source, str) or not path.exists():
            valid = ", ".join(sorted(p.stem for p in path.parent.glob("*.yaml")))
            raise ConfigError(f"{key}: {source!r} is not a dataset; use one of {valid}, or a mapping entry "
                              f"with source=jsonl and path=<file>")
        from omegaconf import OmegaConf

        base = OmegaConf.to_container(OmegaConf.load(path), resolve=True)
        out[name] = validate_dataset({**base, **(overrides or {}), "name": name}, key)
    return out

# --- reading ------------------------------------------------------------------------------------
def _resolve(path: str) -> Path:
    p = Path(path).expanduser()
    if p.is_absolute():
        return p
    try:
        from hydra.core.hydra_config import HydraConfig

        base = Path(HydraConfig.get().runtime.cwd) if HydraConfig.initialized() else Path.cwd()
    except ImportError:
        base = Path.cwd()
    return base / p


def _string_field(value: Any, field: str, where: str, fix: str) -> str:
    if not isinstance(value, str):
        what = (f"has no \"{field}\"" if value is None
                else f"has an \"{field}\" of type {type(value).__name__}, not a string")
        raise ConfigError(f"{where}: the row {what}; {fix}")
    return value


def _normalise(row: dict, name: str, split: str, index: int, where: str) -> dict:
    """Map a row of any known layout onto the example schema; ``where`` ("<file> line <n>") names the
    row in the one-line error a malformed one gets.

    Layouts: ours (``shared/data``: ``meta.references``), MiniLLM's (``output`` may be a list of
    references, ``input`` may be absent) and databricks' (``context``, ``response``).
    """
    fix = 'every row needs "instruction" and "output" strings (MiniLLM: "output" may be a list of strings)'
    instruction = _string_field(row.get("instruction"), "instruction", where, fix)
    output = row.get("output", row.get("response"))
    refs = (row.get("meta") or {}).get("references") or row.get("references")
    if isinstance(output, list) and output and all(isinstance(o, str) for o in output):
        refs, output = output, output[0]
    _string_field(output, "output", where, fix)
    context = row.get("input", row.get("context")) or ""
    if not isinstance(context, str):
        raise ConfigError(f"{where}: the row has an \"input\" of type {type(context).__name__}, not a string; "
                          f"give a string or leave it out")
    if refs and (not isinstance(refs, list) or not all(isinstance(r, str) for r in refs)):
        raise ConfigError(f"{where}: the row's references are not a list of strings; fix or remove them")
    example = {"id": str(row.get("id", f"{name}-{split}-{index:05d}")), "instruction": instruction,
               "input": context, "output": output}
    if refs:
        example["references"] = list(refs)
    return example


def _read_jsonl(path: Path, name: str, split: str) -> list[dict]:
    """The rows of a jsonl file; a line that is not UTF-8, not JSON, not an object or not an example
    is a one-line :class:`ConfigError` naming the file and the line."""
    rows = []
    with open(path, "rb") as f:
        for number, raw in enumerate(f, 1):
            where = f"dataset={name}: {path} line {number}"
            try:
                line = raw.decode("utf-8-sig" if number == 1 else "utf-8")
            except UnicodeDecodeError as err:
                raise ConfigError(f"{where}: not UTF-8 (byte {raw[err.start:err.start + 1]!r} at offset "
                                  f"{err.start}); re-encode the file as UTF-8") from None
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as err:
                raise ConfigError(f"{where}: not JSON ({err.msg} at column {err.colno}); each line must be "
                                  f"one JSON object") from None
            if not isinstance(row, dict):
                kind = {list: "an array", str: "a string"}.get(type(row), type(row).__name__)
                raise ConfigError(f"{where}: a JSON {kind}, not an object; each line must be one JSON object "
                                  f'like {{"instruction": ..., "output": ...}}')
            rows.append(_normalise(row, name, split, len(rows), where))
    return rows


def _read_local(path: str, name: str, file_split: str = "test", key: str = "dataset") -> dict[str, list[dict]]:
    p = _resolve(path)
    if p.is_file():
        return {file_split: _read_jsonl(p, name, file_split)}
    if not p.is_dir():
        raise ConfigError(f"{key}.path={path} does not exist (resolved to {p}); paths are relative "
                          f"to the launch directory")
    splits = {s: _read_jsonl(p / f"{s}.jsonl", name, s) for s in SPLITS if (p / f"{s}.jsonl").is_file()}
    if not splits:
        raise ConfigError(f"{key}.path={path} has none of train.jsonl, valid.jsonl, test.jsonl")
    return splits


def _hub_file(name: str, repo_id: str, filename: str, key: str = "dataset") -> Path:
    """A file of a hub dataset repo: from the local cache, else downloaded (unless offline)."""
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    fix = (f"pre-download it (huggingface-cli download --repo-type dataset {repo_id} {filename}, "
           f"cached under HF_HOME) or set {key}.path= to a local jsonl copy")
    try:
        return Path(hf_hub_download(repo_id, filename, repo_type="dataset", local_files_only=True))
    except LocalEntryNotFoundError as err:
        cached_error = err
    if network.offline():
        raise ConfigError(f"dataset={name}: {repo_id}/{filename} is not in the local hub cache and "
                          f"HF_HUB_OFFLINE is set; {fix}") from cached_error
    if not network.reachable(network.hub_endpoint(), timeout=3.0):
        raise ConfigError(f"dataset={name}: {repo_id}/{filename} is not in the local hub cache and the "
                          f"hub is unreachable; {fix}") from cached_error
    try:
        return Path(hf_hub_download(repo_id, filename, repo_type="dataset", etag_timeout=5))
    except Exception as err:
        reason = f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"
        raise ConfigError(f"dataset={name}: cannot fetch {repo_id}/{filename} from the hub ({reason}); {fix}") from err


def _dolly_hub(cfg: dict) -> dict[str, list[dict]]:
    hub_id = cfg.get("hub_id") or "MiniLLM/dolly"
    if cfg.get("split_rule", "minillm") == "minillm":
        raw = _read_jsonl(_hub_file("dolly", hub_id, cfg.get("hub_file") or "raw.jsonl"), "dolly", "raw")
        n_valid = cfg.get("valid_size", 1000)
        splits = {"train": raw[n_valid:], "valid": raw[:n_valid],
                  "test": _read_jsonl(_hub_file("dolly", hub_id, "valid.jsonl"), "dolly", "test")}
    else:
        raw = _read_jsonl(_hub_file("dolly", hub_id, cfg.get("hub_file") or "databricks-dolly-15k.jsonl"),
                          "dolly", "raw")
        random.Random(cfg.get("split_seed", 0)).shuffle(raw)
        n_valid, n_test = cfg.get("valid_size", 1000), cfg.get("test_size", 500)
        splits = {"train": raw[n_valid + n_test:], "valid": raw[:n_valid], "test": raw[n_valid:n_valid + n_test]}
    for split, rows in splits.items():  # ids that say which split a row was assigned to
        for i, row in enumerate(rows):
            row["id"] = f"dolly-{split}-{i:05d}"
    return splits


def _cap(splits: dict[str, list[dict]], max_examples: Any) -> dict[str, list[dict]]:
    if max_examples is None:
        return splits
    caps = max_examples if isinstance(max_examples, dict) else {s: max_examples for s in splits}
    return {s: rows if caps.get(s) is None else rows[:caps[s]] for s, rows in splits.items()}


def load_test_sets(cfgs: dict, seed: int, train: str) -> dict[str, tuple[list[dict], Any]]:
    """``{name: (test rows, dataset config)}`` for ``{name: dataset config}``, where the set named
    ``train`` is the ``dataset`` group and the others ``eval.datasets`` entries; a set without a test
    split is a :class:`ConfigError`."""
    out = {}
    for name, dcfg in cfgs.items():
        key = "dataset" if name == train else f"eval.datasets.{name}"
        rows = load_splits(dcfg, seed, key).get("test")
        if not rows:
            raise ConfigError(f"dataset {name} has no test split; point it at a test file ({key}.path=<file>)")
        out[name] = (rows, dcfg)
    return out


def _capped_sizes(sizes: dict, max_examples: Any) -> dict:
    """Synthetic data are drawn at the capped sizes (not drawn in full and cut), so that
    ``max_examples: {train: 64}`` gives the rows of ``sizes: {train: 64}``: the smoke experiment caps
    every dataset with ``max_examples`` and the synthetic one stays what it was."""
    if max_examples is None:
        return sizes
    caps = max_examples if isinstance(max_examples, dict) else {s: max_examples for s in sizes}
    return {s: n if caps.get(s) is None else min(n, caps[s]) for s, n in sizes.items()}


def load_splits(cfg: Any, seed: int, key: str = "dataset") -> dict[str, list[dict]]:
    """Examples of ``cfg`` (the ``dataset`` group, or the ``eval.datasets`` entry that errors name by
    ``key``) by split; eval-only sets have only ``test``."""
    cfg = validate_dataset(cfg, key)
    source = cfg.get("source", cfg.get("name"))
    name = cfg.get("name", source)
    if source == "synthetic":
        data_seed = cfg.get("data_seed", 0)
        splits = make_synthetic(seed if data_seed is None else data_seed,
                                _capped_sizes(cfg.get("sizes", {"train": 2000, "valid": 100, "test": 100}),
                                              cfg.get("max_examples")),
                                cfg.get("families"), cfg.get("levels", list(LEVELS)))
    elif source == "jsonl":
        splits = _read_local(cfg["path"], name, cfg.get("file_split", "test"), key)
    elif cfg.get("path"):
        splits = _read_local(cfg["path"], name, key=key)
        if source in EVAL_ONLY:
            if "test" not in splits:
                raise ConfigError(f"{key}.path={cfg['path']} has no test.jsonl; eval-only dataset={name} "
                                  f"reads a test.jsonl or a single .jsonl file")
            splits = {"test": splits["test"]}
    elif source == "dolly":
        splits = _dolly_hub(cfg)
    else:
        if not cfg.get("hub_id") or not cfg.get("hub_file"):
            raise ConfigError(f"dataset={name} has neither {key}.path nor {key}.hub_id and "
                              f"{key}.hub_file; set one")
        splits = {"test": _read_jsonl(_hub_file(name, cfg["hub_id"], cfg["hub_file"], key), name, "test")}

    min_words = cfg.get("min_response_words")
    if min_words:
        splits = {s: [ex for ex in rows if len(ex["output"].split()) >= min_words] for s, rows in splits.items()}
        empty = [s for s, rows in splits.items() if not rows]
        if empty:
            raise ConfigError(f"dataset={name}: no example of split(s) {empty} has an output of "
                              f">= {min_words} words; lower {key}.min_response_words or set it to null")
    return _cap(splits, cfg.get("max_examples"))
