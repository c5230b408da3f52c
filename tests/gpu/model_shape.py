"""Write a teacher's architecture without its weights: ``python tests/gpu/model_shape.py DEST [TEACHER]``.

DEST gets the ``config.json`` and tokenizer files of ``conf/teacher/<TEACHER>.yaml`` (default the
embedded smollm2-135m: 3.4 MB, where its weights are 98 MB), for ``python -m benchmarks ...
--teacher_shape=DEST`` on a machine the weights cannot reach (:func:`benchmarks.harness.random_teacher`).
"""
from __future__ import annotations

import sys
from pathlib import Path

import torch
from omegaconf import OmegaConf

ROOT = Path(__file__).resolve().parents[2]


def main(dest: str, teacher: str = "smollm2-135m") -> None:
    from kdlab.teacher import load_teacher

    model, tok = load_teacher(OmegaConf.load(ROOT / "conf" / "teacher" / f"{teacher}.yaml"), torch.float32)
    model.config.save_pretrained(dest)
    tok.save_pretrained(dest)


if __name__ == "__main__":
    main(*sys.argv[1:])
