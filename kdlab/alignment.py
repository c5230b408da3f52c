"""Cross-tokenizer alignment: the student's response, re-tokenised for the teacher, in aligned groups.

When teacher and student use different tokenizers, their response tokens cannot be compared one to
one. Both tokenizations spell the same response text, so each token covers a span of its UTF-8 bytes;
the response is cut at the byte offsets where *both* tokenizations have a token boundary, and each
piece is one aligned group: 1..n student tokens and 1..m teacher tokens that cover exactly the same
bytes (one-to-one, one-to-many, many-to-one, many-to-many). This is the byte-offset alignment of
TRL's ``GOLDTrainer`` (``ULDLoss._align_by_byte_offsets``), here as pure functions.

A group's distribution (:func:`group_rows`): on each side, the next-token distribution at the position
that predicts the group's first token. Both are then conditioned on the same text (the response bytes
before the group), which is the condition under which Boizard et al. (2024, "Towards Cross-Tokenizer
Distillation: the Universal Logit Distillation Loss for LLMs", Sec. 3) compare a teacher and a student
distribution; for one-to-one groups it is exactly their per-position comparison. GOLD's default
("observed") instead multiplies that first distribution by the probabilities of the group's later
actual tokens; kdlab does not (the product is not a distribution over either vocabulary), see
benchmarks/gold.py for the comparison.

Text and bytes: the student's response is its tokens' bytes (EOS excluded); the teacher encodes
``teacher prompt (its own template) + that text`` and takes the tokens after its prompt's, as
:func:`kdlab.data.encode` does. Where the bytes are not valid UTF-8 (a byte-level student can sample
anything) the text carries U+FFFD and only the common byte prefix is aligned. Both responses end with
EOS when the student's does: the two EOS tokens (zero bytes) form a last group of their own.
A first response token that a tokenizer merged across the prompt/response boundary is counted from
the response's first byte. Tokenizers must be byte-level BPE (GPT-2, LLaMA-3, Qwen, SmolLM2, kdlab's
byte tokenizer): their token strings spell their bytes; others are refused with one line.
"""
from __future__ import annotations

import weakref
from dataclasses import dataclass
from itertools import accumulate

import torch

from kdlab.config import ConfigError

_TABLES: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


def _byte_decoder() -> dict[str, int]:
    """The inverse of GPT-2's bytes_to_unicode: the byte each printable stand-in character encodes."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return {chr(c): b for b, c in zip(bs, cs)}


def token_bytes(tokenizer) -> list[bytes]:
    """The bytes each token id spells (special tokens: their text; cached per tokenizer)."""
    table = _TABLES.get(tokenizer)
    if table is not None:
        return table
    decoder = getattr(getattr(tokenizer, "backend_tokenizer", None), "decoder", None)
    if type(decoder).__name__ != "ByteLevel":
        raise ConfigError(f"tokenizer {getattr(tokenizer, 'name_or_path', '') or type(tokenizer).__name__} is not "
                          f"byte-level BPE; cross-tokenizer alignment needs byte-level tokenizers on both sides "
                          f"(GPT-2, LLaMA-3, Qwen, SmolLM2 families or the tiny models' byte tokenizer)")
    inv = _byte_decoder()
    special = {i: t.content for i, t in tokenizer.added_tokens_decoder.items()}
    table = [b""] * len(tokenizer)
    for tok, i in tokenizer.get_vocab().items():
        if i >= len(table):
            continue
        if i in special:
            table[i] = special[i].encode("utf-8")
        else:
            try:
                table[i] = bytes(inv[ch] for ch in tok)
            except KeyError:
                table[i] = tok.encode("utf-8")
    _TABLES[tokenizer] = table
    return table


def response_byte_ends(table: list[bytes], full_ids: list[int], n_prompt: int, text_bytes: int) -> list[int]:
    """End offset (in response bytes) of each response token ``full_ids[n_prompt:]``; the response is the
    last ``text_bytes`` bytes of what ``full_ids`` spell (counting from the end keeps the prompt's
    tokens out of it). A token straddling the boundary ends at > 0 all the same."""
    ends, pos = [], text_bytes
    for i in reversed(full_ids[n_prompt:]):
        ends.append(pos)
        pos -= len(table[i])
    return ends[::-1]


@dataclass(frozen=True)
class Group:
    """Tokens ``[s0, s1)`` of the student's response and ``[t0, t1)`` of the teacher's cover bytes
    ``[b0, b1)`` of the response (``b0 == b1`` only for the EOS group)."""
    s0: int
    s1: int
    t0: int
    t1: int
    b0: int
    b1: int


def align(s_ends: list[int], t_ends: list[int], limit: int | None = None) -> list[Group]:
    """Groups over the common token boundaries of two tokenizations (token end offsets, non-decreasing),
    in order, covering bytes ``[0, last common boundary]`` exactly once; at most up to ``limit``."""
    cap = min(s_ends[-1] if s_ends else 0, t_ends[-1] if t_ends else 0)
    cap = cap if limit is None else min(cap, limit)
    groups, s, t, b0 = [], 0, 0, 0
    while s < len(s_ends) and t < len(t_ends):
        s1, t1 = s, t
        # take tokens on whichever side ends first until both sides end at the same byte
        while s1 < len(s_ends) and t1 < len(t_ends) and (s_ends[s1] != t_ends[t1] or s_ends[s1] <= b0):
            if s_ends[s1] <= t_ends[t1]:
                s1 += 1
            else:
                t1 += 1
        if s1 >= len(s_ends) or t1 >= len(t_ends) or s_ends[s1] > cap:
            break
        b1 = s_ends[s1]
        # zero-width tokens right after the boundary (none in byte-level text) stay with the next group
        groups.append(Group(s, s1 + 1, t, t1 + 1, b0, b1))
        s, t, b0 = s1 + 1, t1 + 1, b1
    return groups


def common_prefix(a: bytes, b: bytes) -> int:
    n = min(len(a), len(b))
    for i in range(n):
        if a[i] != b[i]:
            return i
    return n


def align_response(student_tok, teacher_tok, s_prompt_ids: list[int], s_response_ids: list[int],
                   teacher_prompt: str) -> tuple[list[int], list[int], list[Group]]:
    """Teacher ``(prompt_ids, response_ids)`` for the student's response and the aligned groups.

    ``s_response_ids`` are the student's response tokens (with EOS if it stopped); the teacher's
    response is the same text in its tokens, ending with its EOS exactly when the student's does.
    """
    s_table, t_table = token_bytes(student_tok), token_bytes(teacher_tok)
    ended = bool(s_response_ids) and s_response_ids[-1] == student_tok.eos_token_id
    body = s_response_ids[:-1] if ended else s_response_ids
    s_bytes = b"".join(s_table[i] for i in body)
    text = s_bytes.decode("utf-8", errors="replace")
    t_prompt_ids = teacher_tok.encode(teacher_prompt, add_special_tokens=False)
    full = teacher_tok.encode(teacher_prompt + text, add_special_tokens=False)
    t_response = full[len(t_prompt_ids):]
    text_bytes = text.encode("utf-8")
    s_ends = list(accumulate(len(s_table[i]) for i in body))
    t_ends = response_byte_ends(t_table, full, len(t_prompt_ids), len(text_bytes))
    groups = align(s_ends, t_ends, limit=common_prefix(s_bytes, text_bytes))
    complete = bool(groups) and groups[-1].b1 == len(s_bytes) == len(text_bytes) or not body
    if ended:
        t_response = t_response + [teacher_tok.eos_token_id]
        if complete:
            n = len(s_bytes)
            groups.append(Group(len(body), len(body) + 1, len(t_response) - 1, len(t_response), n, n))
    return t_prompt_ids, t_response, groups


def group_rows(groups_per_row: list[list[Group]], s_lengths: list[int], t_lengths: list[int]):
    """Row indices ``(s_rows, t_rows)`` of each group's first token into the row-major response logits of
    student and teacher (:func:`kdlab.modeling.response_logits`), whose rows are the sequences'
    response tokens in order (``s_lengths`` / ``t_lengths`` of them per sequence)."""
    s_rows, t_rows, s_off, t_off = [], [], 0, 0
    for groups, ns, nt in zip(groups_per_row, s_lengths, t_lengths):
        s_rows += [s_off + g.s0 for g in groups]
        t_rows += [t_off + g.t0 for g in groups]
        s_off, t_off = s_off + ns, t_off + nt
    return torch.tensor(s_rows, dtype=torch.long), torch.tensor(t_rows, dtype=torch.long)


@dataclass
class AlignedBatch:
    """The teacher-side batch for a student batch, and the aligned groups' logit rows on both sides."""
    teacher_batch: object
    s_rows: torch.Tensor
    t_rows: torch.Tensor
    groups: list


class CrossTokenizer:
    """Re-tokenises student batches for the teacher (its tokenizer and its own prompt template)."""

    def __init__(self, student_tok, teacher_tok, teacher_template: str):
        self.student_tok, self.teacher_tok, self.teacher_template = student_tok, teacher_tok, teacher_template
        token_bytes(student_tok), token_bytes(teacher_tok)   # refuse a non-byte-level tokenizer up front

    def teacher_prompt(self, example: dict) -> str:
        from kdlab.data import format_prompt

        return format_prompt(example, self.teacher_template, self.teacher_tok)

    def align_batch(self, batch) -> AlignedBatch:
        from kdlab.data import Encoded, collate

        if not batch.examples or len(batch.examples) != len(batch):
            raise ValueError("cross-tokenizer distillation needs each batch's examples (their prompts are "
                             "re-rendered with the teacher's template)")
        items, groups, s_lengths = [], [], []
        for i, ex in enumerate(batch.examples):
            s_prompt = batch.prompt_ids[i][batch.prompt_mask[i].bool()].tolist()
            s_resp = batch.labels[i][batch.response_mask[i]].tolist()
            t_prompt, t_resp, g = align_response(self.student_tok, self.teacher_tok, s_prompt, s_resp,
                                                 self.teacher_prompt(ex))
            if not t_resp:   # an empty response still needs a teacher position; it forms no group
                t_resp = [self.teacher_tok.eos_token_id]
            items.append(Encoded(t_prompt, t_resp, ex))
            groups.append(g)
            s_lengths.append(len(s_resp))
        t_batch = collate(items, self.teacher_tok.pad_token_id).to(batch.input_ids.device)
        s_rows, t_rows = group_rows(groups, s_lengths, [len(it.response_ids) for it in items])
        return AlignedBatch(t_batch, s_rows.to(batch.input_ids.device), t_rows.to(batch.input_ids.device), groups)

    @torch.no_grad()
    def teacher_group_logits(self, teacher, aligned: AlignedBatch) -> torch.Tensor:
        """The teacher's logits ``(G, V_t)`` at the groups' first tokens only (row ``g`` for group ``g``,
        so ``t_rows`` becomes ``arange(G)``): its LM head runs on no other position."""
        from kdlab.modeling import response_logits

        tb = aligned.teacher_batch
        pos = tb.response_mask.long().cumsum(1) - 1          # response index of each predicting position
        first = torch.zeros_like(tb.response_mask)
        for i, groups in enumerate(aligned.groups):
            starts = torch.tensor([g.t0 for g in groups], dtype=torch.long, device=pos.device)
            first[i] = tb.response_mask[i] & torch.isin(pos[i], starts)
        return response_logits(teacher, tb.input_ids, tb.attention_mask, first, len(self.teacher_tok))

    def distill(self, divergence, student_logits, teacher, batch, per_sequence: bool = False) -> torch.Tensor:
        """Mean aligned divergence of ``student_logits`` (the student's response rows of ``batch``): over all
        groups of the batch, or (``per_sequence``, GKD's Eq. 2 read on groups) the mean over each sequence's
        groups and then over the sequences that have any (a sampled response whose text the teacher's
        tokenizer does not reproduce may align nowhere: it has no term, as in the pooled mean)."""
        aligned = self.align_batch(batch)
        t_logits = self.teacher_group_logits(teacher, aligned)
        rows = torch.arange(len(aligned.t_rows), device=t_logits.device)
        if not per_sequence:
            return divergence(student_logits, t_logits, aligned.s_rows, rows)
        values = divergence.per_group(student_logits, t_logits, aligned.s_rows, rows)
        counts = torch.tensor([len(g) for g in aligned.groups], device=values.device)
        sequence = torch.repeat_interleave(torch.arange(len(counts), device=values.device), counts)
        sums = values.new_zeros(len(counts)).index_add(0, sequence, values)
        aligned_rows = counts > 0
        return (sums[aligned_rows] / counts[aligned_rows]).sum() / aligned_rows.sum().clamp(min=1)


@torch.no_grad()
def held_out_divergence(student, teacher, xtok: CrossTokenizer, divergence, items: list, batch_size: int = 8) -> float:
    """Mean aligned divergence (no CE term) of ``student`` from ``teacher`` over encoded student ``items``
    (prompts with their gold responses): the quantity cross-tokenizer KD lowers, on held-out data."""
    from kdlab.data import collate
    from kdlab.modeling import response_logits

    total, count = 0.0, 0
    device = next(student.parameters()).device
    for i in range(0, len(items), batch_size):
        batch = collate(items[i:i + batch_size], xtok.student_tok.pad_token_id).to(device)
        s_logits = response_logits(student, batch.input_ids, batch.attention_mask, batch.response_mask,
                                   len(xtok.student_tok))
        aligned = xtok.align_batch(batch)
        t_logits = xtok.teacher_group_logits(teacher, aligned)
        vals = divergence.per_group(s_logits, t_logits, aligned.s_rows, torch.arange(len(aligned.t_rows)))
        total, count = total + float(vals.sum()), count + vals.numel()
    return total / max(count, 1)


def check_config(cfg, method) -> None:
    """Refuse, before anything loads, a setting that a cross-tokenizer divergence makes meaningless (which
    methods and teachers work across tokenizers is the methods' table: :func:`kdlab.teacher.check_teacher`)."""
    from kdlab.divergences import is_cross_tokenizer

    name, div = cfg.method.name, cfg.divergence.name
    if not is_cross_tokenizer(div) or not method.teacher_needs:
        return
    if name == "kd" and cfg.method.alpha != 0.5:
        raise ConfigError(f"method.alpha={cfg.method.alpha} does not apply with divergence={div}: its loss is "
                          f"distill_weight * ULD + ce_weight * MLE; set divergence.ce_weight / "
                          f"divergence.distill_weight instead (and leave method.alpha at 0.5)")
