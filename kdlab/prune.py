"""``python -m kdlab.prune``: a student's shape, size and starting loss, before any training.

Same config as ``kdlab.run`` (``student=``, ``teacher=``, ``dataset=``, ``student.prune.*=``...). Builds the
job's student exactly as a training job would (a pruned one is computed once and shared under
``<output_dir>/students/``, :mod:`kdlab.pruning`; ``teacher_layers`` and ``pretrained`` work too, so the
even cut can be compared) and prints its shape, its parameter count (total, and the transformer blocks
alone) against the teacher's, and the mean response-token loss (nats) of the teacher and the student on
the calibration rows, the validation split (``train.valid_examples`` rows; null: all) and the dataset's test
split (``eval.test_examples`` rows); ``conf/prune.yaml``'s ``report`` picks the splits and whether the teacher's
losses are measured too. It trains nothing. The last line is one JSON object of the same numbers.
"""
from __future__ import annotations

import json

from kdlab.cli import main, validate_config
from kdlab.config import ConfigError, Type, check_section

SCHEMA = {"splits": Type(list), "teacher": Type(bool)}
SPLITS = ("calibration", "valid", "test")


def parameters(model) -> tuple[int, int]:
    """``(all parameters, those of the transformer blocks)``; a tied embedding counts once."""
    from kdlab.modeling import layer_list

    return (sum(p.numel() for p in model.parameters()),
            sum(p.numel() for p in layer_list(model).parameters()))


def prune(cfg) -> dict:
    from kdlab.data import encode_job_sets, load_test_sets, load_training_splits
    from kdlab.hardware import start_runtime
    from kdlab.pruning import Shape, calibration_loss, describe, settings
    from kdlab.student import derive_models, load_models

    validate_config(cfg)
    check_section("report", cfg.report, SCHEMA)
    unknown = [s for s in cfg.report.splits if s not in SPLITS]
    if unknown:
        raise ConfigError(f"report.splits has {unknown[0]!r}; choose among {', '.join(SPLITS)}")
    runtime = start_runtime(cfg)
    splits = load_training_splits(cfg)
    test_sets = load_test_sets({cfg.dataset.name: cfg.dataset}, cfg.seed, cfg.dataset.name)
    models = load_models(cfg, runtime, with_teacher=True)
    sets = encode_job_sets(cfg, models.tokenizer, models.teacher_tokenizer, splits, test_sets, False, runtime.is_main)
    teacher = models.teacher   # the teacher as loaded: what the numbers compare with
    if cfg.student.init == "pruned" and settings(cfg.student.prune)["source"] == "finetuned":
        models = derive_models(cfg, runtime, models, sets)
        teacher = models.teacher
    else:
        models = derive_models(cfg, runtime, models, sets, with_teacher=False)
    data = {"calibration": sets.train[:settings(cfg.student.prune)["calibration_rows"]], "valid": sets.valid,
            "test": sets.test[cfg.dataset.name]}
    # sorted by length: batches of similar lengths pad less (the token-mean loss does not depend on the order)
    data = {split: sorted(data[split], key=lambda it: len(it.prompt_ids) + len(it.response_ids))
            for split in cfg.report.splits}
    batch = cfg.eval.batch_size
    out = {"student": cfg.student.name, "shape": vars(Shape.of(models.student.config)),
           "teacher_shape": vars(Shape.of(teacher.config))}
    for name, model in (("teacher", teacher), ("student", models.student)):
        total, blocks = parameters(model)
        out[f"{name}_params"], out[f"{name}_block_params"] = total, blocks
        measured = name == "student" or cfg.report.teacher
        out[f"{name}_loss"] = {split: calibration_loss(model, items, models.tokenizer, batch)
                               for split, items in data.items() if measured}
    print(f"kdlab: student {cfg.student.name}: {describe(Shape.of(models.student.config))}\n"
          f"  parameters: {out['student_params']:,} of the teacher's {out['teacher_params']:,} "
          f"({out['student_params'] / out['teacher_params']:.1%}); transformer blocks {out['student_block_params']:,} "
          f"of {out['teacher_block_params']:,} ({out['student_block_params'] / out['teacher_block_params']:.1%})")
    for split, items in data.items():
        teacher_loss = f", teacher {out['teacher_loss'][split]:.3f}" if cfg.report.teacher else ""
        print(f"  {split} loss ({len(items)} rows, response tokens, nats): student "
              f"{out['student_loss'][split]:.3f}{teacher_loss}")
    print(json.dumps(out))
    return out


if __name__ == "__main__":
    main(prune, "prune")
