"""``student.init: pruned``: a student pruned from the teacher by measured importance (the Minitron recipe).

Minitron (Muralidharan et al. 2024, "Compact Language Models via Pruning and Knowledge Distillation",
Sec. 2.2; Sreenivas et al. 2024, "LLM Pruning and Distillation in Practice: The Minitron Approach")
ranks the teacher's parts on a small calibration set with forward passes only, keeps the most important
ones, and distils into the result. ``student.prune`` (:data:`DEFAULTS`) gives the target shape, each
dimension optional (null keeps the teacher's):

- **Width** (``hidden_size``, ``intermediate_size``, ``num_attention_heads``), activation-based as Minitron
  Eqs. 1-3: a head's importance is the norm of its attention output (the head's slice of the output
  projection's input), an MLP neuron's the magnitude of its intermediate activation (LLaMA:
  ``act(gate) * up``, the input of ``down_proj``; GPT-2: ``gelu(c_fc)``), an embedding channel's the
  magnitude of that channel in the output of every LayerNorm/RMSNorm (summed over the norms). Minitron sums
  over batch and sequence; ``width_aggregation`` reduces each part's per-token value over the calibration
  tokens (padding excluded) by ``mean`` (Minitron's sum, divided by the token count) or ``l2`` (root mean
  square; Minitron Sec. 4.1 compares aggregations). Heads and neurons are ranked within their block,
  channels over the whole model.
- **Depth** (``num_layers``), ``depth_criterion``:
  ``block_influence`` (ShortGPT, Men et al. 2024, Eq. 1: BI_l = 1 - mean over tokens of
  cos(x_in, x_out) of block l; the blocks with the lowest BI are dropped);
  ``angular`` (Gromov et al. 2024, "The Unreasonable Ineffectiveness of the Deeper Layers", Eq. 7: the
  contiguous run of n blocks l..l+n-1 whose input x^l and output x^{l+n} have the smallest angular
  distance arccos(cos)/pi, measured at each row's last token and averaged over rows, is dropped);
  ``loss`` (Minitron's depth evaluation, Sreenivas et al. Sec. 2: each block is removed on its own and
  the calibration loss measured; the n blocks whose removal raises it least are dropped). ``loss`` is
  one-shot: the ranking is measured once on the full teacher, costing L calibration passes, where an
  iterative removal would cost about L * n (the dominant cost on a CPU).
- Depth and width together: blocks are chosen first, then the width within each kept block (importance
  measured on the full teacher, as Minitron measures once and prunes all axes).

GQA (LLaMA's ``num_key_value_heads``): every kept query head keeps its key/value head. When the target
head count is a multiple of the key/value groups, all groups stay and each keeps its most important
query heads (the same number per group); otherwise it must be a multiple of the group size and whole
groups go, ranked by the summed importance of their query heads (multi-head attention, GPT-2
included, is the case of groups of one head). ``head_dim`` (RoPE's rotation) never changes. GPT-2 ties
``head_dim = hidden_size / num_attention_heads``, so there the two shrink together. Norms keep the
kept channels' weights (and GPT-2's LayerNorm biases); RMS/LayerNorm then normalise over fewer channels
(Minitron accepts this, and distillation repairs it).

``calibration_rows`` are the first rows of the encoded training split, never valid or test.
``source``: ``teacher`` (the teacher as loaded, default) or ``finetuned`` (the ``teacher.finetune``
result: Minitron's "teacher correction", Sreenivas et al. Sec. 2.1). The default is ``teacher``, measured
(RESULTS.md, "Pruned students"): on Dolly, 20 blocks x 1024 MLP neurons pruned from the fine-tuned teacher
start at a validation loss of 5.38 against 5.17 from the teacher as loaded (whether the corrected one
catches up after distillation, as Minitron reports, was not measured); ``teacher`` is also what
``teacher_layers`` cuts from.

A pruned student is computed once and shared, under ``<output_dir>/students/``: ``<key>/`` holds the
student (``save_pretrained`` + tokenizer, float32; ``from_pretrained`` loads it) and ``prune.json``
(what it was built from, the kept indices and every importance score), written last into a folder that
is renamed into place (:func:`kdlab.checkpoint.atomic_dir`), so a killed pruning leaves nothing that looks
complete; ``<key>.lock`` serialises concurrent jobs (the second one loads the first one's student).
``<teacher>-<dataset>-<key>.importance.json`` memoises the measured importances, which do not depend on the
target shape, so trying several shapes costs one calibration pass. The key (:func:`key_components`, hashed
by :func:`kdlab.config.content_key`) covers the teacher section (its fine-tuning too, and the fine-tuned
teacher's key, with ``source: finetuned``), the completed prune settings, the calibration rows' token ids,
the template and the hardware dtype.
"""
from __future__ import annotations

import contextlib
import copy
import math
import re
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import nn

from kdlab.checkpoint import atomic_dir, atomic_write_json, read_json, recover_dir
from kdlab import runlock
from kdlab.config import ConfigError, OneOf, Range, check_section, check_under, content_key, plain
from kdlab.modeling import layer_list

DEFAULTS = {
    "num_layers": None,            # null: the teacher's, for each of the four
    "hidden_size": None,
    "intermediate_size": None,
    "num_attention_heads": None,
    "depth_criterion": "block_influence",   # block_influence | angular | loss (best in RESULTS.md, L times the cost)
    "width_aggregation": "mean",   # mean | l2 over calibration tokens (l2 started higher in RESULTS.md)
    "calibration_rows": 256,       # the first rows of the training split
    "source": "teacher",           # teacher (as loaded) | finetuned (teacher.finetune's result)
    "batch_size": 8,               # calibration rows per forward pass
}
SCHEMA = {
    **{key: Range(1, integer=True, optional=True)
       for key in ("num_layers", "hidden_size", "intermediate_size", "num_attention_heads")},
    "depth_criterion": OneOf("block_influence", "angular", "loss"),
    "width_aggregation": OneOf("mean", "l2"),
    "calibration_rows": Range(1, integer=True),
    "source": OneOf("teacher", "finetuned"),
    "batch_size": Range(1, integer=True),
}
SUPPORTED = ("llama", "gpt2")   # model_type: the llama family (SmolLM2, LLaMA, TinyLlama) and GPT-2
COMPLETE = "prune.json"


def settings(prune) -> dict:
    """``student.prune`` completed with :data:`DEFAULTS`."""
    return {**DEFAULTS, **(plain(prune) or {})}


def validate_prune(key: str, value) -> None:
    """The ``student.prune`` check: known keys and values, and a shape consistent in itself."""
    if value is None:
        return
    if not isinstance(plain(value), dict):
        raise ConfigError(f"{key}={value!r} is neither null nor a mapping; set {key}={{num_layers:15}}")
    check_section(key, plain(value), SCHEMA, ignore=())
    s = settings(value)
    if s["hidden_size"] and s["num_attention_heads"] and s["hidden_size"] % s["num_attention_heads"]:
        raise ConfigError(f"{key}.hidden_size={s['hidden_size']} is not divisible by {key}.num_attention_heads="
                          f"{s['num_attention_heads']}; pick a hidden size that is a multiple of the head count")


@dataclass(frozen=True)
class Shape:
    """The dimensions pruning changes, of a teacher or a student."""
    arch: str
    num_layers: int
    hidden_size: int
    intermediate_size: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int

    @classmethod
    def of(cls, config) -> "Shape":
        if config.model_type not in SUPPORTED:
            raise ConfigError(f"student.init=pruned cannot prune a {config.model_type!r} teacher; it supports the "
                              f"llama family (SmolLM2, LLaMA, TinyLlama) and GPT-2: use student.init=teacher_layers")
        if config.model_type == "gpt2":
            return cls("gpt2", config.n_layer, config.n_embd, config.n_inner or 4 * config.n_embd, config.n_head,
                       config.n_head, config.n_embd // config.n_head)
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        return cls("llama", config.num_hidden_layers, config.hidden_size, config.intermediate_size,
                   config.num_attention_heads, config.num_key_value_heads or config.num_attention_heads, head_dim)


def target_shape(prune, teacher: Shape) -> Shape:
    """The student's shape: ``prune``'s values, the teacher's where null; one-line refusals of shapes that
    cannot be cut from ``teacher``."""
    s = settings(prune)
    want = {k: s[k] or getattr(teacher, k)
            for k in ("num_layers", "hidden_size", "intermediate_size", "num_attention_heads")}
    for k, value in want.items():
        if value > getattr(teacher, k):
            raise ConfigError(f"student.prune.{k}={value} is more than the teacher's {getattr(teacher, k)}; "
                              f"set it to at most {getattr(teacher, k)} (null keeps the teacher's)")
    heads, kv = want["num_attention_heads"], teacher.num_key_value_heads
    group = teacher.num_attention_heads // kv
    if heads % kv and heads % group:
        raise ConfigError(f"student.prune.num_attention_heads={heads} is neither a multiple of the teacher's {kv} "
                          f"key/value groups nor of its {group} query heads per group (every kept query head keeps "
                          f"its group); use a multiple of {kv if kv > 1 else group}")
    if want["hidden_size"] % heads:
        raise ConfigError(f"student.prune.hidden_size={want['hidden_size']} is not divisible by {heads} attention "
                          f"heads; pick a hidden size that is a multiple of the head count")
    if teacher.arch == "gpt2" and want["hidden_size"] != heads * teacher.head_dim:
        raise ConfigError(f"student.prune: GPT-2's head size is hidden_size / num_attention_heads, so keeping its "
                          f"{teacher.head_dim} needs hidden_size = num_attention_heads x {teacher.head_dim}; got "
                          f"hidden_size={want['hidden_size']} with {heads} heads")
    # all key/value groups stay, each with fewer query heads; else whole groups go (MHA: a group is one head)
    kept_kv = kv if heads % kv == 0 else heads // group
    return Shape(teacher.arch, **want, num_key_value_heads=kept_kv, head_dim=teacher.head_dim)


def _parts(model: nn.Module, arch: str):
    """``(blocks, [(attention output projection, MLP down projection, [norms])...], final norm)``."""
    blocks = layer_list(model)
    if arch == "gpt2":
        parts = [(b.attn.c_proj, b.mlp.c_proj, [b.ln_1, b.ln_2]) for b in blocks]
        return blocks, parts, model.transformer.ln_f
    parts = [(b.self_attn.o_proj, b.mlp.down_proj, [b.input_layernorm, b.post_attention_layernorm]) for b in blocks]
    return blocks, parts, model.model.norm


class _Aggregate:
    """Per-unit reduction over tokens: mean |a| (``mean``) or sqrt(mean a^2) (``l2``)."""

    def __init__(self, how: str):
        self.how, self.total, self.count = how, None, 0

    def add(self, values: torch.Tensor) -> None:   # (tokens, units)
        values = values.double()
        part = (values.abs() if self.how == "mean" else values ** 2).sum(dim=0)
        self.total = part if self.total is None else self.total + part
        self.count += values.shape[0]

    def result(self) -> list[float]:
        out = self.total / max(self.count, 1)
        return (out if self.how == "mean" else out.sqrt()).tolist()


def _block_io(args, kwargs, output):
    hidden_in = args[0] if args else kwargs["hidden_states"]
    return hidden_in, output[0] if isinstance(output, tuple) else output


@torch.no_grad()
def measure_importance(model: nn.Module, items, pad_id: int, aggregation: str, batch_size: int) -> dict:
    """Every importance score of ``model`` on ``items`` (encoded rows), in one pass of forward hooks:
    ``heads`` [layer][head], ``neurons`` [layer][neuron], ``channels`` [channel], ``block_influence``
    [layer], ``angular`` [l][n - 1] = d(x^l, x^{l+n}) (see the module docstring)."""
    from kdlab.data import collate

    shape = Shape.of(model.config)
    blocks, parts, final_norm = _parts(model, shape.arch)
    layers = len(blocks)
    heads = [_Aggregate(aggregation) for _ in range(layers)]
    neurons = [_Aggregate(aggregation) for _ in range(layers)]
    norms = [_Aggregate(aggregation) for _ in range(2 * layers + 1)]
    cos_sum, tokens = torch.zeros(layers, dtype=torch.float64), 0
    last = [[] for _ in range(layers + 1)]   # x^l at each row's last token, l = 0..L
    mask = {}

    def hook_heads(i):
        def hook(_, args):
            x = args[0][mask["m"]]                                  # (tokens, heads * head_dim)
            heads[i].add(x.view(x.shape[0], -1, shape.head_dim).float().norm(dim=-1))
        return hook

    def hook_neurons(i):
        return lambda _, args: neurons[i].add(args[0][mask["m"]])

    def hook_norm(i):
        return lambda _, args, out: norms[i].add(out[mask["m"]])

    def hook_block(i):
        def hook(_, args, kwargs, output):
            x_in, x_out = _block_io(args, kwargs, output)
            cos = torch.nn.functional.cosine_similarity(x_in[mask["m"]].double(), x_out[mask["m"]].double(), dim=-1)
            cos_sum[i] += cos.sum()
            if i == 0:
                last[0].append(x_in[mask["rows"], mask["last"]].double())
            last[i + 1].append(x_out[mask["rows"], mask["last"]].double())
        return hook

    handles = []
    for i, (attn_out, mlp_down, block_norms) in enumerate(parts):
        handles += [attn_out.register_forward_pre_hook(hook_heads(i)),
                    mlp_down.register_forward_pre_hook(hook_neurons(i)),
                    blocks[i].register_forward_hook(hook_block(i), with_kwargs=True)]
        handles += [n.register_forward_hook(hook_norm(2 * i + j)) for j, n in enumerate(block_norms)]
    handles.append(final_norm.register_forward_hook(hook_norm(2 * layers)))
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    try:
        for start in range(0, len(items), batch_size):
            batch = collate(items[start: start + batch_size], pad_id).to(device)
            mask["m"] = batch.attention_mask.bool()
            mask["rows"] = torch.arange(len(batch), device=device)
            mask["last"] = batch.attention_mask.sum(dim=1) - 1
            tokens += int(mask["m"].sum())
            model.base_model(input_ids=batch.input_ids, attention_mask=batch.attention_mask)
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    states = [torch.cat(x) for x in last]
    angular = [[(torch.arccos(torch.nn.functional.cosine_similarity(states[l], states[l + n], dim=-1)
                              .clamp(-1, 1)) / math.pi).mean().item() for n in range(1, layers - l + 1)]
               for l in range(layers)]
    return {"heads": [h.result() for h in heads], "neurons": [n.result() for n in neurons],
            "channels": torch.tensor([n.result() for n in norms]).sum(dim=0).tolist(),
            "block_influence": (1 - cos_sum / max(tokens, 1)).tolist(), "angular": angular}


@contextlib.contextmanager
def without_block(model: nn.Module, index: int):
    """``model`` running without block ``index`` (the blocks are a ModuleList both families iterate)."""
    body = model.base_model
    name = "h" if hasattr(body, "h") else "layers"
    blocks = getattr(body, name)
    setattr(body, name, nn.ModuleList([b for i, b in enumerate(blocks) if i != index]))
    try:
        yield model
    finally:
        setattr(body, name, blocks)


def calibration_loss(model: nn.Module, items, tokenizer, batch_size: int) -> float:
    """Token-mean NLL (nats) of the gold responses of ``items``, as the evaluation's ``loss``."""
    from kdlab.metrics.evaluate import test_loss

    return test_loss(model, items, tokenizer, batch_size, next(model.parameters()).device, contextlib.nullcontext())


def block_removal_losses(model: nn.Module, items, tokenizer, batch_size: int) -> list[float]:
    """The calibration loss with each block removed alone (the ``loss`` criterion, one-shot)."""
    out = []
    for index in range(len(layer_list(model))):
        with without_block(model, index):
            out.append(calibration_loss(model, items, tokenizer, batch_size))
    return out


def kept_blocks(importance: dict, criterion: str, num_layers: int) -> list[int]:
    """The indices of the blocks kept (ascending) by ``criterion`` (see the module docstring)."""
    layers = len(importance["block_influence"])
    drop = layers - num_layers
    if drop == 0:
        return list(range(layers))
    if criterion == "angular":
        start = min(range(layers - drop + 1), key=lambda l: importance["angular"][l][drop - 1])
        return [i for i in range(layers) if not start <= i < start + drop]
    scores = importance["block_influence" if criterion == "block_influence" else "block_removal_loss"]
    # the lowest scores go (ties: the later block); a higher removal loss means a more important block
    return sorted(sorted(range(layers), key=lambda i: (-scores[i], i))[:num_layers])


def _top(scores, k: int) -> list[int]:
    return sorted(sorted(range(len(scores)), key=lambda i: (-scores[i], i))[:k])


def kept_width(importance: dict, layers: list[int], teacher: Shape, target: Shape) -> dict:
    """Kept channels, and per kept block its kept query heads (within each key/value group) and neurons."""
    group = teacher.num_attention_heads // teacher.num_key_value_heads
    per_group = target.num_attention_heads // target.num_key_value_heads
    heads, kv_heads = [], []
    for layer in layers:
        scores = importance["heads"][layer]
        groups = _top([sum(scores[g * group: (g + 1) * group]) for g in range(teacher.num_key_value_heads)],
                      target.num_key_value_heads)
        kv_heads.append(groups)
        heads.append([g * group + h for g in groups for h in _top(scores[g * group: (g + 1) * group], per_group)])
    return {"channels": _top(importance["channels"], target.hidden_size), "heads": heads, "kv_heads": kv_heads,
            "neurons": [_top(importance["neurons"][layer], target.intermediate_size) for layer in layers]}


def _student_config(teacher_config, target: Shape, layers: list[int]):
    config = copy.deepcopy(teacher_config)
    if target.arch == "gpt2":
        config.n_layer, config.n_embd = target.num_layers, target.hidden_size
        config.n_head, config.n_inner = target.num_attention_heads, target.intermediate_size
    else:
        config.num_hidden_layers, config.hidden_size = target.num_layers, target.hidden_size
        config.num_attention_heads, config.intermediate_size = target.num_attention_heads, target.intermediate_size
        config.num_key_value_heads = target.num_key_value_heads
        config.head_dim = target.head_dim   # RoPE's rotation size never changes
    if getattr(config, "layer_types", None):
        config.layer_types = [config.layer_types[i] for i in layers]
    return config


def _slicer(arch: str, head_dim: int, hidden: int, plan: dict, position: int):
    """A function ``(parameter name, teacher tensor) -> student tensor`` for block ``position`` of the plan
    (None: outside the blocks)."""
    ch = torch.tensor(plan["channels"])
    heads = plan["heads"][position] if position is not None else []
    def head_rows_of(kept):
        return torch.tensor([h * head_dim + d for h in kept for d in range(head_dim)], dtype=torch.long)

    head_rows = head_rows_of(heads)
    kv_rows = head_rows_of(plan["kv_heads"][position] if position is not None else [])
    neurons = torch.tensor(plan["neurons"][position]) if position is not None else None

    def rows(t, idx):
        return t.index_select(0, idx.to(t.device))

    def cols(t, idx):
        return t.index_select(1, idx.to(t.device))

    def llama(name, t):
        if name.endswith(("embed_tokens.weight", "lm_head.weight")):
            return cols(t, ch)
        if name.endswith("norm.weight"):
            return rows(t, ch)
        if "q_proj" in name:
            return cols(rows(t, head_rows), ch) if t.dim() == 2 else rows(t, head_rows)
        if "k_proj" in name or "v_proj" in name:
            return cols(rows(t, kv_rows), ch) if t.dim() == 2 else rows(t, kv_rows)
        if "o_proj" in name:
            return cols(rows(t, ch), head_rows) if t.dim() == 2 else rows(t, ch)
        if "gate_proj" in name or "up_proj" in name:
            return cols(rows(t, neurons), ch) if t.dim() == 2 else rows(t, neurons)
        if "down_proj" in name:
            return cols(rows(t, ch), neurons) if t.dim() == 2 else rows(t, ch)
        return t

    qkv = torch.cat([head_rows + part * hidden for part in range(3)]) if position is not None else None

    def gpt2(name, t):   # Conv1D weights are (in, out)
        if name.endswith(("wte.weight", "wpe.weight", "lm_head.weight")):
            return cols(t, ch)
        if ".ln_" in name or name.startswith("ln_") or "ln_f" in name:
            return rows(t, ch)
        if "attn.c_attn" in name:
            return cols(rows(t, ch), qkv) if t.dim() == 2 else rows(t, qkv)
        if "attn.c_proj" in name:
            return cols(rows(t, head_rows), ch) if t.dim() == 2 else rows(t, ch)
        if "mlp.c_fc" in name:
            return cols(rows(t, ch), neurons) if t.dim() == 2 else rows(t, neurons)
        if "mlp.c_proj" in name:
            return cols(rows(t, neurons), ch) if t.dim() == 2 else rows(t, ch)
        return t

    return gpt2 if arch == "gpt2" else llama


def prune_model(teacher: nn.Module, plan: dict) -> nn.Module:
    """A new model of ``teacher``'s architecture holding the slices ``plan`` keeps: ``layers`` (teacher block
    indices), ``channels``, and per kept block ``heads``, ``kv_heads`` and ``neurons`` (teacher indices,
    ascending)."""
    from transformers import AutoModelForCausalLM

    teacher_shape = Shape.of(teacher.config)
    layers = plan["layers"]
    target = Shape(teacher_shape.arch, len(layers), len(plan["channels"]), len(plan["neurons"][0]),
                   len(plan["heads"][0]), len(plan["kv_heads"][0]), teacher_shape.head_dim)
    dtype = next(teacher.parameters()).dtype
    student = AutoModelForCausalLM.from_config(_student_config(teacher.config, target, layers), dtype=dtype)
    source = teacher.state_dict()
    block = re.compile(r"^(.*?\.(?:layers|h)\.)(\d+)\.(.*)$")
    state = {}
    for name in student.state_dict():
        match = block.match(name)
        position = int(match.group(2)) if match else None
        teacher_name = f"{match.group(1)}{layers[position]}.{match.group(3)}" if match else name
        cut = _slicer(target.arch, target.head_dim, teacher_shape.hidden_size, plan, position)
        state[name] = cut(name, source[teacher_name]).clone()
    student.load_state_dict(state, strict=True)
    return student


def prune_plan(importance: dict, teacher: Shape, target: Shape, criterion: str) -> dict:
    layers = kept_blocks(importance, criterion, target.num_layers)
    return {"layers": layers, **kept_width(importance, layers, teacher, target)}


def key_components(cfg, calibration, train_items) -> dict:
    """What a pruned student depends on: the teacher (and its fine-tuning, with ``source: finetuned``), the
    prune settings, the calibration rows' tokens, the template and the dtype; not the method or the seed."""
    from kdlab.data import prompt_template
    from kdlab.teacher.finetune import teacher_key
    from kdlab.teacher.topk_cache import data_hash

    s = settings(cfg.student.prune)
    finetuned = s["source"] == "finetuned"
    teacher = {k: v for k, v in plain(cfg.teacher).items() if k != "cache" and (finetuned or k != "finetune")}
    out = {"teacher": teacher, "prune": s, "template": prompt_template(cfg), "data": data_hash(calibration),
           "examples": len(calibration), "dtype": cfg.hardware.get("dtype")}
    if finetuned:
        out["finetuned_teacher"] = teacher_key(cfg, train_items)
    return out


def _importance(root: Path, name: str, components: dict, teacher, calibration, tokenizer, s: dict) -> dict:
    """The measured importances (memoised in ``root``: they do not depend on the target shape)."""
    shared = {k: v for k, v in components.items() if k != "prune"}
    shared["measure"] = {k: s[k] for k in ("width_aggregation", "calibration_rows", "batch_size")}
    path = root / f"{name}-{content_key(shared)}.importance.json"
    importance = read_json(path) if path.exists() else None
    changed = importance is None
    if changed:
        print(f"kdlab: measuring the importance of {name}'s heads, neurons, channels and blocks on "
              f"{len(calibration)} calibration rows", flush=True)
        importance = measure_importance(teacher, calibration, tokenizer.pad_token_id, s["width_aggregation"],
                                        s["batch_size"])
    if s["depth_criterion"] == "loss" and "block_removal_loss" not in importance:
        print(f"kdlab: measuring the calibration loss without each of {name}'s blocks", flush=True)
        importance["block_removal_loss"] = block_removal_losses(teacher, calibration, tokenizer, s["batch_size"])
        changed = True
    if changed:
        atomic_write_json(path, importance)
    return importance


def pruned_student(cfg, runtime, teacher: nn.Module, tokenizer, train_items) -> nn.Module:
    """The student ``cfg.student.prune`` cuts from ``teacher``, in float32 on the runtime's device, training
    mode: loaded from ``<output_dir>/students/<key>/`` (pruned there first, under the lock, if no job has)."""
    from omegaconf import OmegaConf

    from kdlab.modeling import load_model
    from kdlab.teacher.finetune import _locked

    s = settings(cfg.student.prune)
    calibration = train_items[: s["calibration_rows"]]
    components = key_components(cfg, calibration, train_items)
    root = Path(cfg.output_dir).expanduser() / "students"
    name = f"{cfg.teacher.name}-{cfg.dataset.name}"
    folder = check_under(root, root / f"{name}-{content_key(components)}", "student.prune")
    if root.is_dir():
        runlock.remove_stale_temporaries(root)   # a killed publish's full copy (.<key>.*.tmp)
    if not (folder / COMPLETE).exists():
        if runtime.world_size > 1:
            raise ConfigError(f"student.init=pruned: {folder} is not built yet and pruning runs in one process; run "
                              f"`python -m kdlab.prune` with this config once (same output_dir), then this job")
        with _locked(root / f"{folder.name}.lock", f"the pruned student {folder.name}"):
            recover_dir(folder)
            if not (folder / COMPLETE).exists():
                importance = _importance(root, name, components, teacher, calibration, tokenizer, s)
                teacher_shape = Shape.of(teacher.config)
                target = target_shape(s, teacher_shape)
                plan = prune_plan(importance, teacher_shape, target, s["depth_criterion"])
                student = prune_model(teacher, plan)
                print(f"kdlab: pruned {cfg.teacher.name} to {describe(target)} -> {folder}", flush=True)
                with atomic_dir(folder) as tmp:
                    torch.nn.Module.float(student).save_pretrained(tmp, safe_serialization=True)
                    tokenizer.save_pretrained(tmp)
                    record = {"key": folder.name, "components": components, "teacher_shape": asdict(teacher_shape),
                              "shape": asdict(target), "kept": plan, "importance": importance}
                    atomic_write_json(tmp / COMPLETE, record)   # last: a folder with prune.json is complete
    spec = OmegaConf.create(dict(plain(cfg.teacher), path=str(folder), gguf_file=None, revision=None, random=None))
    return load_model(spec, "student", torch.float32, vocab_size=len(tokenizer)).train().to(runtime.device)


def describe(shape: Shape) -> str:
    return (f"{shape.num_layers} blocks, hidden {shape.hidden_size}, intermediate {shape.intermediate_size}, "
            f"{shape.num_attention_heads} heads / {shape.num_key_value_heads} key-value heads of {shape.head_dim}")
