"""Model loading, the student derived from teacher layers, response-position logits, vocab checks."""
import time

import pytest
import torch
from omegaconf import OmegaConf

from kdlab.config import ConfigError
from kdlab.modeling import (ModelUnavailable, byte_tokenizer, check_vocabularies, random_model, resolve_folder,
                            response_logits)
from kdlab.student import kept_layers, student_from_teacher_layers

TINY = {"arch": "llama", "hidden_size": 32, "num_layers": 5, "num_heads": 2, "intermediate_size": 64,
        "max_positions": 128, "seed": 0}


def test_byte_tokenizer_round_trips_text():
    tok = byte_tokenizer()
    text = "Sort: 3, 1, 2 -> naïve ✓"
    assert tok.decode(tok.encode(text)) == text
    assert len(tok) == 257 and tok.eos_token_id == 256


def test_response_logits_equal_full_logits_at_response_positions():
    model = random_model(TINY, 257).eval()
    ids = torch.randint(0, 257, (2, 9))
    mask = torch.ones_like(ids)
    mask[1, 7:] = 0
    resp = torch.zeros_like(ids, dtype=torch.bool)
    resp[0, 3:8] = True
    resp[1, 2:6] = True
    full = model(input_ids=ids, attention_mask=mask).logits
    torch.testing.assert_close(response_logits(model, ids, mask, resp, 257), full[resp])


def test_kept_layers_spread_over_depth():
    assert kept_layers(30, 6) == [0, 6, 12, 17, 23, 29]
    assert kept_layers(5, 5) == [0, 1, 2, 3, 4]
    with pytest.raises(ConfigError, match="num_layers=9"):
        kept_layers(5, 9)


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_student_from_teacher_layers_copies_the_kept_blocks(arch):
    teacher = random_model({**TINY, "arch": arch}, 257).eval()
    student = student_from_teacher_layers(teacher, 3).eval()
    keep = kept_layers(5, 3)
    t_blocks = teacher.base_model.layers if arch == "llama" else teacher.base_model.h
    s_blocks = student.base_model.layers if arch == "llama" else student.base_model.h
    assert len(s_blocks) == 3
    for new, old in enumerate(keep):
        for (n1, p1), (n2, p2) in zip(s_blocks[new].named_parameters(), t_blocks[old].named_parameters()):
            assert n1 == n2 and torch.equal(p1, p2)
    # with every layer kept, the student is the teacher
    clone = student_from_teacher_layers(teacher, 5).eval()
    ids = torch.randint(0, 257, (1, 7))
    torch.testing.assert_close(clone(ids).logits, teacher(ids).logits)


def test_different_tokenizers_are_rejected_with_a_clear_message():
    from transformers import PreTrainedTokenizerFast
    from tokenizers import Tokenizer, models

    other = PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.WordLevel({"a": 0, "<unk>": 1}, "<unk>")))
    with pytest.raises(ConfigError, match="different tokenizers"):
        check_vocabularies(byte_tokenizer(), other, "tiny", "other")
    assert check_vocabularies(byte_tokenizer(), byte_tokenizer(), "a", "b") == 257


def test_uncached_hub_model_fails_fast_offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    spec = OmegaConf.create({"name": "gpt2-base", "hub_id": "MiniLLM/init-gpt2-120M", "path": None, "package": None,
                             "random": None, "gguf_file": None, "revision": None})
    start = time.time()
    with pytest.raises(ModelUnavailable, match=r"student.path=") as err:
        resolve_folder(spec, "student")
    assert time.time() - start < 5
    assert "\n" not in str(err.value) and "MiniLLM/init-gpt2-120M" in str(err.value)


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_a_tied_embeddings_sparse_gradient_sums_to_the_dense_one(arch):
    """Two micro-batches (gradient accumulation) through the tied weight: the gradient the optimizer sees
    is dense and equal to the one with the default dense embedding gradient; untied models are left alone."""
    import copy

    import torch.nn.functional as F

    from kdlab.modeling import response_logits, sparse_tied_embedding_grad
    cfg = {"arch": arch, "hidden_size": 16, "num_layers": 1, "num_heads": 2, "intermediate_size": 32,
           "max_positions": 64, "seed": 0}
    dense = random_model(cfg, 40).eval()   # no dropout: both models must compute the same function
    sparse = copy.deepcopy(dense)
    assert sparse_tied_embedding_grad(sparse) and sparse.get_input_embeddings().sparse
    g = torch.Generator().manual_seed(0)
    for _ in range(2):
        ids = torch.randint(0, 40, (3, 9), generator=g)
        mask = torch.zeros_like(ids, dtype=torch.bool)
        mask[:, 5:] = True
        for model in (dense, sparse):
            logits = response_logits(model, ids, torch.ones_like(ids), mask, 40)
            F.cross_entropy(logits, ids[mask]).backward()
    for (name, a), b in zip(dense.named_parameters(), sparse.parameters()):
        assert not b.grad.is_sparse, name
        torch.testing.assert_close(b.grad, a.grad, rtol=1e-5, atol=1e-7, msg=lambda m, name=name: f"{name}: {m}")
    untied = random_model(cfg, 40)
    untied.lm_head = torch.nn.Linear(16, 40, bias=False) if arch == "llama" else untied.lm_head
    if arch == "llama":
        assert not sparse_tied_embedding_grad(untied) and not untied.get_input_embeddings().sparse
