"""The cached teacher (kdlab.teacher.topk_cache, `python -m kdlab.cache_teacher`, `teacher.cache=`) and
teachers whose LM head has padding rows beyond the tokenizer's vocabulary."""
import json

import numpy as np
import pytest
import torch
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from conftest import ROOT, conf_option, run_kdlab
from kdlab.cache_teacher import cache_teacher
from kdlab.config import ConfigError
from kdlab.data import collate, encode, load_splits
from kdlab.divergences import build_divergence
from kdlab.hardware import Runtime
from kdlab.methods.base import Context
from kdlab.methods.kd import KD
from kdlab.modeling import byte_tokenizer, freeze, random_model
from kdlab.cli import CONF_DIR, validate_config
from kdlab.teacher.cached import CachedTeacher
from kdlab.teacher.topk_cache import TeacherCache, build_cache, key_components

V = 257  # the byte tokenizer: 256 bytes + end-of-text


def tiny_teacher(extra_rows: int = 0, sharpen: float = 4.0):
    """The `tiny` teacher, its final norm scaled up: a random but peaked (low-entropy) teacher, so a
    student has something to learn from it. ``extra_rows``: LM-head rows beyond the tokenizer."""
    model = random_model(conf_option("teacher", "tiny").random, V + extra_rows)
    with torch.no_grad():
        model.model.norm.weight.mul_(sharpen)
    return freeze(model)


def tiny_student():
    return random_model(conf_option("student", "tiny").random, V).train()


def run_cfg(**dataset):
    ds = OmegaConf.load(ROOT / "conf/dataset/synthetic.yaml")
    ds.sizes = {"train": 24, "valid": 8, "test": 8}
    ds.max_prompt_length, ds.max_length = 320, 400
    ds.merge_with(dataset)
    return OmegaConf.create({"teacher": conf_option("teacher", "tiny"), "dataset": ds, "seed": 1})


def synthetic_items(tok, split: str = "train", cfg=None):
    cfg = cfg or run_cfg()
    return encode(load_splits(cfg.dataset, cfg.seed)[split], tok, "alpaca", cfg.dataset.max_prompt_length,
                  cfg.dataset.max_length)


def context(teacher, student, tok, divergence: str = "fkl", cache=None) -> Context:
    """A method's context; with ``cache`` the cached teacher stands in for ``teacher``."""
    return Context(teacher=CachedTeacher(cache) if cache is not None else teacher, student=student, tokenizer=tok,
                   divergence=build_divergence({"name": divergence}),
                   runtime=Runtime(torch.device("cpu"), torch.float32), train_cfg=None)


def kd_method(ctx, alpha: float = 0.5) -> KD:
    return KD(OmegaConf.create({"name": "kd", "lr": 1e-2, "alpha": alpha}), ctx)


@torch.no_grad()
def reference_log_probs(teacher, items) -> torch.Tensor:
    """Slow and obvious: each example alone, full logits, log-softmax over the tokenizer's vocabulary."""
    rows = []
    for it in items:
        ids = torch.tensor([it.prompt_ids + it.response_ids])
        logp = teacher(ids).logits[0, :, :V].float().log_softmax(-1)
        rows.append(logp[len(it.prompt_ids) - 1: ids.shape[1] - 1])
    return torch.cat(rows)



@pytest.fixture(scope="module")
def setup():
    tok = byte_tokenizer()
    return tok, tiny_teacher(), synthetic_items(tok)


@pytest.mark.parametrize("k,dtype,atol", [(V, "float32", 1e-5), (5, "float16", 1e-2)])
def test_cache_holds_the_teachers_top_k_log_probs(setup, tmp_path, k, dtype, atol):
    tok, teacher, items = setup
    items = items[:6]
    cache = TeacherCache(build_cache(teacher, tok, items, tmp_path / "c", key_components(run_cfg(), tok),
                                     top_k=k, dtype=dtype, batch_size=4, shard_rows=100))
    assert cache.manifest["shards"] > 1          # rows of one batch come from several shards
    shuffled = items[::-1]                         # another order and padding than when it was built
    got = cache.lookup(collate(shuffled, tok.pad_token_id))
    ref = reference_log_probs(teacher, shuffled)
    assert got.values.shape == (ref.shape[0], k) and got.values.dtype == torch.float32
    assert torch.equal(got.indices.sort(-1).values, ref.topk(k).indices.sort(-1).values)
    # the values are the teacher's log-probs renormalised over its top k (for k = V: the log-softmax)
    expected = ref.gather(1, got.indices).log_softmax(-1)
    torch.testing.assert_close(got.values, expected, atol=atol, rtol=0)
    if k == V:
        torch.testing.assert_close(got.values, ref.gather(1, got.indices), atol=atol, rtol=0)


@pytest.mark.parametrize("divergence", ["fkl", "rkl"])
def test_training_from_a_full_vocabulary_cache_equals_training_with_the_live_teacher(setup, tmp_path, divergence):
    tok, teacher, items = setup
    cache = TeacherCache(build_cache(teacher, tok, items, tmp_path / "c", key_components(run_cfg(), tok),
                                     top_k=V, dtype="float32"))
    losses = {}
    for mode in ("live", "cached"):
        student = tiny_student()
        live = mode == "live"
        method = kd_method(context(teacher if live else None, student, tok, divergence, None if live else cache))
        opt = torch.optim.AdamW(student.parameters(), lr=1e-2)
        losses[mode] = []
        for step in range(4):
            out = method.loss(collate(items[4 * step: 4 * step + 4], tok.pad_token_id), step)
            out.loss.backward()
            opt.step()
            opt.zero_grad()
            losses[mode].append([out.loss.item(), out.logs["distill"]])
    assert np.allclose(losses["live"], losses["cached"], rtol=1e-5, atol=1e-6), losses
    assert losses["live"][0][1] > 0 and len({round(l[0], 6) for l in losses["live"]}) == 4


def test_a_cache_built_for_something_else_is_rejected_naming_the_mismatch(setup, tmp_path):
    tok, teacher, items = setup
    folder = build_cache(teacher, tok, items, tmp_path / "c", key_components(run_cfg(), tok), top_k=4)
    cache = TeacherCache(folder)
    cache.check(key_components(run_cfg(), tok), items)   # the same run: accepted

    other_teacher = run_cfg()
    other_teacher.teacher.random.seed = 7
    other_tok = byte_tokenizer()
    other_tok.add_tokens(["<extra>"])
    cases = {
        r"different teacher \(teacher\.random\.seed: cache has 0, this run 7\)": (other_teacher, tok, items),
        r"different dataset \(dataset\.max_length": (run_cfg(max_length=300), tok, items),
        r"dataset\.template: cache has 'auto', this run 'chat'": (run_cfg(template="chat"), tok, items),
        r"different tokenizer": (run_cfg(), other_tok, items),
        r"other training examples": (run_cfg(), tok, items[1:]),
    }
    for message, (cfg, tokenizer, its) in cases.items():
        with pytest.raises(ConfigError, match=message):
            cache.check(key_components(cfg, tokenizer), its)
    # teacher.cache itself is not part of what the cache depends on
    pointed = run_cfg()
    pointed.teacher.cache = str(folder)
    cache.check(key_components(pointed, tok), items)


def test_a_crashed_build_leaves_no_cache_behind(setup, tmp_path):
    tok, teacher, items = setup

    class Crashes(torch.nn.Module):
        """The teacher, failing on its second batch."""
        def __init__(self):
            super().__init__()
            self.inner, self.calls = teacher, 0

        def get_output_embeddings(self):
            return self.inner.get_output_embeddings()

        @property
        def base_model(self):
            self.calls += 1
            if self.calls == 2:
                raise RuntimeError("killed")
            return self.inner.base_model

    with pytest.raises(RuntimeError, match="killed"):
        build_cache(Crashes(), tok, items, tmp_path / "c", {}, top_k=4, batch_size=4)
    assert list(tmp_path.iterdir()) == []
    with pytest.raises(ConfigError, match="not a complete teacher cache"):
        TeacherCache(tmp_path / "c")


def test_a_teacher_with_lm_head_padding_rows_distils_into_a_student_without_them(setup, tmp_path):
    tok, _, items = setup
    teacher = tiny_teacher(extra_rows=7)       # like 152,064 LM-head rows for a 151,936-token tokenizer
    with torch.no_grad():                       # padding rows that would dominate the softmax if kept
        teacher.get_output_embeddings().weight[V:] = 5.0
    batch = collate(items[:4], tok.pad_token_id)
    student = tiny_student()
    method = kd_method(context(teacher, student, tok), alpha=1.0)
    targets = method.teacher_targets(batch)
    assert targets.shape == (int(batch.response_mask.sum()), V)
    full = teacher(batch.input_ids, attention_mask=batch.attention_mask).logits[batch.response_mask]
    assert full.shape[-1] == V + 7 and torch.equal(targets, full[:, :V])
    cache = TeacherCache(build_cache(teacher, tok, items[:4], tmp_path / "c", {}, top_k=16))
    assert int(cache.lookup(batch).indices.max()) < V

    opt = torch.optim.AdamW(student.parameters(), lr=1e-2)
    losses = []
    for step in range(8):
        out = method.loss(batch, step)
        out.loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(out.loss.item())
    assert losses[-1] < 0.7 * losses[0], losses


def test_cache_teacher_cli_then_training_without_a_teacher_in_memory(tmp_path):
    smoke = ["+experiment=smoke", "dataset.sizes.train=16", "hardware.num_threads=1"]
    built = run_kdlab(*smoke, "cache.top_k=8", f"cache.out={tmp_path / 'cache'}", module="kdlab.cache_teacher")
    folder = next((tmp_path / "cache").glob("tiny-synthetic-k8-*"))
    assert str(folder) in built.stdout
    manifest = json.loads((folder / "manifest.json").read_text())
    assert manifest["top_k"] == 8 and manifest["examples"] == 16 and manifest["components"]["template"] == "alpaca"
    with initialize_config_dir(CONF_DIR, version_base="1.3"):
        same = compose("cache_teacher", overrides=[*smoke, "cache.top_k=8", f"cache.out={tmp_path / 'cache'}"])
    assert cache_teacher(same) == folder      # found complete: not built again

    train = [*smoke, f"teacher.cache={folder}", "train.max_steps=2", "train.eval_every=null",
             "train.save_every=null", "eval.test_examples=2"]
    run_kdlab(*train, "method=kd", f"hydra.run.dir={tmp_path / 'run'}")
    res = json.loads((tmp_path / "run" / "results.json").read_text())
    assert res["run"]["status"] == "completed"
    assert set(res["eval"]) == {"student_init", "student"}     # the teacher's own rows need the teacher
    assert any("train/distill" in json.loads(l) for l in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines())

    wrong = run_kdlab(*train, "method=kd", "dataset.sizes.train=12", f"hydra.run.dir={tmp_path / 'wrong'}", check=False)
    assert wrong.returncode == 2 and "built for a different dataset" in wrong.stderr
    with initialize_config_dir(CONF_DIR, version_base="1.3"):
        on_policy = compose("config", overrides=[*train, "method=seqkd"])
        dense_only = compose("config", overrides=[*train, "method=kd", "divergence=akl"])
        ignored = compose("config", overrides=[*train, "method=sft"])
    with pytest.raises(ConfigError, match=r"method=seqkd cannot train with a cached teacher \(teacher.cache\): it needs the teacher's generations; use a live teacher .* or a served one"):
        validate_config(on_policy)
    with pytest.raises(ConfigError, match="divergence=akl needs the teacher's full distribution"):
        validate_config(dense_only)
    validate_config(ignored)                  # sft has no teacher in its loss: teacher.cache is ignored


@pytest.mark.parametrize("divergence,refused", [
    ({"name": "rkl"}, True), ({"name": "jsd", "beta": 1.0}, True), ({"name": "srkl", "skew": 0.0}, True),
    ({"name": "fkl"}, False), ({"name": "jsd", "beta": 0.5}, False), ({"name": "srkl", "skew": 0.1}, False)])
def test_reverse_kl_from_a_top_k_below_the_vocabulary_is_refused_and_exact_caches_are_not(
        setup, tmp_path, divergence, refused):
    """Reverse KL and its limits see only the teacher's top-k support: below k = V their gradient is unrelated to
    the full one (test_topk_approximation), so the job stops naming the fix; k = V is exact (the test above)."""
    from kdlab.teacher import check_support

    tok, teacher, items = setup
    div = build_divergence(divergence)
    for k in (20, V):
        cached = CachedTeacher(TeacherCache(build_cache(teacher, tok, items[:4], tmp_path / f"c{k}",
                                                        key_components(run_cfg(), tok), top_k=k)))
        if refused and k < V:
            with pytest.raises(ConfigError, match=rf"divergence={divergence['name']} from a cached teacher's "
                                                   rf"top-20 of {V} tokens.*top_k={V}, or divergence=fkl"):
                check_support(div, cached, V)
        else:
            check_support(div, cached, V)


def test_a_job_with_reverse_kl_from_a_top_k_cache_stops_before_training(setup, tmp_path):
    """build_job_method (what kdlab.run calls) applies the check; sft, which reads no teacher, is not refused."""
    from types import SimpleNamespace

    from kdlab.methods import build_job_method

    tok, teacher, items = setup
    folder = build_cache(teacher, tok, items, tmp_path / "c", key_components(run_cfg(), tok), top_k=5)
    models = SimpleNamespace(teacher=None, teacher_tokenizer=None, tokenizer=tok, student=tiny_student())
    runtime = Runtime(device=torch.device("cpu"), dtype=torch.float32)
    for method, refused in (("kd", True), ("sft", False)):
        cfg = run_cfg()
        cfg.teacher.cache = str(folder)
        cfg.train = OmegaConf.load(ROOT / "conf/config.yaml").train
        cfg.method = OmegaConf.create({"name": method, "lr": 1e-3, **({"alpha": 0.5} if method == "kd" else {})})
        cfg.divergence = OmegaConf.create({"name": "rkl"})
        if refused:
            with pytest.raises(ConfigError, match="divergence=rkl from a cached teacher's top-5"):
                build_job_method(cfg, models, runtime, items)
        else:
            build_job_method(cfg, models, runtime, items)
