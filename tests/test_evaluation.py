"""Evaluation: the teacher-forcing analysis against slow references, reproducible sampled evaluation,
and `python -m kdlab.eval` on a checkpoint written by a smoke training run."""
import copy
import json

import pytest
import torch
import torch.nn.functional as F
from omegaconf import OmegaConf

from conftest import ROOT, conf_option, run_kdlab
from kdlab.data import collate, encode
from kdlab.metrics import evaluate as evaluation
from kdlab.metrics.evaluate import evaluate, generate_texts
from kdlab.hardware import Runtime
from kdlab.metrics import exaccerr, exaccerr_from_regrets, normalize_answer, rouge_l_per_example
from kdlab.student import build_student
from kdlab.teacher import load_teacher

RUNTIME = Runtime(torch.device("cpu"), torch.float32)
EXAMPLES = [
    {"instruction": "Add 2 and 3.", "input": "", "output": "5"},
    {"instruction": "Name a colour.", "input": "", "output": "Blue is a colour."},
    {"instruction": "Reverse the word.", "input": "stressed", "output": "desserts"},
    {"instruction": "Count to four.", "input": "", "output": "one two three four"},
    {"instruction": "Say hi.", "input": "", "output": "hi"},
    {"instruction": "Repeat.", "input": "ab", "output": "ab ab ab"},
]


def eval_cfg(**overrides):
    cfg = OmegaConf.load(ROOT / "conf" / "config.yaml").eval
    cfg.merge_with({"batch_size": 4, "max_new_tokens": 6,
                    "analysis": {"max_examples": None, "unc_quantiles": [0.5], "exaccerr_lengths": [2, 4],
                                 "exaccerr_samples": 2}})
    cfg.merge_with(overrides)
    return cfg



@pytest.fixture(scope="module")
def models():
    teacher, tok = load_teacher(conf_option("teacher", "tiny"), torch.float32)
    student, _ = build_student(conf_option("student", "tiny"), teacher, tok, "tiny",
                               torch.float32)
    items = encode(EXAMPLES, tok, "alpaca", 300, 400)
    assert len(items) == len(EXAMPLES)
    return teacher, student.eval(), tok, items


def reference_rows(model, items, vocab):
    """Response-position logits, one example at a time, from the full (1, T, V) logits."""
    rows = []
    for it in items:
        ids = torch.tensor([it.prompt_ids + it.response_ids])
        with torch.no_grad():
            logits = model(input_ids=ids).logits[0, :, :vocab].double()
        p = len(it.prompt_ids)
        rows.append(logits[p - 1: p - 1 + len(it.response_ids)])
    return torch.cat(rows)


def test_student_equal_to_teacher_agrees_everywhere(models):
    teacher, _, tok, items = models
    res = evaluate(copy.deepcopy(teacher), tok, items, eval_cfg(), RUNTIME, len(tok), teacher=teacher)
    tokens = sum(len(it.response_ids) for it in items)
    assert res["top1"] == 1.0 and res["kl"] == pytest.approx(0.0, abs=1e-7)
    assert res["analysis_tokens"] == tokens and res["analysis_examples"] == len(items)
    assert [b["bucket"] for b in res["unc_buckets"]] == [0, 1]
    assert sum(b["count"] for b in res["unc_buckets"]) == tokens
    for b in res["unc_buckets"]:
        assert b["top1"] == 1.0 and b["kl"] == pytest.approx(0.0, abs=1e-7)
    assert res["exaccerr"] == {"l=2": 0.0, "l=4": 0.0}
    assert all(v == pytest.approx(0.0, abs=1e-7) for v in res["exaccerr_regret_student"].values())


def test_analysis_matches_a_per_example_reference(models):
    teacher, student, tok, items = models
    vocab = len(tok)
    cfg = eval_cfg()
    res = evaluate(student, tok, items, cfg, RUNTIME, teacher=teacher)
    q, p = reference_rows(student, items, vocab), reference_rows(teacher, items, vocab)
    gold = torch.tensor([t for it in items for t in it.response_ids])
    log_p, log_q = p.log_softmax(-1), q.log_softmax(-1)
    kl = (log_p.exp() * (log_p - log_q)).sum(-1)
    agree = (q.argmax(-1) == p.argmax(-1)).double()
    assert res["top1"] == pytest.approx(agree.mean().item(), abs=1e-12)
    assert res["kl"] == pytest.approx(kl.mean().item(), rel=1e-5)
    # UNC = 1 - p(gold); two buckets split at the median, easy (low UNC) first
    unc = 1 - log_p.gather(1, gold[:, None]).squeeze(1).exp()
    median = unc.quantile(0.5)
    std = q.std(-1, correction=0)
    for b, sel in zip(res["unc_buckets"], (unc < median, unc >= median)):
        assert b["count"] == int(sel.sum())
        assert b["kl"] == pytest.approx(kl[sel].mean().item(), rel=1e-5)
        assert b["top1"] == pytest.approx(agree[sel].mean().item())
        assert b["std"] == pytest.approx(std[sel].mean().item(), rel=1e-5)
        assert b["unc_low"] <= b["unc_mean"] <= b["unc_high"]
    assert res["unc_buckets"][0]["unc_high"] == pytest.approx(median.item(), rel=1e-6)
    # ExAccErr: the metrics' Monte-Carlo estimator on the same prompts (ordered by length) and seed
    one_batch = evaluate(student, tok, items, eval_cfg(batch_size=8), RUNTIME, teacher=teacher)
    batch = collate(sorted(items, key=lambda it: (len(it.prompt_ids), len(it.response_ids))), tok.pad_token_id)
    ref = exaccerr(student, teacher, batch.prompt_ids, batch.prompt_mask, lengths=[2, 4], num_samples=2,
                   seed=cfg.seeds[0], eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id, vocab_size=vocab)
    assert list(one_batch["exaccerr"].values()) == pytest.approx(ref["exaccerr"])
    assert list(one_batch["exaccerr_regret_student"].values()) == pytest.approx(ref["regret_student"])
    assert list(one_batch["exaccerr_regret_teacher"].values()) == pytest.approx(ref["regret_teacher"])
    assert all(v > 0 for v in res["exaccerr_regret_student"].values())
    json.dumps(res, allow_nan=False)  # strict JSON: no NaN/inf


def test_pooled_exaccerr_weights_batches_by_prompts():
    # batch 1: 1 prompt with R = [1, 3], l eps = [1, 2]; batch 2: 3 prompts with R = [2, 2], l eps = [1, 1]
    kl_s, kl_t = evaluation.pooled_increments([(1, [1.0, 3.0], [1.0, 2.0]), (3, [2.0, 2.0], [1.0, 1.0])])
    assert kl_s.tolist() == pytest.approx([1.75, 0.5]) and kl_t.tolist() == pytest.approx([1.0, 0.25])
    out = exaccerr_from_regrets(kl_s, kl_t, [2])
    assert out["regret_student"] == pytest.approx([2.25])
    assert out["exaccerr"] == pytest.approx([100 * (2.25 - 1.25) / 1.25])


def test_test_loss_is_the_mean_token_nll(models):
    _, student, tok, items = models
    q = reference_rows(student, items, len(tok))
    gold = torch.tensor([t for it in items for t in it.response_ids])
    expected = F.cross_entropy(q, gold).item()
    loss = evaluation.test_loss(student, items, tok, 4, RUNTIME.device, RUNTIME.autocast())
    assert loss == pytest.approx(expected, rel=1e-5)


def test_analysis_only_for_students_with_the_analysis_on(models):
    teacher, student, tok, items = models
    assert "top1" not in evaluate(student, tok, items, eval_cfg(), RUNTIME, len(tok), teacher=None)
    off = eval_cfg(analysis={"enabled": False})
    assert "top1" not in evaluate(student, tok, items, off, RUNTIME, teacher=teacher)
    capped = evaluate(student, tok, items, eval_cfg(analysis={"max_examples": 2}), RUNTIME, len(tok), teacher=teacher)
    assert capped["analysis_examples"] == 2
    assert capped["analysis_tokens"] == sum(len(it.response_ids) for it in items[:2])


def test_sampled_evaluation_is_reproducible_per_seed(models):
    _, student, tok, items = models
    cfg = eval_cfg(do_sample=True, seeds=[3, 7], analysis={"enabled": False})
    rng = torch.get_rng_state()
    first = evaluate(student, tok, items, cfg, RUNTIME)
    assert torch.equal(torch.get_rng_state(), rng), "evaluation must not move the global RNG"
    again = evaluate(student, tok, items, cfg, RUNTIME)
    alone = evaluate(student, tok, items, eval_cfg(do_sample=True, seeds=[7], analysis={"enabled": False}), RUNTIME)
    assert set(first["per_seed"]) == {"3", "7"}
    assert first["per_seed"] == again["per_seed"] and first["samples"] == again["samples"]
    assert alone["per_seed"]["7"] == first["per_seed"]["7"]
    assert first["rougeL"] == pytest.approx((first["per_seed"]["3"]["rougeL"] + first["per_seed"]["7"]["rougeL"]) / 2)
    assert first["rougeL_per_seed"] == [first["per_seed"][s]["rougeL"] for s in ("3", "7")]
    texts = {s: generate_texts(student, tok, items, cfg, RUNTIME.device, s, "t") for s in (3, 7)}
    assert texts[3] != texts[7]
    assert texts[3] == generate_texts(student, tok, items, cfg, RUNTIME.device, 3, "t")
    # every batch draws from its own stream: the same prompt in batch 0 and batch 1 samples differently
    same = [items[0]] * 8
    out = generate_texts(student, tok, same, eval_cfg(do_sample=True, batch_size=4, max_new_tokens=12), RUNTIME.device,
                         3, "t")
    assert out[:4] != out[4:]


# --- python -m kdlab.eval -------------------------------------------------------------------------
SMOKE = ["+experiment=smoke", "train.max_steps=2", "train.eval_every=2", "train.save_every=2",
         "train.select_best=false", "eval.models=[student]"]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("train")
    run_kdlab(*SMOKE, f"hydra.run.dir={run_dir}")
    return run_dir


def test_eval_cli_reproduces_the_training_jobs_evaluation(trained, tmp_path):
    out = tmp_path / "eval"
    proc = run_kdlab("+experiment=smoke", f"student.path={trained / 'student'}", f"hydra.run.dir={out}",
                     module="kdlab.eval")
    res = json.loads((out / "results.json").read_text())
    assert res["run"]["status"] == "completed" and res["run"]["teacher"] == "tiny"
    assert set(res["eval"]) == {"student"} and set(res["eval"]["student"]) == {"synthetic"}
    ours = res["eval"]["student"]["synthetic"]
    theirs = json.loads((trained / "results.json").read_text())["eval"]["student"]["synthetic"]
    for key in ("rougeL", "exact_match", "dist4", "loss", "top1", "kl", "num_examples"):
        assert ours[key] == pytest.approx(theirs[key], rel=1e-5), key
    assert ours["exaccerr"] == pytest.approx(theirs["exaccerr"], rel=1e-4)
    assert len(ours["unc_buckets"]) == 4 and "ExAccErr l=16" in proc.stdout
    assert "| student | synthetic |" in proc.stdout and (out / "results.md").exists()
    again = run_kdlab("+experiment=smoke", f"student.path={trained / 'student'}", f"hydra.run.dir={out}",
                      module="kdlab.eval")
    assert "already complete" in again.stdout


def test_eval_cli_without_a_path_gives_the_training_jobs_reference_rows(tmp_path):
    """A pruned student and a fine-tuned teacher, as a training job with the same config and output_dir builds
    them (reused from its stores, not rebuilt): kdlab.eval's teacher and student rows equal the job's teacher and
    student_init rows."""
    common = ["+experiment=smoke", "teacher.finetune={max_steps:2,batch_size:4,save_every:2}", "student.init=pruned",
              "student.prune={num_layers:1,num_attention_heads:2}", f"output_dir={tmp_path}"]
    run_kdlab(*common, "train.max_steps=1", "train.eval_every=1", "train.save_every=1",
              "eval.models=[teacher,student_init]", f"hydra.run.dir={tmp_path / 'train'}")
    proc = run_kdlab(*common, "eval.models=[teacher,student]", f"hydra.run.dir={tmp_path / 'eval'}",
                     module="kdlab.eval")
    assert "kdlab: pruned" not in proc.stdout and "kdlab: fine-tuning teacher" not in proc.stdout
    ours = json.loads((tmp_path / "eval" / "results.json").read_text())["eval"]
    theirs = json.loads((tmp_path / "train" / "results.json").read_text())["eval"]
    for mine, job in (("teacher", "teacher"), ("student", "student_init")):
        for key in ("rougeL", "loss", "top1", "kl"):
            if key in theirs[job]["synthetic"]:
                expected = theirs[job]["synthetic"][key]
                assert ours[mine]["synthetic"][key] == pytest.approx(expected, rel=1e-5), (mine, key)
    assert len(list((tmp_path / "students").glob("*/prune.json"))) == 1
    assert len(list((tmp_path / "teachers").glob("*/finetune.json"))) == 1


def test_eval_cli_on_real_sets_without_teacher(trained, tmp_path, shared_data):
    out = tmp_path / "eval"
    # byte-level tiny model: only short prompts fit its 512 positions; unni with limits of its own
    run_kdlab("student=tiny", f"student.path={trained / 'student'}", "dataset=sni",
              "eval.datasets={unni:{max_prompt_length:470,max_length:510}}",
              "eval.test_examples=8", "dataset.max_prompt_length=470", "dataset.max_length=510",
              "eval.max_new_tokens=8", "eval.analysis.enabled=false", f"hydra.run.dir={out}", module="kdlab.eval")
    res = json.loads((out / "results.json").read_text())
    assert res["run"]["teacher"] is None and res["run"]["datasets"] == ["sni", "unni"]
    for data, n in (("sni", 3), ("unni", 3)):  # of the first 8 rows, 3 prompts each fit 470 bytes
        m = res["eval"]["student"][data]
        assert m["num_examples"] == n and 0 <= m["rougeL"] <= 100 and m["loss"] > 0 and "top1" not in m
        assert res["data"]["test"][data]["dropped"] == 8 - n and res["data"]["test"][data]["max_length"] == 510


def test_per_row_scores_pair_rows_by_id_and_average_to_the_reported_means(models):
    _, student, tok, items = models
    named = [copy.copy(it) for it in items]
    for i, it in enumerate(named):
        it.example = {**it.example, "id": f"row-{i}"}
    refs = [[it.example["output"]] for it in named]
    off = {"analysis": {"enabled": False}}
    for cfg in (eval_cfg(**off), eval_cfg(do_sample=True, seeds=[3, 7], **off)):
        result = evaluate(student, tok, named, cfg, RUNTIME)
        rows = result["per_row"]
        assert rows["id"] == [f"row-{i}" for i in range(len(named))]
        seeds = list(cfg.seeds) if cfg.do_sample else [None]
        texts = [generate_texts(student, tok, named, cfg, RUNTIME.device, s, "t") for s in seeds]
        for i in range(len(named)):  # a row's score is its mean over the sampling seeds
            assert rows["rougeL"][i] == pytest.approx(
                sum(rouge_l_per_example([t[i]], [refs[i]])[0] for t in texts) / len(seeds))
            assert rows["exact_match"][i] == pytest.approx(
                sum(100.0 * (normalize_answer(t[i]) == normalize_answer(refs[i][0])) for t in texts) / len(seeds))
        for key in ("rougeL", "exact_match"):
            assert result[key] == pytest.approx(sum(rows[key]) / len(named))
    # without an id the row's position in the evaluated set names it
    assert evaluate(student, tok, items[:2], eval_cfg(**off), RUNTIME)["per_row"]["id"] == ["0", "1"]
