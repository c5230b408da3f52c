"""OKD (kdlab/methods/okd.py): which parameters move, which loss feeds which gradient, the KL directions,
alpha = 0, the equivalence with KD when the module is frozen, saving/resuming the module, learning, and
LoRA where the paper puts it (Sec. V-A: q and v of every block; on GPT-2 the q and v columns of c_attn)."""
import pytest
import torch
import torch.nn.functional as F
from omegaconf import OmegaConf
from peft import PeftModel

from kdlab.checkpoint import load_checkpoint, restore_params, save_checkpoint
from kdlab.config import ConfigError
from kdlab.data import Encoded, collate
from kdlab.data.synthetic import make_synthetic
from kdlab.divergences import build_divergence
from kdlab.hardware import Runtime
from kdlab.methods import build_method
from kdlab.methods.base import Context
from kdlab.methods.okd import OKD, adapted_blocks, load_online_module
from kdlab.modeling import byte_tokenizer, layer_list, lora_targets, random_model

ROOT_CONF = OmegaConf.load("conf/method/okd.yaml")
TOK = byte_tokenizer()
V = len(TOK)
ARCHS = ["llama", "gpt2"]
MODULES = ["lora", "prefix", "ptuning"]



def models(arch):
    teacher = random_model({"arch": arch, "hidden_size": 32, "num_layers": 2, "num_heads": 2, "intermediate_size": 64,
                            "max_positions": 256, "seed": 0}, V)
    student = random_model({"arch": arch, "hidden_size": 16, "num_layers": 1, "num_heads": 2, "intermediate_size": 32,
                            "max_positions": 256, "seed": 1}, V)
    for p in teacher.parameters():
        p.requires_grad_(False)
    return teacher.eval(), student.train()


def build(arch="llama", divergence="fkl", teacher_student=None, **overrides):
    teacher, student = teacher_student or models(arch)
    div_cfg = {"name": divergence, **overrides.pop("div", {})}
    cfg = OmegaConf.merge(ROOT_CONF, {"rank": 4, "num_virtual_tokens": 3, "encoder_hidden_size": 16, **overrides})
    ctx = Context(teacher=teacher, student=student, tokenizer=TOK, divergence=build_divergence(div_cfg),
                  runtime=Runtime(torch.device("cpu"), torch.float32), train_cfg=None)
    return build_method(cfg, ctx)


def random_batches(n, seed=0, size=3):
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        items = []
        for _ in range(size):
            p, r = torch.randint(3, 7, (2,), generator=g).tolist()
            items.append(Encoded(torch.randint(0, V - 1, (p,), generator=g).tolist(),
                                 torch.randint(0, V - 1, (r,), generator=g).tolist() + [V - 1], {}))
        out.append(collate(items, V - 1))
    return out


def train(method, batches):
    """The trainer's optimisation: one AdamW per parameter group, one backward of the summed loss."""
    opts = [torch.optim.AdamW(g.params, lr=g.lr, weight_decay=g.weight_decay or 0.0)
            for g in method.param_groups().values()]
    for batch in batches:
        method.loss(batch, 0).loss.backward()
        for opt in opts:
            opt.step()
            opt.zero_grad(set_to_none=True)


def perturb(method, scale=0.5):
    """Make the module non-trivial (LoRA's B starts at zero) so that it changes the teacher's logits."""
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for p in method.module_params:
            p.add_(torch.randn(p.shape, generator=g) * scale)


def module_full_logits(method, batch):
    """Slow reference for teacher + module: peft's own forward, full logits, then the response rows."""
    logits = method.peft(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
    return logits[:, -batch.input_ids.shape[1]:][batch.response_mask][:, :V]


def kl(p_logits, q_logits, tau=1.0):
    """Mean over rows of KL(softmax(p/tau) || softmax(q/tau)), written out."""
    logp, logq = F.log_softmax(p_logits / tau, -1), F.log_softmax(q_logits / tau, -1)
    return (logp.exp() * (logp - logq)).sum(-1).mean()


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("module", MODULES)
def test_training_moves_the_module_and_the_student_but_never_the_teachers_weights(arch, module, tmp_path):
    teacher, student = models(arch)
    base = [(p, p.detach().clone()) for p in teacher.parameters()]
    method = build(teacher_student=(teacher, student), online_module=module, module_lr=1e-2, lr=1e-2)
    assert method.module_params and all(p.requires_grad for p in method.module_params)
    assert {id(p) for p in method.param_groups()["module"].params} == \
        {id(p) for p in method.peft.parameters() if p.requires_grad}
    before = [p.detach().clone() for p in method.module_params]
    student_before = [p.detach().clone() for p in method.student.parameters()]
    train(method, random_batches(2))
    assert all(torch.equal(p, saved) for p, saved in base), "the teacher's base weights changed"
    assert all(not torch.equal(p, b) for p, b in zip(method.module_params, before))
    assert any(not torch.equal(p, b) for p, b in zip(method.student.parameters(), student_before))

    # the efficient response-row logits equal peft's own forward, and the saved module reproduces them
    batch = random_batches(1, seed=5)[0]
    method.peft.eval()
    with torch.no_grad():
        ours = method.teacher_module_logits(batch)
        torch.testing.assert_close(ours, module_full_logits(method, batch))
    method.save(tmp_path)
    assert (tmp_path / "online_module" / "adapter_config.json").exists()
    fresh = load_online_module(models(arch)[0], tmp_path / "online_module").eval()
    assert isinstance(fresh, PeftModel)
    with torch.no_grad():
        reloaded = fresh(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
    torch.testing.assert_close(reloaded[:, -batch.input_ids.shape[1]:][batch.response_mask][:, :V], ours)


@pytest.mark.parametrize("module", MODULES)
def test_each_loss_feeds_only_its_own_model(module):
    method = build(online_module=module, dropout=0.0)
    perturb(method)
    student_params = [p for p in method.student.parameters()]
    s_loss, t_loss, _ = method.objectives(random_batches(1)[0])
    from_s = torch.autograd.grad(s_loss, method.module_params + student_params, allow_unused=True, retain_graph=True)
    from_t = torch.autograd.grad(t_loss, method.module_params + student_params, allow_unused=True)
    n = len(method.module_params)
    assert all(g is None for g in from_s[:n]), "L_s reached the online module"
    assert all(g is None for g in from_t[n:]), "L_t reached the student"
    assert any(g is not None and g.abs().sum() > 0 for g in from_s[n:])
    assert any(g is not None and g.abs().sum() > 0 for g in from_t[:n])


@pytest.mark.parametrize("module", MODULES)
def test_kl_directions_and_temperature_match_the_paper(module):
    """L_s = tau^2 KL(p_ta || p_s) and, at alpha = 1, L_t = tau^2 KL(p_s || p_ta), minimised over the module."""
    tau = 2.0
    method = build(online_module=module, dropout=0.0, alpha=1.0, div={"tau": tau, "scale_by_tau_squared": True})
    perturb(method)
    batch = random_batches(1)[0]
    s_loss, t_loss, _ = method.objectives(batch)
    grads = torch.autograd.grad(t_loss, method.module_params)

    student = method.logits(method.student, batch).detach()
    teacher = module_full_logits(method, batch)
    torch.testing.assert_close(s_loss, tau**2 * kl(teacher.detach(), student, tau))
    reference = tau**2 * kl(student, teacher, tau)
    torch.testing.assert_close(t_loss, reference)
    for g, ref in zip(grads, torch.autograd.grad(reference, method.module_params)):
        torch.testing.assert_close(g, ref)


@pytest.mark.parametrize("module", MODULES)
def test_alpha_zero_trains_the_module_by_pure_mle(module):
    method = build(online_module=module, dropout=0.0, alpha=0.0)
    perturb(method)
    batch = random_batches(1)[0]
    _, t_loss, _ = method.objectives(batch)
    grads = torch.autograd.grad(t_loss, method.module_params)
    reference = F.cross_entropy(module_full_logits(method, batch), batch.labels[batch.response_mask])
    torch.testing.assert_close(t_loss, reference)
    for g, ref in zip(grads, torch.autograd.grad(reference, method.module_params)):
        torch.testing.assert_close(g, ref)


@pytest.mark.parametrize("divergence", ["fkl", "rkl", "jsd"])
def test_with_a_frozen_module_okd_is_kd_with_alpha_one(divergence):
    batches = random_batches(3)
    okd = build(divergence=divergence, module_lr=0.0, lr=1e-2)
    teacher, student = models("llama")
    kd_cfg = OmegaConf.create({"name": "kd", "lr": 1e-2, "alpha": 1.0})
    kd = build_method(kd_cfg, Context(teacher=teacher, student=student, tokenizer=TOK,
                                      divergence=build_divergence({"name": divergence}),
                                      runtime=okd.ctx.runtime, train_cfg=None))
    train(okd, batches)
    train(kd, batches)
    for a, b in zip(okd.student.parameters(), kd.student.parameters()):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


@pytest.mark.parametrize("module", ["prefix", "ptuning"])
def test_a_checkpoint_restores_the_prompt_modules(module, tmp_path):
    method = build(online_module=module, module_lr=1e-2)
    train(method, random_batches(2))
    params = {k: g.params for k, g in method.param_groups().items()}
    save_checkpoint(tmp_path, 2, params, {})
    fresh = build(online_module=module)
    restore_params({k: g.params for k, g in fresh.param_groups().items()}, load_checkpoint(tmp_path)[0])
    batch = random_batches(1, seed=7)[0]
    with torch.no_grad():
        torch.testing.assert_close(fresh.teacher_module_logits(batch), method.teacher_module_logits(batch))


def test_okd_lowers_the_students_divergence_to_the_adapting_teacher_on_held_out_prompts():
    data = make_synthetic(0, {"train": 48, "valid": 8, "test": 0}, None, [1])

    def enc(rows):
        return [Encoded(TOK.encode(ex["instruction"] + "\n"), TOK.encode(ex["output"]) + [V - 1], ex) for ex in rows]

    teacher, student = models("llama")
    with torch.no_grad():  # a peaked teacher: the random one is near uniform, so is every student
        teacher.lm_head.weight.mul_(40)
    method = build(teacher_student=(teacher, student), lr=1e-2, module_lr=1e-3)
    held_out = collate(enc(data["valid"]), V - 1)

    def gap():
        with torch.no_grad():
            method.peft.eval()
            return kl(method.teacher_module_logits(held_out), method.logits(method.student, held_out)).item()

    train_items = enc(data["train"])
    start = gap()
    train(method, [collate(train_items[i:i + 8], V - 1) for i in range(0, 48, 8)] * 2)
    assert gap() < 0.7 * start, (start, gap())


def test_the_modules_dropout_is_on_in_training_and_the_teachers_own_dropout_stays_off():
    method = build("gpt2", dropout=0.5)
    perturb(method)
    method.teacher.eval()  # what evaluation (generation) leaves behind
    method.student.eval()  # GPT-2's own dropout would make the losses differ too
    batch = random_batches(1)[0]
    with torch.no_grad():
        first, second = (method.objectives(batch)[1] for _ in range(2))
    assert first != second
    own = [m for n, m in method.teacher.named_modules() if isinstance(m, torch.nn.Dropout) and "lora_" not in n]
    assert own and not any(m.training for m in own)


def test_lora_targets_default_per_architecture_and_name_the_key_that_sets_them():
    def model(model_type, modules=()):
        return type("M", (), {"config": type("C", (), {"model_type": model_type})(),
                              "named_modules": lambda self: [(name, None) for name in modules]})()
    assert lora_targets(model("llama"), None, "method.target_modules") == (["q_proj", "v_proj"], False)
    assert lora_targets(model("gpt2", ["transformer.h.0.attn.c_proj"]), ["c_proj"],
                        "method.target_modules") == (["c_proj"], True)   # Conv1D
    key = "teacher.finetune.target_modules"
    with pytest.raises(ConfigError, match=rf"^{key} is null .*'bert'.*set {key}=\["):
        lora_targets(model("bert"), None, key)


@pytest.mark.parametrize("arch, targets", [("llama", {"q_proj", "v_proj"}), ("gpt2", {"c_attn"})])
def test_lora_targets_the_attention_projections_of_the_chosen_blocks(arch, targets):
    def adapted(method):
        names = [n for n, p in method.peft.named_parameters() if p.requires_grad]
        return {n.split(".lora_")[0].rsplit(".", 1)[1] for n in names}, {int(n.split(".")[4]) for n in names}

    assert adapted(build(arch)) == (targets, {0, 1})  # the default (the paper's): every block
    assert adapted(build(arch, lora_layers=0.25)) == (targets, {1})  # the last quarter of 2 blocks: ceil(0.5) = 1
    assert adapted(build(arch, lora_layers=1)) == (targets, {1})
    mlp = "up_proj" if arch == "llama" else "c_fc"
    assert adapted(build(arch, target_modules=[mlp], lora_layers=None)) == ({mlp}, {0, 1})


@pytest.mark.parametrize("depth, lora_layers, blocks", [
    (30, 0.25, range(22, 30)), (48, 0.25, range(36, 48)), (30, 0.1, range(27, 30)), (4, 0.5, range(2, 4)),
    (30, 8, range(22, 30)), (4, 10, range(4)), (30, None, None)])
def test_lora_layers_picks_the_last_blocks_by_count_or_fraction(depth, lora_layers, blocks):
    assert adapted_blocks(depth, lora_layers) == (None if blocks is None else list(blocks))


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("lora_layers, graph_blocks", [(None, [0, 1, 2, 3]), (0.25, [3]), (2, [2, 3])])
def test_the_teachers_backward_stops_at_the_lowest_adapted_block(arch, lora_layers, graph_blocks):
    """Why ``lora_layers`` makes OKD cheap: blocks below the lowest adapter are not differentiated."""
    teacher = random_model({"arch": arch, "hidden_size": 32, "num_layers": 4, "num_heads": 2, "intermediate_size": 64,
                            "max_positions": 256, "seed": 0}, V).requires_grad_(False).eval()
    method = build(teacher_student=(teacher, models(arch)[1]), lora_layers=lora_layers)
    in_graph = {}
    for index, block in enumerate(layer_list(method.teacher)):
        block.register_forward_hook(lambda _m, _i, out, index=index: in_graph.__setitem__(
            index, (out[0] if isinstance(out, tuple) else out).requires_grad))
    method.loss(random_batches(1)[0], 0).loss.backward()
    assert [i for i, tracked in sorted(in_graph.items()) if tracked] == graph_blocks
    assert all(p.grad is not None for p in method.module_params)


def test_config_errors_name_the_fix():
    OKD.validate(ROOT_CONF)
    OKD.validate(OmegaConf.merge(ROOT_CONF, {"online_module": "prefix"}))  # the default lora_layers is ignored
    for bad in (1.0, 0, 0.0, -2, 1.5, "half", True):
        with pytest.raises(ConfigError, match=f"method.lora_layers={bad!r} is neither .* set method.lora_layers=0.25"):
            OKD.validate(OmegaConf.merge(ROOT_CONF, {"lora_layers": bad}))
    for good in (0.5, 3, None):
        OKD.validate(OmegaConf.merge(ROOT_CONF, {"lora_layers": good}))
    with pytest.raises(ConfigError, match="method.scaling=0.5 is out of range"):
        OKD.validate(OmegaConf.merge(ROOT_CONF, {"scaling": 0.5}))
    with pytest.raises(ConfigError, match="online_module='adapter' is not valid"):
        OKD.validate(OmegaConf.merge(ROOT_CONF, {"online_module": "adapter"}))


def test_every_block_is_the_default_of_the_method_and_of_every_okd_experiment():
    """The paper's standard LoRA (Sec. V-A) adapts every block: ``lora_layers: null``."""
    from pathlib import Path

    from hydra import compose, initialize_config_dir

    experiments = sorted(p.stem for p in Path("experiments").glob("okd-*.yaml"))
    assert experiments
    with initialize_config_dir(str(Path("conf").resolve()), version_base="1.3"):
        for overrides in [["method=okd"], *([f"+experiment={e}", "method=okd"] for e in experiments)]:
            cfg = compose("config", overrides=[*overrides, "hardware=cpu"])
            assert cfg.method.name == "okd" and cfg.method.lora_layers is None, overrides
            assert cfg.method.target_modules is None and cfg.method.rank == 32, overrides


def gpt2_c_attn_reference(layer, x):
    """Eq. 15 on GPT-2's fused projection, float64: ``[q | k | v] = x W + b`` with ``q += s x A_q^T B_q^T``
    and ``v += s x A_v^T B_v^T``, one rank-r pair each, k never adapted (written from the weights)."""
    base = layer.get_base_layer()
    w, bias = base.weight.double(), base.bias.double()
    a, b = layer.lora_A["default"].weight.double(), layer.lora_B["default"].weight.double()
    r, d, s = layer.r["default"], w.shape[1] // 3, layer.scaling["default"]
    x = x.double()
    q, k, v = (x @ w + bias).split(d, dim=-1)
    return torch.cat([q + s * x @ a[:r].T @ b[:d].T, k, v + s * x @ a[r:].T @ b[d:].T], dim=-1)


def test_gpt2_lora_adapts_only_the_q_and_v_columns_of_c_attn():
    method = build("gpt2", dropout=0.0, scaling=2.0)
    perturb(method)
    layers = [m for n, m in method.teacher.named_modules() if n.endswith("attn.c_attn")]
    assert len(layers) == 2
    hidden, r = 32, 4
    for layer in layers:  # k has no parameters: one rank-r pair for q and one for v
        assert layer.lora_A["default"].weight.shape == (2 * r, hidden)
        assert layer.lora_B["default"].weight.shape == (2 * hidden, r)
    assert sum(p.numel() for p in method.module_params) == 2 * 2 * (2 * r * hidden)

    layer = layers[0]
    x = torch.randn(3, 5, hidden, requires_grad=True)
    out = layer(x)
    with method.peft.disable_adapter():
        plain = layer(x)
    d = hidden
    torch.testing.assert_close(out[..., d:2 * d], plain[..., d:2 * d], rtol=0, atol=0)  # k untouched
    assert (out[..., :d] - plain[..., :d]).abs().min() > 0 and (out[..., 2 * d:] - plain[..., 2 * d:]).abs().min() > 0
    torch.testing.assert_close(out, gpt2_c_attn_reference(layer, x).float())

    # gradients into A, B and the input equal the reference's; the k columns send none into the module
    weights = [layer.lora_A["default"].weight, layer.lora_B["default"].weight]
    g = torch.randn(out.shape)
    ours = torch.autograd.grad(out, [x, *weights], g, retain_graph=True)
    ref = torch.autograd.grad(gpt2_c_attn_reference(layer, x), [x, *weights], g.double())
    for a, b in zip(ours, ref):   # float32 against a float64 reference: an absolute floor for near-zero entries
        torch.testing.assert_close(a, b.float(), rtol=1e-4, atol=1e-5)
    g_k = torch.zeros_like(g)
    g_k[..., d:2 * d] = 1
    assert all(t.abs().max() == 0 for t in torch.autograd.grad(out, weights, g_k))

    # merging writes the same delta into the base weight (peft's merge_and_unload uses get_delta_weight)
    with torch.no_grad():
        merged = method.peft.merge_and_unload()
        torch.testing.assert_close(merged.transformer.h[0].attn.c_attn(x), out)


def test_an_explicit_c_attn_target_adapts_the_whole_fused_projection():
    method = build("gpt2", target_modules=["c_attn"])
    layer = method.teacher.transformer.h[0].attn.c_attn
    assert layer.lora_B["default"].weight.shape == (3 * 32, 4)


@pytest.mark.parametrize("arch", ARCHS)
def test_teacher_checkpointing_keeps_the_gradients_and_saves_fewer_activations(arch):
    """``hardware.teacher_checkpointing``: same loss and gradients (LoRA dropout on: its masks are
    replayed), fewer tensors kept for the backward."""
    batch = random_batches(1)[0]

    def run(checkpointing):
        torch.manual_seed(0)  # LoRA's A is drawn from the global RNG
        teacher, student = models(arch)
        cfg = OmegaConf.merge(ROOT_CONF, {"rank": 4, "dropout": 0.3})
        runtime = Runtime(torch.device("cpu"), torch.float32, cfg=OmegaConf.create({"teacher_checkpointing": checkpointing}))
        method = build_method(cfg, Context(teacher=teacher, student=student, tokenizer=TOK, runtime=runtime,
                                           divergence=build_divergence({"name": "fkl"}), train_cfg=None))
        perturb(method)
        saved = []
        torch.manual_seed(11)
        with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.numel()) or t, lambda t: t):
            loss = method.loss(batch, 0).loss
        grads = torch.autograd.grad(loss, method.module_params + list(method.student.parameters()))
        return loss, grads, sum(saved)

    plain_loss, plain_grads, plain_saved = run(False)
    ckpt_loss, ckpt_grads, ckpt_saved = run(True)
    torch.testing.assert_close(ckpt_loss, plain_loss)
    for a, b in zip(ckpt_grads, plain_grads):
        torch.testing.assert_close(a, b)
    assert ckpt_saved < 0.8 * plain_saved, (ckpt_saved, plain_saved)
