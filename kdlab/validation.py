"""Validation during training, and the students it keeps.

Every ``train.eval_every`` steps the last phase's student is validated (greedy ROUGE-L, exact match and
loss on the validation split) and the best one by ROUGE-L is saved to ``student_best/``. An earlier phase
that keeps its best student (``Phase.keep_best_valid_loss``: MiniLLM's SFT) is validated by loss only;
its lowest-loss student is saved to ``phase<i>_best/``, and the next phase starts from it.
"""
from __future__ import annotations

import math
from pathlib import Path

from safetensors.torch import load_model

from kdlab import distributed
from kdlab.checkpoint import recover_dir, save_pretrained, save_weights
from kdlab.metrics.evaluate import evaluate, test_loss


class Validation:
    """The best scores so far (checkpointed with the trainer's state) and the students they belong to."""

    def __init__(self, method, valid_items, tokenizer, eval_cfg, runtime, run_dir: Path):
        self.method, self.valid_items, self.tokenizer = method, valid_items, tokenizer
        self.eval_cfg, self.runtime, self.run_dir = eval_cfg, runtime, Path(run_dir)
        self.best_rouge = -math.inf
        self.phase_best_loss = math.inf     # of the running phase, when it keeps its best student

    def recover(self, num_phases: int) -> None:
        """Settle the kept students' folders a killed job left half-replaced (rank 0, before training)."""
        recover_dir(self.run_dir / "student_best")
        for index in range(num_phases):
            recover_dir(self.phase_best_dir(index))

    def state_dict(self) -> dict:
        return {"best_rouge": self.best_rouge, "phase_best_loss": self.phase_best_loss}

    def load_state_dict(self, state: dict) -> None:
        self.best_rouge = state["best_rouge"]
        self.phase_best_loss = state.get("phase_best_loss", math.inf)

    def start_phase(self) -> None:
        self.phase_best_loss = math.inf

    def keep_best(self, score: float, best: float, write) -> float:
        """The new best of ``score`` and ``best`` (higher is better); when ``score`` beats ``best``, rank 0
        writes the student with ``write(student)`` (under ZeRO-3 every rank gathers its shards for it)."""
        if not score > best:
            return best
        student = self.method.student
        with distributed.full_params(student, self.runtime.strategy):
            if self.runtime.is_main:
                write(student)
        return score

    def validate(self, phase_name: str, index: int, step: int, is_last: bool) -> dict:
        """The last phase: greedy ROUGE-L and loss, the best student by ROUGE-L kept in ``student_best/``.
        An earlier one: the loss only, the lowest-loss student kept in ``phase<index>_best/``."""
        student = self.method.student
        if not is_last:
            loss = test_loss(student, self.valid_items, self.tokenizer, self.eval_cfg.batch_size, self.runtime.device,
                             self.runtime.autocast())
            self.phase_best_loss = -self.keep_best(-loss, -self.phase_best_loss,
                                                   lambda model: save_weights(model, self.phase_best_dir(index)))
            return {f"valid/{phase_name}_loss": loss}
        cfg = self.eval_cfg.copy()
        cfg.do_sample = False
        result = evaluate(student, self.tokenizer, self.valid_items, cfg, self.runtime, desc=f"valid@{step}")
        best_dir = self.run_dir / "student_best"
        self.best_rouge = self.keep_best(result["rougeL"], self.best_rouge,
                                         lambda model: save_pretrained(model, self.tokenizer, best_dir))
        return {"valid/rougeL": result["rougeL"], "valid/exact_match": result["exact_match"],
                "valid/loss": result["loss"], "valid/best_rougeL": self.best_rouge}

    def phase_best_dir(self, index: int) -> Path:
        return self.run_dir / f"phase{index}_best"

    def restore_phase_best(self, index: int) -> None:
        """Every rank loads the phase's lowest-validation-loss student (ZeRO-3: rank 0's copy is broadcast)."""
        path = self.phase_best_dir(index) / "model.safetensors"
        if path.exists():
            student = self.method.student
            with distributed.full_params(student, self.runtime.strategy, modify=True):
                load_model(student, str(path), device=str(self.runtime.device))
        distributed.barrier()
