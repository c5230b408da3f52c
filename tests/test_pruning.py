"""student.init=pruned (kdlab.pruning): importances against a slow reference written from the papers' definitions,
exact logits when nothing is pruned, GQA groups, the depth criteria against hand computations, the shared store
(reuse, sweeps, a killed pruning), bad shapes refused before the teacher loads, and the shape scripts (kept runs,
the RESULTS.md table reproduced from them)."""
import math
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from transformers import AutoModelForCausalLM, GPT2Config, LlamaConfig

from conftest import run_kdlab
from kdlab.cli import CONF_DIR, validate_config
from kdlab.config import ConfigError, content_key
from kdlab.data import Encoded, collate
from kdlab.pruning import (Shape, block_removal_losses, calibration_loss, kept_blocks, measure_importance, prune_model,
                           prune_plan, pruned_student, target_shape)

PAD = 0


def tiny_llama(heads=6, kv=2, layers=3, hidden=48, inter=40, seed=0):
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=50, hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
                         num_key_value_heads=kv, intermediate_size=inter, max_position_embeddings=64,
                         tie_word_embeddings=True, pad_token_id=PAD)
    return AutoModelForCausalLM.from_config(config).eval()


def tiny_gpt2(seed=0):
    torch.manual_seed(seed)
    config = GPT2Config(vocab_size=50, n_embd=32, n_layer=3, n_head=4, n_inner=24, n_positions=64, pad_token_id=PAD)
    return AutoModelForCausalLM.from_config(config).eval()


def rows(n=5, seed=1):
    g = torch.Generator().manual_seed(seed)
    out = []
    for i in range(n):
        prompt = torch.randint(1, 50, (3 + i,), generator=g).tolist()
        response = torch.randint(1, 50, (2 + (i * 3) % 5,), generator=g).tolist()
        out.append(Encoded(prompt, response, {}))
    return out


class Tok:
    pad_token_id = PAD

    def __len__(self):
        return 50


MODELS = {"llama-gqa": tiny_llama, "gpt2": tiny_gpt2}


# ---- the slow reference: one unpadded row at a time, hooks, the definitions computed by hand, Python loops ----

def reference_importance(model, items, aggregation):
    gpt2 = model.config.model_type == "gpt2"
    blocks = model.transformer.h if gpt2 else model.model.layers
    n_heads = model.config.n_head if gpt2 else model.config.num_attention_heads
    head_dim = (model.config.n_embd // n_heads) if gpt2 else model.config.head_dim
    captured = {}

    def keep(name):
        def hook(module, args, kwargs, output):
            captured[name] = (args[0] if args else kwargs["hidden_states"])[0], \
                (output[0] if isinstance(output, tuple) else output)[0]
        return hook

    handles = []
    for i, b in enumerate(blocks):
        handles.append(b.register_forward_hook(keep(f"block{i}"), with_kwargs=True))
        attn_out = b.attn.c_proj if gpt2 else b.self_attn.o_proj
        mlp = b.mlp
        handles.append(attn_out.register_forward_hook(keep(f"attn{i}"), with_kwargs=True))
        handles.append(mlp.register_forward_hook(keep(f"mlp{i}"), with_kwargs=True))
        for j, norm in enumerate((b.ln_1, b.ln_2) if gpt2 else (b.input_layernorm, b.post_attention_layernorm)):
            handles.append(norm.register_forward_hook(keep(f"norm{i}.{j}"), with_kwargs=True))
    final = model.transformer.ln_f if gpt2 else model.model.norm
    handles.append(final.register_forward_hook(keep("final"), with_kwargs=True))

    def norm_by_hand(module, x):
        if gpt2:
            mu, var = x.mean(-1, keepdim=True), x.var(-1, unbiased=False, keepdim=True)
            return (x - mu) / torch.sqrt(var + module.eps) * module.weight + module.bias
        return x / torch.sqrt((x ** 2).mean(-1, keepdim=True) + module.variance_epsilon) * module.weight

    L = len(blocks)
    per_token = {"heads": [[] for _ in range(L)], "neurons": [[] for _ in range(L)], "channels": [],
                 "cos": [[] for _ in range(L)]}
    last = [[] for _ in range(L + 1)]
    with torch.no_grad():
        for it in items:
            ids = torch.tensor([it.prompt_ids + it.response_ids])
            model.base_model(input_ids=ids)
            channel_rows = []
            for i, b in enumerate(blocks):
                attn_in, _ = captured[f"attn{i}"]
                per_token["heads"][i] += [[float(attn_in[t, h * head_dim:(h + 1) * head_dim].norm())
                                           for h in range(n_heads)] for t in range(attn_in.shape[0])]
                x, _ = captured[f"mlp{i}"]
                act = (b.mlp.act(b.mlp.c_fc(x)) if gpt2 else b.mlp.act_fn(b.mlp.gate_proj(x)) * b.mlp.up_proj(x))
                per_token["neurons"][i] += act.tolist()
                for j, norm in enumerate((b.ln_1, b.ln_2) if gpt2 else (b.input_layernorm, b.post_attention_layernorm)):
                    channel_rows.append(norm_by_hand(norm, captured[f"norm{i}.{j}"][0]))
                x_in, x_out = captured[f"block{i}"]
                per_token["cos"][i] += [float(torch.dot(x_in[t], x_out[t]) / (x_in[t].norm() * x_out[t].norm()))
                                        for t in range(x_in.shape[0])]
                if i == 0:
                    last[0].append(x_in[-1])
                last[i + 1].append(x_out[-1])
            channel_rows.append(norm_by_hand(final, captured["final"][0]))
            per_token["channels"].append(channel_rows)
    for h in handles:
        h.remove()

    def reduce(values):   # values: [token][unit]
        units = len(values[0])
        if aggregation == "mean":
            return [sum(abs(v[u]) for v in values) / len(values) for u in range(units)]
        return [math.sqrt(sum(v[u] ** 2 for v in values) / len(values)) for u in range(units)]

    n_norms = 2 * L + 1
    channels = [0.0] * model.config.hidden_size if not gpt2 else [0.0] * model.config.n_embd
    for k in range(n_norms):
        tokens = [row for item in per_token["channels"] for row in item[k].tolist()]
        channels = [a + b for a, b in zip(channels, reduce(tokens))]

    def angle(a, b):
        return math.acos(max(-1.0, min(1.0, float(torch.dot(a, b) / (a.norm() * b.norm()))))) / math.pi

    angular = [[sum(angle(a, b) for a, b in zip(last[l], last[l + n])) / len(items) for n in range(1, L - l + 1)]
               for l in range(L)]
    return {"heads": [reduce(per_token["heads"][i]) for i in range(L)],
            "neurons": [reduce(per_token["neurons"][i]) for i in range(L)], "channels": channels,
            "block_influence": [1 - sum(c) / len(c) for c in per_token["cos"]], "angular": angular}


@pytest.mark.parametrize("aggregation", ["mean", "l2"])
@pytest.mark.parametrize("arch", sorted(MODELS))
def test_importances_equal_a_slow_reference_computed_with_hooks(arch, aggregation):
    model, items = MODELS[arch](), rows()
    fast = measure_importance(model, items, PAD, aggregation, batch_size=3)   # padded batches
    slow = reference_importance(model, items, aggregation)
    for key in ("heads", "neurons", "angular"):
        for a, b in zip(fast[key], slow[key]):
            assert a == pytest.approx(b, rel=1e-4, abs=1e-6), key
    for key in ("channels", "block_influence"):
        assert fast[key] == pytest.approx(slow[key], rel=1e-4, abs=1e-6), key


def full_target(model):
    shape = Shape.of(model.config)
    return shape, target_shape({}, shape)


@pytest.mark.parametrize("arch", sorted(MODELS))
def test_nothing_pruned_gives_the_teachers_logits_exactly(arch):
    model, items = MODELS[arch](), rows()
    shape, target = full_target(model)
    student = prune_model(model, prune_plan(measure_importance(model, items, PAD, "mean", 2), shape, target,
                                            "block_influence")).eval()
    batch = collate(items, PAD)
    with torch.no_grad():
        assert torch.equal(student(batch.input_ids, attention_mask=batch.attention_mask).logits,
                           model(batch.input_ids, attention_mask=batch.attention_mask).logits)


def head_outputs(model, ids):
    """The input of each block's attention output projection: the heads' outputs, side by side."""
    out = []
    gpt2 = model.config.model_type == "gpt2"
    layers = model.transformer.h if gpt2 else model.model.layers
    handles = [(b.attn.c_proj if gpt2 else b.self_attn.o_proj).register_forward_pre_hook(
        lambda _, args: out.append(args[0])) for b in layers]
    with torch.no_grad():
        model(ids)
    for h in handles:
        h.remove()
    return out


@pytest.mark.parametrize("heads,kv,target,kept_kv", [(6, 2, 4, 2), (6, 2, 2, 2), (12, 3, 4, 1), (6, 6, 3, 3)])
def test_gqa_every_kept_query_head_keeps_its_key_value_group(heads, kv, target, kept_kv):
    model = tiny_llama(heads=heads, kv=kv, hidden=heads * 8)
    shape = Shape.of(model.config)
    want = target_shape({"num_attention_heads": target}, shape)
    assert (want.num_attention_heads, want.num_key_value_heads, want.head_dim) == (target, kept_kv, shape.head_dim)
    plan = prune_plan(measure_importance(model, rows(), PAD, "mean", 2), shape, want, "block_influence")
    group = heads // kv
    for kept, groups in zip(plan["heads"], plan["kv_heads"]):
        assert sorted({h // group for h in kept}) == groups              # every kept head's group is kept
        assert all(sum(h // group == g for h in kept) == target // kept_kv for g in groups)
    student = prune_model(model, plan)
    assert (student.config.num_attention_heads, student.config.num_key_value_heads) == (target, kept_kv)
    # the first block sees the teacher's input: each kept head computes exactly what it computed in the teacher
    # (its own query, its group's key and value)
    ids = torch.tensor([rows()[3].prompt_ids + rows()[3].response_ids])
    d = shape.head_dim
    t, s = head_outputs(model, ids)[0], head_outputs(student, ids)[0]
    torch.testing.assert_close(s, torch.cat([t[..., h * d:(h + 1) * d] for h in plan["heads"][0]], dim=-1),
                               rtol=1e-5, atol=1e-6)


def test_gpt2_heads_and_hidden_shrink_together_and_the_width_plan_is_used():
    model = tiny_gpt2()
    shape = Shape.of(model.config)
    target = target_shape({"num_attention_heads": 2, "hidden_size": 16, "intermediate_size": 10}, shape)
    importance = measure_importance(model, rows(), PAD, "mean", 2)
    plan = prune_plan(importance, shape, target, "block_influence")
    student = prune_model(model, plan)
    c = student.config
    assert (c.n_head, c.n_embd, c.n_inner, c.n_layer) == (2, 16, 10, 3)
    t, s = model.transformer, student.transformer
    ch, neurons = plan["channels"], plan["neurons"][1]
    assert torch.equal(s.wpe.weight, t.wpe.weight[:, ch]) and torch.equal(s.ln_f.bias, t.ln_f.bias[ch])
    assert torch.equal(s.h[1].mlp.c_fc.weight, t.h[1].mlp.c_fc.weight[ch][:, neurons])
    q_cols = [h * 8 + i for h in plan["heads"][1] for i in range(8)]
    assert torch.equal(s.h[1].attn.c_attn.weight[:, 16:32], t.h[1].attn.c_attn.weight[ch][:, [32 + q for q in q_cols]])
    top = sorted(range(len(importance["channels"])), key=lambda i: -importance["channels"][i])[:16]
    assert ch == sorted(top)
    with pytest.raises(ConfigError, match="hidden_size = num_attention_heads x 8"):
        target_shape({"num_attention_heads": 2}, shape)


def test_block_influence_and_angular_pick_what_a_hand_computation_picks():
    # BI: drop the lowest; angular: the contiguous run of n whose d(x^l, x^{l+n}) is smallest
    importance = {"block_influence": [0.9, 0.1, 0.5, 0.05, 0.7, 0.3],
                  "angular": [[0.5, 0.6, 0.7, 0.8, 0.9, 1.0], [0.4, 0.2, 0.6, 0.7, 0.8], [0.3, 0.25, 0.5, 0.6],
                              [0.1, 0.3, 0.4], [0.45, 0.5], [0.35]]}
    assert kept_blocks(importance, "block_influence", 4) == [0, 2, 4, 5]
    assert kept_blocks(importance, "block_influence", 6) == list(range(6))
    assert kept_blocks(importance, "angular", 5) == [0, 1, 2, 4, 5]       # n=1: block 3 (0.1)
    assert kept_blocks(importance, "angular", 4) == [0, 3, 4, 5]          # n=2: blocks 1, 2 (0.2)
    assert kept_blocks(importance, "angular", 3) == [0, 1, 2]             # n=3: 3..5 (0.4) vs 0..2 .7, 1..3 .6, 2..4 .5
    importance["block_removal_loss"] = [3.0, 2.1, 2.5, 2.0, 2.9, 2.2]
    assert kept_blocks(importance, "loss", 3) == [0, 2, 4]


def test_the_loss_criterion_measures_each_blocks_removal_as_a_hand_built_model_does():
    model, items, tok = tiny_llama(layers=4), rows(), Tok()
    losses = block_removal_losses(model, items, tok, batch_size=2)
    shape, target = full_target(model)
    full = prune_plan(measure_importance(model, items, PAD, "mean", 2), shape, target, "block_influence")
    for drop in range(4):
        keep = [i for i in range(4) if i != drop]
        plan = {**full, "layers": keep, "heads": [full["heads"][i] for i in keep],
                "kv_heads": [full["kv_heads"][i] for i in keep], "neurons": [full["neurons"][i] for i in keep]}
        assert losses[drop] == pytest.approx(calibration_loss(prune_model(model, plan), items, tok, 2), rel=1e-5)
    assert len(set(losses)) == 4 and calibration_loss(model, items, tok, 2) not in losses


def test_unsupported_architectures_and_bad_shapes_are_refused_in_one_line():
    from transformers import MistralConfig

    with pytest.raises(ConfigError, match="supports the llama family .* and GPT-2") as err:
        Shape.of(MistralConfig())
    assert "\n" not in str(err.value)
    shape = Shape.of(tiny_llama().config)   # 3 blocks, hidden 48, 6 heads / 2 key-value heads
    for bad, match in (({"num_layers": 4}, "num_layers=4 is more than the teacher's 3"),
                       ({"num_attention_heads": 5}, "neither a multiple of the teacher's 2 key/value groups"),
                       ({"hidden_size": 40}, "hidden_size=40 is not divisible by 6 attention heads"),
                       ({"intermediate_size": 41}, "intermediate_size=41 is more than")):
        with pytest.raises(ConfigError, match=match) as err:
            target_shape(bad, shape)
        assert "\n" not in str(err.value)


def config(tmp_path, *overrides):
    with initialize_config_dir(CONF_DIR, version_base="1.3"):
        return compose("config", overrides=["+experiment=smoke", "student.init=pruned", f"output_dir={tmp_path}",
                                            *overrides])


@pytest.mark.parametrize("override,match", [
    ("student.prune={num_layers:3}", "num_layers=3 is more than the teacher's 2"),
    ("student.prune={num_attention_heads:3} +teacher.random.num_kv_heads=2", "neither a multiple of the teacher's 2"),
    ("student.prune={hidden_size:50,num_attention_heads:4}", "hidden_size=50 is not divisible by"),
    ("student.prune={depth:3}", "student.prune.depth is not a known key"),
    ("student.prune=null", "needs student.prune"),
])
def test_bad_shapes_are_refused_before_the_teacher_loads(tmp_path, monkeypatch, override, match):
    import kdlab.student
    from kdlab.hardware import setup_runtime

    def no_loading(*_):
        raise AssertionError("the teacher was loaded")
    monkeypatch.setattr(kdlab.student, "load_teacher", no_loading)
    cfg = config(tmp_path, *override.split())
    with pytest.raises(ConfigError, match=match) as err:
        validate_config(cfg)
        kdlab.student.load_models(cfg, setup_runtime(cfg.hardware))
    assert "\n" not in str(err.value)


def test_a_killed_pruning_leaves_nothing_that_looks_complete_and_the_rerun_builds_it(tmp_path, monkeypatch):
    import kdlab.pruning
    from kdlab.hardware import setup_runtime
    from kdlab.modeling import byte_tokenizer, random_model

    cfg = config(tmp_path, "student.prune={num_layers:1,intermediate_size:64}")
    tok = byte_tokenizer()
    teacher = random_model(cfg.teacher.random, len(tok)).eval()
    items = rows()
    real = kdlab.pruning.atomic_write_json

    def killed(path, obj):
        if path.name == "prune.json":
            raise KeyboardInterrupt
        real(path, obj)
    monkeypatch.setattr(kdlab.pruning, "atomic_write_json", killed)
    runtime = setup_runtime(cfg.hardware)
    with pytest.raises(KeyboardInterrupt):
        pruned_student(cfg, runtime, teacher, tok, items)
    students = tmp_path / "students"
    assert not list(students.glob("*/prune.json")) and not [p for p in students.iterdir() if p.is_dir()]
    monkeypatch.setattr(kdlab.pruning, "atomic_write_json", real)
    student = pruned_student(cfg, runtime, teacher, tok, items)
    assert student.training and student.config.num_hidden_layers == 1 and student.config.intermediate_size == 64
    assert len(list(students.glob("*/prune.json"))) == 1


def test_a_pruned_student_is_shared_by_a_second_job_and_a_two_job_sweep(tmp_path):
    prune = ["+experiment=smoke", "student.init=pruned", "student.prune={num_layers:1,num_attention_heads:2}",
             f"output_dir={tmp_path}", "report.teacher=false"]
    first = run_kdlab(*prune, module="kdlab.prune")
    assert first.stdout.count("kdlab: pruned tiny") == 1 and "2 heads / 2 key-value heads" in first.stdout
    folders = [p for p in (tmp_path / "students").iterdir() if (p / "prune.json").exists()]
    assert len(folders) == 1
    second = run_kdlab(*prune, module="kdlab.prune")
    assert "kdlab: pruned" not in second.stdout and "measuring" not in second.stdout
    sweep = run_kdlab("-m", *prune[:-1], "method=sft", "seed=1,2", "eval.models=[student_init]")
    assert "kdlab: pruned" not in sweep.stdout
    sweep_other = run_kdlab("-m", *prune[:2], "student.prune={num_layers:1,intermediate_size:64}",
                            f"output_dir={tmp_path / 'b'}", "method=sft", "seed=1,2", "eval.models=[student_init]")
    assert sweep_other.stdout.count("kdlab: pruned tiny") == 1
    assert len([p for p in (tmp_path / "b" / "students").iterdir() if (p / "prune.json").exists()]) == 1


def test_content_key_is_one_hash_of_the_components_whatever_their_order():
    assert content_key({"a": 1, "b": [1, 2]}) == content_key({"b": [1, 2], "a": 1})
    assert content_key({"a": 1}) != content_key({"a": 2}) and len(content_key({"a": 1})) == 12


def test_kdlab_prune_cuts_a_gpt2_teacher_and_reports_sizes_and_losses(tmp_path):
    import json

    out = run_kdlab("+experiment=smoke", "teacher=tiny-gpt2", "student=tiny-gpt2", "student.init=pruned",
                    "student.prune={num_layers:1,num_attention_heads:2,hidden_size:32,intermediate_size:16}",
                    f"output_dir={tmp_path}", module="kdlab.prune")
    report = json.loads(out.stdout.strip().splitlines()[-1])
    assert report["shape"] == {"arch": "gpt2", "num_layers": 1, "hidden_size": 32, "intermediate_size": 16,
                               "num_attention_heads": 2, "num_key_value_heads": 2, "head_dim": 16}
    assert report["student_block_params"] < report["teacher_block_params"] < report["teacher_params"]
    assert set(report["student_loss"]) == set(report["teacher_loss"]) == {"calibration", "valid", "test"}
    assert "transformer blocks" in out.stdout and "calibration loss" in out.stdout


def test_source_finetuned_prunes_the_fine_tuned_teacher(tmp_path):
    from safetensors.torch import load_file

    ft = "teacher.finetune={max_steps:4,lr:3e-2,batch_size:4,save_every:4}"
    common = ["+experiment=smoke", ft, "student.init=pruned", f"output_dir={tmp_path}", "report.teacher=false",
              "report.splits=[calibration]"]
    run_kdlab(*common, "student.prune={num_layers:1,source:finetuned}", module="kdlab.prune")
    run_kdlab(*common, "student.prune={num_layers:1,source:teacher}", module="kdlab.prune")
    teacher_dir = next(p for p in (tmp_path / "teachers").iterdir() if (p / "finetune.json").exists())
    embedding = "model.embed_tokens.weight"
    finetuned = load_file(teacher_dir / "model.safetensors")[embedding]
    students = {json_source(p): load_file(p / "model.safetensors")[embedding]
                for p in (tmp_path / "students").iterdir() if (p / "prune.json").exists()}
    assert torch.equal(students["finetuned"], finetuned) and not torch.equal(students["teacher"], finetuned)


def json_source(folder):
    import json

    return json.loads((folder / "prune.json").read_text())["components"]["prune"]["source"]


ROOT = Path(CONF_DIR).parent   # scripts/ and RESULTS.md


def test_shapes_script_keeps_finished_runs_and_skips_kept_ones(tmp_path):
    """scripts/shapes-dolly.sh with a stand-in interpreter that 'trains' by writing a run folder: a row kept in
    $KEPT is not run again, a row that finishes gets its small files kept, a row that fails keeps nothing."""
    import os
    import subprocess

    out, kept = tmp_path / "out", tmp_path / "kept"
    fake = tmp_path / "python"
    fake.write_text(f"""#!/bin/sh
echo "$*" >> {tmp_path / 'calls'}
for a in "$@"; do case "$a" in run_name=*) run=${{a#run_name=}};; esac; done
[ "$run" = shape-bi-8-sft ] && exit 1
mkdir -p {out}/runs/$run/o
for f in metrics.jsonl config.yaml results.json; do echo "$run $f" > {out}/runs/$run/o/$f; done
""")
    fake.chmod(0o755)
    (kept / "shape-even-15-sft").mkdir(parents=True)
    (kept / "shape-even-15-sft" / "results.json").write_text("kept before")
    done = subprocess.run(["bash", "scripts/shapes-dolly.sh", "sft", "even-15", "even-8", "bi-8"], cwd=ROOT,
                          env={**os.environ, "PYTHON": str(fake), "OUT": str(out), "KEPT": str(kept)},
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 1   # bi-8 failed
    runs = [line.split("run_name=")[1].split()[0] for line in (tmp_path / "calls").read_text().splitlines()]
    assert runs == ["shape-even-8-sft", "shape-bi-8-sft"]
    assert (kept / "shape-even-15-sft" / "results.json").read_text() == "kept before"
    assert sorted(p.name for p in (kept / "shape-even-8-sft").iterdir()) == ["config.yaml", "metrics.jsonl",
                                                                          "results.json"]
    assert (kept / "shape-even-8-sft" / "results.json").read_text() == "shape-even-8-sft results.json\n"
    assert not (kept / "shape-bi-8-sft").exists()


def test_shapes_table_in_results_is_reproduced_from_the_kept_runs():
    """RESULTS.md's "Pruned students after 150 steps" table is what scripts/shapes-table.py prints from the
    committed kept runs (results/shapes-dolly/) and prune rows alone: no number in it needs a lost run folder."""
    import re
    import subprocess
    import sys

    printed = subprocess.run([sys.executable, "scripts/shapes-table.py", "results/shapes-dolly"], cwd=ROOT,
                             capture_output=True, text=True, timeout=120, check=True).stdout
    results = (ROOT / "RESULTS.md").read_text()
    block = re.search(r"<!-- scripts/shapes-table.py results/shapes-dolly -->\n(.*?)<!-- end -->", results, re.S)
    assert block is not None, "RESULTS.md lost the table's markers"
    assert block.group(1) == printed


def test_shapes_table_compares_each_shape_with_the_even_cut_nearest_in_size(tmp_path):
    """scripts/shapes-table.py: a shape is compared with the ``--against`` shape nearest to it in block
    parameters (a 25 % shape with the 8-block cut, a 50 % one with the 15-block cut), paired over the rows both
    scored; the machine of each run is listed."""
    import json
    import subprocess
    import sys

    sizes = {"even-15": 50, "even-8": 27, "bi-15": 50, "small": 25}
    gains = {"even-15": 10.0, "even-8": 4.0, "bi-15": 13.0, "small": 6.5}
    prune_rows = tmp_path / "prune.jsonl"
    shape = {"num_layers": 1, "num_attention_heads": 9, "num_key_value_heads": 3, "intermediate_size": 1}
    prune_rows.write_text("".join(json.dumps({"student": name, "student_params": size + 28,
                                              "student_block_params": size, "shape": shape}) + "\n"
                                  for name, size in sizes.items()))
    for name, gain in gains.items():
        run = tmp_path / "kept" / f"shape-{name}-sft"
        run.mkdir(parents=True)
        scores = {split: {"rougeL": gain, "loss": 3.0, "per_row": {"id": [0, 1, 2], "rougeL": [gain - 1, gain,
                                                                                              gain + 1]}}
                  for split in ("valid", "dolly")}
        (run / "results.json").write_text(json.dumps({"run": {"machine": f"cpu-{name}"},
                                                      "eval": {"student_init": scores, "student": scores}}))
        (run / "metrics.jsonl").write_text('{"step": 1, "train/step_time_s": 2.0}\n')
    printed = subprocess.run([sys.executable, "scripts/shapes-table.py", str(tmp_path / "kept"), "--prune-rows",
                              str(prune_rows)], cwd=ROOT, capture_output=True, text=True, timeout=120,
                             check=True).stdout
    assert "| small | sft | even-8 | +2.50 [+2.50, +2.50] (3 rows) | +2.50 [+2.50, +2.50] (3 rows) |" in printed
    assert "| bi-15 | sft | even-15 | +3.00 [+3.00, +3.00] (3 rows) | +3.00 [+3.00, +3.00] (3 rows) |" in printed
    assert "| even-8 | sft |" not in printed and "- cpu-small: small sft" in printed
