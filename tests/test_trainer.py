"""The trainer's phases (kdlab/trainer.py, kdlab/validation.py): an earlier phase that keeps its best student by validation
loss (MiniLLM's SFT phase) hands that student, not its last one, to the next phase, also across a resume."""
import pytest
import torch
from hydra import compose, initialize_config_dir

import kdlab.run  # noqa: F401  (registers the config resolvers)
from conftest import ROOT
from kdlab import trainer as trainer_module
from kdlab import validation as validation_module
from kdlab.run import train_and_evaluate


def smoke_config(*overrides):
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base=None):
        return compose("config", overrides=["+experiment=smoke", *overrides])


MINILLM = ["method=minillm", "method.sft_steps=6", "train.max_steps=2", "train.eval_every=2", "train.save_every=2",
           "method.rollouts=4", "method.max_new_tokens=4", "eval.models=[student]", "eval.analysis.enabled=false"]


class ScriptedLoss:
    """Stands in for the validation loss: returns ``losses`` in turn and records the student each time;
    the second phase's first loss call records the student it starts from."""

    def __init__(self, losses):
        self.losses, self.seen = list(losses), []

    def __call__(self, model, *args, **kwargs):
        self.seen.append({k: v.detach().clone() for k, v in model.state_dict().items()})
        return self.losses[len(self.seen) - 1]


def first_policy_student(monkeypatch):
    from kdlab.methods.minillm import MiniLLM
    start = {}
    original = MiniLLM.loss

    def loss(self, batch, step):
        start.setdefault("state", {k: v.detach().clone() for k, v in self.student.state_dict().items()})
        return original(self, batch, step)
    monkeypatch.setattr(MiniLLM, "loss", loss)
    return start


def same(a, b):
    return all(torch.equal(a[k], b[k]) for k in a)


def test_minillm_starts_its_policy_phase_from_the_lowest_validation_loss_sft_student(monkeypatch, tmp_path):
    scripted = ScriptedLoss([3.0, 1.0, 2.0])   # SFT validations at steps 2, 4, 6: the best is step 4
    monkeypatch.setattr(validation_module, "test_loss", scripted)
    start = first_policy_student(monkeypatch)
    train_and_evaluate(smoke_config(*MINILLM), tmp_path)
    assert len(scripted.seen) == 3
    assert not same(scripted.seen[1], scripted.seen[2])          # SFT moved the student after its best
    assert same(start["state"], scripted.seen[1])                 # ... and phase 2 began from the best
    logged = (tmp_path / "metrics.jsonl").read_text()
    assert logged.count('"valid/sft_loss"') == 3


def test_the_best_sft_student_survives_a_resume(monkeypatch, tmp_path):
    class Preempted(Exception):
        pass

    scripted = ScriptedLoss([3.0, 1.0])
    original_save = trainer_module.Trainer.save

    def save_then_stop(self, index, step, offset, position):
        original_save(self, index, step, offset, position)
        if (index, step) == (0, 4):
            raise Preempted
    monkeypatch.setattr(validation_module, "test_loss", scripted)
    monkeypatch.setattr(trainer_module.Trainer, "save", save_then_stop)
    with pytest.raises(Preempted):
        train_and_evaluate(smoke_config(*MINILLM), tmp_path)
    best = scripted.seen[1]

    monkeypatch.setattr(trainer_module.Trainer, "save", original_save)
    resumed = ScriptedLoss([2.0])          # step 6 after the resume: worse than the saved best (1.0)
    monkeypatch.setattr(validation_module, "test_loss", resumed)
    start = first_policy_student(monkeypatch)
    train_and_evaluate(smoke_config(*MINILLM), tmp_path)
    assert len(resumed.seen) == 1 and not same(resumed.seen[0], best)
    assert same(start["state"], best)


def test_without_validation_the_policy_phase_starts_from_the_last_sft_step(monkeypatch, tmp_path):
    scripted = ScriptedLoss([])
    monkeypatch.setattr(validation_module, "test_loss", scripted)
    start = first_policy_student(monkeypatch)
    sft_end = {}
    original_save = trainer_module.Trainer.save

    def save(self, index, step, offset, position):
        if index == 0:
            sft_end["state"] = {k: v.detach().clone() for k, v in self.method.student.state_dict().items()}
        original_save(self, index, step, offset, position)
    monkeypatch.setattr(trainer_module.Trainer, "save", save)
    train_and_evaluate(smoke_config(*MINILLM, "train.eval_every=null"), tmp_path)
    assert scripted.seen == [] and same(start["state"], sft_end["state"])


def test_keep_best_writes_only_a_new_best(tmp_path):
    validation = validation_module.Validation(type("M", (), {"student": torch.nn.Linear(2, 2)})(), [], None, None,
                                              type("R", (), {"strategy": "none", "is_main": True})(), tmp_path)
    written = []
    best = -float("inf")
    for score in [1.0, 0.5, 2.0, 2.0, float("nan")]:
        best = validation.keep_best(score, best, lambda student: written.append((score, student)))
    assert best == 2.0 and [s for s, _ in written] == [1.0, 2.0]
    assert written[0][1] is validation.method.student
    # a loss is kept as its negative: lower is better
    assert -validation.keep_best(-1.5, -1.0, written.append) == 1.0 and len(written) == 2
    assert -validation.keep_best(-0.5, -1.0, written.append) == 0.5 and len(written) == 3


def test_rng_capture_and_restore_continue_the_same_streams():
    import random

    from kdlab.checkpoint import capture_rng, restore_rng
    torch.manual_seed(1)
    random.seed(1)
    state = capture_rng(world_size=1)
    draws = torch.rand(3), random.random()
    torch.manual_seed(2)
    random.seed(2)
    restore_rng(state, rank=0, world_size=1)
    assert torch.equal(torch.rand(3), draws[0]) and random.random() == draws[1]
    # with several ranks, each continues its own stream
    own = torch.Generator().manual_seed(3), random.Random(3)
    state["rank_rng"] = [(state["torch_rng"], state["python_rng"]), (own[0].get_state(), own[1].getstate())]
    restore_rng(state, rank=1, world_size=2)
    assert torch.equal(torch.rand(2), torch.rand(2, generator=own[0])) and random.random() == own[1].random()
