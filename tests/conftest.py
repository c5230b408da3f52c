"""Shared fixtures: the repository root, the real data folder, and a runner for `python -m kdlab.run`."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = ROOT.parent / "shared" / "data"


def conf_option(group: str, name: str):
    """``conf/<group>/<name>.yaml`` as a job sees it (:func:`kdlab.config.load_option`)."""
    from kdlab.config import load_option

    return load_option(group, name, ROOT / "conf")


def kdlab_env() -> dict:
    env = dict(os.environ)
    env.update(HF_HUB_OFFLINE="1", WANDB_MODE="offline", TOKENIZERS_PARALLELISM="false", PYTHONUNBUFFERED="1")
    return env


def run_kdlab(*args: str, module: str = "kdlab.run", timeout: float = 600, check: bool = True):
    """Run a kdlab entry point in a fresh process (Hydra keeps global state) from the repo root."""
    proc = subprocess.run([sys.executable, "-m", module, *args], cwd=ROOT, env=kdlab_env(),
                          capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"kdlab {' '.join(args)} failed ({proc.returncode}):\n{proc.stderr[-4000:]}")
    return proc


def tiny_method(name: str, setup, **overrides):
    """``conf/method/<name>.yaml`` with ``overrides``, validated and built on a ``(teacher, student, tok, data)``
    setup of tiny models (no divergence, runtime or train config: the method tests pass what they use)."""
    from omegaconf import OmegaConf

    from kdlab.methods import method_class
    from kdlab.methods.base import Context

    teacher, student, tok, _ = setup
    cfg = OmegaConf.load(ROOT / "conf" / "method" / f"{name}.yaml")
    cfg.merge_with(overrides)
    cls = method_class(name)
    cls.validate(cfg)
    return cls(cfg, Context(teacher, student, tok, None, None, None))


def first_batch(setup, size: int, split: str = "train"):
    """The first batch of ``split`` of a tiny setup's encoded data (seed 0)."""
    from kdlab.data import batches

    return next(batches(setup[3][split], size, setup[2].pad_token_id, seed=0))[2]


def response_log_softmax(models, generated, vocab: int):
    """Per held-out example, each model's log-softmax rows at its generated response tokens and the
    tokens themselves, from one forward on prompt + response (no padding, no cache): the slow
    reference the methods' held-out checks are computed from."""
    import torch
    import torch.nn.functional as F

    with torch.no_grad():
        for i in range(len(generated.prompt_ids)):
            p = generated.prompt_ids[i][generated.prompt_mask[i].bool()]
            r = generated.response_ids[i][generated.response_mask[i].bool()]
            ids, start = torch.cat([p, r])[None], len(p)
            yield [F.log_softmax(m(ids).logits[0, start - 1: -1, :vocab], -1) for m in models], r


@pytest.fixture(scope="session", autouse=True)
def one_thread():
    """In-process tests use tiny models: one thread is faster than two, and far faster on a busy machine
    (threads spin). Jobs started as subprocesses choose their own (the smoke experiment uses one)."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture
def shared_data() -> Path:
    if not SHARED_DATA.is_dir():
        pytest.skip(f"real data folder {SHARED_DATA} is absent")
    return SHARED_DATA


def tiny_teacher_cache(folder: Path, components: dict, **build):
    """A top-k cache of the random ``tiny`` teacher over 6 synthetic training rows (byte tokenizer, alpaca
    template), for tests that damage one: ``(folder, items)``."""
    from omegaconf import OmegaConf

    from kdlab.data import encode, load_splits
    from kdlab.modeling import byte_tokenizer, random_model
    from kdlab.teacher.topk_cache import build_cache

    tokenizer = byte_tokenizer()
    teacher = random_model(OmegaConf.load(ROOT / "conf/teacher/tiny.yaml").random, len(tokenizer)).eval()
    rows = load_splits({"name": "synthetic", "source": "synthetic", "sizes": {"train": 6}, "template": "alpaca",
                        "max_prompt_length": 320, "max_length": 400}, 0)["train"]
    items = encode(rows, tokenizer, "alpaca", 320, 400)
    return build_cache(teacher, tokenizer, items, folder, components, top_k=4, **build), items
