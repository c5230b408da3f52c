"""``python -m kdlab.cache_teacher``: precompute the teacher's top-k log-probs on a training set.

Same config groups as ``kdlab.run`` (``teacher=``, ``dataset=``, ``hardware=``, ``+experiment=``) plus a
``cache:`` section (``conf/cache_teacher.yaml``: ``top_k``, ``dtype``, ``out``, ``batch_size``,
``shard_rows``). Prints the cache folder; train from it with ``teacher.cache=<folder>`` and the same
teacher, dataset and template (checked). Building again with the same settings reuses the folder.
Layout and guarantees: :mod:`kdlab.teacher.topk_cache`.
"""
from __future__ import annotations

from pathlib import Path


from kdlab.config import ConfigError, OneOf, Range, Type, check_section, check_under
from kdlab.cli import main

SCHEMA = {
    "top_k": Range(1, integer=True),
    "dtype": OneOf("float16", "float32"),
    "out": Type(str),
    "batch_size": Range(1, integer=True),
    "shard_rows": Range(1, integer=True),
}


def cache_teacher(cfg) -> Path:
    from kdlab.data import encode, load_splits, prompt_template, validate_dataset
    from kdlab.hardware import setup_runtime, validate_hardware
    from kdlab.modeling import check_available, load_tokenizer
    from kdlab.teacher import scoring_teacher, validate_teacher
    from kdlab.teacher.topk_cache import build_cache, folder_name, key_components

    check_section("cache", cfg.cache, SCHEMA)
    validate_teacher(cfg.teacher)
    validate_dataset(cfg.dataset)
    validate_hardware(cfg.hardware)
    check_available(cfg.teacher, "teacher")
    tokenizer = load_tokenizer(cfg.teacher, "teacher")
    components = key_components(cfg, tokenizer)
    folder = check_under(cfg.cache.out, Path(cfg.cache.out).expanduser() / folder_name(
        components, cfg.cache.top_k, cfg.cache.dtype), "cache.out")
    if (folder / "manifest.json").exists():
        print(f"kdlab: teacher cache already complete: {folder}")
        return folder
    train = load_splits(cfg.dataset, cfg.seed).get("train")
    if not train:
        raise ConfigError(f"dataset={cfg.dataset.name} has no train split to cache the teacher on")
    items = encode(train, tokenizer, prompt_template(cfg), cfg.dataset.max_prompt_length, cfg.dataset.max_length)
    runtime = setup_runtime(cfg.hardware)
    teacher = scoring_teacher(cfg, runtime, tokenizer, items)
    build_cache(teacher, tokenizer, items, folder, components, top_k=cfg.cache.top_k,
                dtype=cfg.cache.dtype, batch_size=cfg.cache.batch_size, shard_rows=cfg.cache.shard_rows,
                runtime=runtime, progress=True)
    print(f"kdlab: teacher cache written: {folder}\ntrain from it with teacher.cache={folder}")
    return folder


if __name__ == "__main__":
    main(cache_teacher, "cache_teacher")
