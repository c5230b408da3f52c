"""OKD, online knowledge distillation (Rao et al. 2024, "Exploring and Enhancing the Transfer of
Distribution in Knowledge Distillation for Autoregressive Language Models", Algorithm 1, Eqs. 15-17).

A small online module (LoRA by default; prefix tuning or P-tuning for the paper's ablation) is added to
the frozen teacher and trained together with the student, so the teacher's distribution ``p_ta`` adapts
to the student ``p_s`` while the teacher's base weights never change. In the paper's notation
``L_KL(a, b) = tau^2 KL(b || a)`` (Eq. 2: ``L_KL(p(theta_s), p(theta_t))`` is forward KD), and per step,
on the same batch and from one teacher forward:

    L_t = alpha * L_KL(p(theta_ta), p(theta_s)) + (1 - alpha) * MLE(theta_ta)
        = alpha * tau^2 KL(p_s || p_ta) + (1 - alpha) * MLE(theta_ta)      -> only the online module
    L_s = L_KL(p(theta_s), p(theta_ta)) = tau^2 KL(p_ta || p_s)            -> only the student

Each term treats the other model's logits as a constant (detached), so the trainer's single backward of
``L_s + L_t`` gives each optimizer (``student``, ``module``) the gradient of its own loss only. ``L_s``
is the ``divergence`` group (forward KL by default; ``rkl``/``jsd`` for the paper's Table V); the
module's term is always the forward KL above with the divergence's ``tau`` and ``tau^2`` setting.
Both are averaged over response tokens.

Defaults and departures:
- ``alpha = 0.5`` (``L_t``'s weight). The paper's "alpha = 0 represents SFT" study (Sec. V-E, "Loss
  Weight", Fig. 9) is about the *student's* MLE weight: it is 0 here by construction, since ``L_s`` is
  pure distillation (Eq. 17). The paper gives no value for Eq. 16's alpha; it cannot be 0 by default
  (the module would then be plain fine-tuning of the teacher on the gold responses, blind to the
  student), and at 1 nothing anchors the teacher to the data. 0.5 weighs both equally.
- The online module is "a standard LoRA module" on the query and value projections of the attention in
  every transformer layer (Sec. V-A, Eq. 15: ``h <- h + s x W_down W_up``), rank 32 (Sec. V-E, "LoRA
  Dimension"), no weight decay (Sec. III-E). ``s = lora_alpha / r = 1`` (Eq. 15 asks for s >= 1) and
  LoRA dropout 0.1 (the LoRA paper's GPT-2 setting, Hu et al. 2022; OKD gives none) are kdlab's
  choices; ``dropout=0`` skips the dropout (peft then uses no dropout layer), a different run, not the
  default. Sec. V-E also mentions "a non-linear transformation" between W_down and W_up; Eq. 15 and
  standard LoRA have none, and neither has kdlab.
- GPT-2 fuses q, k and v into one ``c_attn`` (a Conv1D: weight ``[in, 3d]``, output ``[q | k | v]``).
  ``kdlab.modeling``'s ``QVLoraConv1D`` (the same layer ``teacher.finetune.mode=lora`` uses), registered with peft's custom-layer mechanism, adapts only its q and v output
  columns, each with its own rank-r pair (the LoRA paper's own GPT-2 layer, loralib's ``MergedLinear``
  with ``enable_lora=[True, False, True]``, which also draws one dropout mask for both); k gets no
  parameters. Reload a saved GPT-2 module with :func:`load_online_module` (plain
  ``PeftModel.from_pretrained`` does not know the custom layer and stops at the shape mismatch).
  ``target_modules=[c_attn]`` given explicitly adapts the whole fused projection with peft's own layer.
- The module's dropout is active during training while the teacher's own dropout stays off (the
  teacher is in eval mode), as for a frozen teacher in KD.
- The student trains with its own dropout on, as in KD: OKD samples nothing (teacher forcing on the
  gold responses), so no sampling-time probabilities are compared with training-time ones; the paper
  gives no dropout setting.
- Algorithm 1 updates both with one learning rate eta; kdlab gives the module its own ``module_lr``
  (default equal to ``lr``, 5e-4) and each side its own AdamW (the paper names no optimizer). Both
  gradients come from the one forward of Algorithm 1's step 3, as there.
- ``lora_layers`` (prefix tuning and P-tuning ignore it) restricts LoRA to the last blocks, kdlab's
  own ablation (``sweeps/okd-ablation-blocks.yaml``); ``null``, every block, is the paper's.

Cost. The module's gradient needs a backward from the LM head down to the lowest adapted block (the
teacher forward runs with autograd here, unlike ``kd``'s no-grad forward); from block 0 that is the
input gradient of every frozen matmul of the teacher, about one more teacher forward, and the saved
activations of every block (``hardware.teacher_checkpointing=true`` recomputes them instead, see
:func:`checkpoint_blocks`). This floor, not LoRA, is most of an OKD step's cost over ``kd``;
BENCHMARKS.md ("OKD step time against its floor") measures both, and the whole-run time against GKD
and MiniLLM (the paper's claim, Sec. I and V-C: about 1/4 of the on-policy methods' training time).
"""
from __future__ import annotations

import inspect
import math
from pathlib import Path

import torch

from kdlab.checkpoint import atomic_dir
from kdlab.config import ConfigError, OneOf, Range, Type
from kdlab.divergences.losses import ForwardKL
from kdlab.methods.base import LossOutput, Method, ParamGroup
from kdlab.modeling import layer_list, lm_head, lora_config, register_qv_lora


def load_online_module(model, path):
    """``PeftModel.from_pretrained`` for a module :meth:`OKD.save` wrote, the q/v-only GPT-2 layer
    included (peft does not record custom layers in ``adapter_config.json``, so it is registered again
    when the saved ``lora_A`` has the 2r rows of ``kdlab.modeling``'s ``QVLoraConv1D``)."""
    from peft import LoraConfig, PeftConfig, PeftModel
    from safetensors import safe_open

    config = PeftConfig.from_pretrained(path)
    if isinstance(config, LoraConfig) and model.config.model_type == "gpt2":
        with safe_open(str(Path(path) / "adapter_model.safetensors"), "pt") as f:
            shapes = {k: f.get_slice(k).get_shape() for k in f.keys() if k.endswith("c_attn.lora_A.weight")}
        if any(shape[0] == 2 * config.r for shape in shapes.values()):
            register_qv_lora(config)
    return PeftModel.from_pretrained(model, path, config=config)


def adapted_blocks(depth: int, lora_layers: int | float | None) -> list[int] | None:
    """Indices of the blocks LoRA adapts: every block (None), the last K (int K >= 1), or the last
    ceil(f * depth) (a fraction 0 < f < 1)."""
    if lora_layers is None:
        return None
    count = lora_layers if isinstance(lora_layers, int) else math.ceil(lora_layers * depth)
    return list(range(max(0, depth - count), depth))


def check_lora_layers(key: str, value) -> None:
    is_count = isinstance(value, int) and not isinstance(value, bool) and value >= 1
    if value is not None and not is_count and not (isinstance(value, float) and 0 < value < 1):
        raise ConfigError(f"{key}={value!r} is neither a number of blocks (an integer >= 1) nor a fraction of them "
                          f"in (0, 1); set {key}=0.25 (the last quarter), {key}=8 (the last 8) or {key}=null (every block)")


def peft_config(cfg, teacher):
    from peft import PrefixTuningConfig, PromptEncoderConfig, TaskType

    if cfg.online_module == "lora":
        return lora_config(teacher, cfg.target_modules, "method.target_modules", rank=cfg.rank,
                           alpha=cfg.scaling * cfg.rank, dropout=cfg.dropout, task_type=TaskType.CAUSAL_LM,
                           layers_to_transform=adapted_blocks(len(layer_list(teacher)), cfg.lora_layers))
    if cfg.online_module == "prefix":
        return PrefixTuningConfig(task_type=TaskType.CAUSAL_LM, num_virtual_tokens=cfg.num_virtual_tokens)
    return PromptEncoderConfig(task_type=TaskType.CAUSAL_LM, num_virtual_tokens=cfg.num_virtual_tokens,
                               encoder_hidden_size=cfg.encoder_hidden_size)


def checkpoint_blocks(teacher, cfg) -> None:
    """``hardware.teacher_checkpointing``: the teacher's blocks from the lowest adapted one up keep only
    their inputs for the backward and recompute the rest (``torch.utils.checkpoint``; the RNG state is
    replayed, so LoRA's dropout masks and hence the gradients are unchanged). It trades the saved
    activations of every block, OKD's memory cost over ``kd``, for one more teacher forward (on the
    embedded pair, BENCHMARKS.md: step peak 0.87 -> 0.40 GB, kd's, at +7% step time)."""
    from torch.utils.checkpoint import checkpoint

    blocks = layer_list(teacher)
    adapted = adapted_blocks(len(blocks), cfg.lora_layers) if cfg.online_module == "lora" else None
    for block in blocks[(adapted or [0])[0]:]:
        def forward(*args, _forward=block.forward, _signature=inspect.signature(block.forward), **kwargs):
            if not torch.is_grad_enabled():  # generation and evaluation: nothing to save
                return _forward(*args, **kwargs)
            # no KV cache (passed by name or, in GPT-2, by position): the recomputation would append to it
            # a second time, so transformers' own gradient checkpointing drops it too
            bound = _signature.bind_partial(*args, **kwargs)
            for named in (bound.arguments, bound.arguments.get("kwargs", {})):
                for key in ("past_key_values", "past_key_value", "cache", "layer_past"):
                    if key in named:
                        named[key] = None
                if "use_cache" in named:
                    named["use_cache"] = False
            return checkpoint(_forward, *bound.args, use_reentrant=False, **bound.kwargs)
        block.forward = forward


class OKD(Method):
    name = "okd"
    # the online module is trained inside the teacher: its weights, in this process (self.teacher)
    teacher_needs = frozenset({"weights"})
    teacher_needs_across = ("trains a module inside the teacher through a token-level divergence over one shared "
                            "vocabulary")
    schema = {
        **Method.schema,
        "module_lr": Range(0),
        "alpha": Range(0, 1),
        "online_module": OneOf("lora", "prefix", "ptuning"),
        "rank": Range(1, integer=True),
        "scaling": Range(1),
        "dropout": Range(0, 1, high_open=True),
        "target_modules": Type(list, optional=True),
        "lora_layers": check_lora_layers,
        "num_virtual_tokens": Range(1, integer=True),
        "encoder_hidden_size": Range(1, integer=True),
        "weight_decay": Range(0, optional=True),
    }
    uses_divergence = True

    def __init__(self, cfg, ctx):
        super().__init__(cfg, ctx)
        from peft import get_peft_model

        # LoRA is injected into the teacher's own modules (so ``self.teacher`` computes p_ta); prefix
        # tuning and P-tuning live in the PeftModel wrapper and are applied in ``teacher_module_logits``.
        self.peft = get_peft_model(self.teacher, peft_config(cfg, self.teacher))
        if ctx.runtime.cfg is not None and ctx.runtime.cfg.get("teacher_checkpointing"):
            if cfg.online_module == "prefix":
                raise ConfigError("hardware.teacher_checkpointing=true cannot recompute prefix tuning (its virtual "
                                  "keys/values are the KV cache); set hardware.teacher_checkpointing=false")
            checkpoint_blocks(self.teacher, cfg)
        self.module_params = [p for p in self.peft.parameters() if p.requires_grad]
        self.online = [m for n, m in self.peft.named_modules() if "lora_dropout" in n]
        if cfg.online_module != "lora":
            self.online.append(self.peft.prompt_encoder)
        div = ctx.divergence
        # scale == tau**2 exactly when the divergence applies the tau^2 factor (or tau == 1, where it is 1)
        self.module_div = ForwardKL(tau=div.tau, scale_by_tau_squared=div.scale != 1.0, chunk_size=div.chunk_size)

    def param_groups(self) -> dict[str, ParamGroup]:
        wd = self.cfg.weight_decay
        return {"student": ParamGroup([p for p in self.student.parameters() if p.requires_grad], self.cfg.lr, wd),
                "module": ParamGroup(self.module_params, self.cfg.module_lr, wd)}

    def teacher_module_logits(self, batch) -> torch.Tensor:
        """Logits ``(N, V)`` of teacher + online module at response positions, with autograd."""
        if self.cfg.online_module == "lora":
            return self.logits(self.teacher, batch)
        ids, mask = batch.input_ids, batch.attention_mask
        (b, t), n = ids.shape, self.cfg.num_virtual_tokens
        mask = torch.cat([mask.new_ones(b, n), mask], dim=1)
        if self.cfg.online_module == "prefix":
            # virtual keys/values as a cache: positions of the real tokens start at n, as in peft's forward
            past = self.peft.get_prompt(b, max_cache_len=n + t)
            hidden = self.teacher.base_model(input_ids=ids, attention_mask=mask, past_key_values=past).last_hidden_state
        else:
            embeds = self.teacher.get_input_embeddings()(ids)
            embeds = torch.cat([self.peft.get_prompt(b).to(embeds.dtype), embeds], dim=1)
            hidden = self.teacher.base_model(inputs_embeds=embeds, attention_mask=mask).last_hidden_state[:, n:]
        return lm_head(self.teacher)(hidden[batch.response_mask])[..., : self.vocab_size]

    def objectives(self, batch) -> tuple[torch.Tensor, torch.Tensor, dict[str, float]]:
        """``(L_s, L_t, logs)``: the student's and the online module's losses (module docstring)."""
        for m in self.online:  # evaluation (generation) leaves the teacher, module included, in eval mode
            m.train()
        student = self.logits(self.student, batch)
        teacher = self.teacher_module_logits(batch)
        student_loss = self.ctx.divergence(student, teacher.detach())
        module_kl = self.module_div(teacher, student.detach())  # KL(p_s || p_ta), gradient into p_ta
        module_nll = self.nll(teacher, batch)
        alpha = self.cfg.alpha
        module_loss = alpha * module_kl + (1 - alpha) * module_nll
        logs = {"distill": student_loss.item(), "module": module_loss.item(), "module_kl": module_kl.item(),
                "module_nll": module_nll.item()}
        return student_loss, module_loss, logs

    def loss(self, batch, step):
        student_loss, module_loss, logs = self.objectives(batch)
        return LossOutput(student_loss + module_loss, logs)

    def original_teacher(self):
        return self.peft.disable_adapter()

    def save(self, out_dir) -> None:
        """The trained online module (peft ``save_pretrained``) in ``out_dir/online_module/``."""
        with atomic_dir(Path(out_dir) / "online_module") as tmp:
            self.peft.save_pretrained(tmp)


METHOD = OKD
