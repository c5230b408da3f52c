"""A plain-text corpus packed into fixed-length token rows: MiniLLM's pre-training ("PTX") data.

Documents come from a ``.txt`` file (one document per non-empty line) or a ``.jsonl`` file (each
object's ``text`` field), in file order, until ``max_tokens`` tokens are read. Each document is
followed by EOS and the token stream is cut into rows of ``length`` tokens, the incomplete last row
dropped: the packing LMOps applies to OpenWebText for MiniLLM's ``L_PT``.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch

from kdlab.config import ConfigError
from kdlab.data.sources import _resolve
from kdlab.loggers import progress


def documents(path: Path, key: str):
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            if path.suffix != ".jsonl":
                yield line.rstrip("\n")
                continue
            row = json.loads(line)
            if not isinstance(row.get("text"), str):
                raise ConfigError(f"{key}={path}: line {number} has no string field 'text'; a .jsonl corpus needs "
                                  f"one {{\"text\": ...}} object per line (or use a .txt file, one document per line)")
            yield row["text"]


def check_corpus(path: str, key: str) -> Path:
    file = _resolve(path)
    if not file.is_file():
        raise ConfigError(f"{key}={path}: no such file; point it at a local .txt (one document per line) or .jsonl "
                          f"(a 'text' field per line) corpus, e.g. OpenWebText (MiniLLM's, LMOps) saved once with `python "
                          f"-c \"import datasets, json; [print(json.dumps({{'text': r['text']}})) for r in datasets."
                          f"load_dataset('Skylion007/openwebtext', split='train', streaming=True).take(50000)]\" > "
                          f"{path}`, or set {key}=null (no PTX term)")
    return file


def pack_corpus(path: str, tokenizer, length: int, max_tokens: int, key: str = "method.ptx_corpus") -> torch.Tensor:
    """``(rows, length)`` token ids of the corpus at ``path`` (module docstring)."""
    file = check_corpus(path, key)
    parts, total, texts = [], 0, []

    def flush():
        nonlocal total
        if not texts:
            return
        for ids in tokenizer(texts, add_special_tokens=False)["input_ids"]:
            parts.append(torch.tensor(ids + [tokenizer.eos_token_id], dtype=torch.long))
            total += len(parts[-1])
        texts.clear()

    with progress(total=max_tokens, desc=f"packing {file.name}", unit="tok", leave=False) as bar:
        for text in documents(file, key):
            texts.append(text)
            if len(texts) == 256:   # batches of documents: the fast tokenizer encodes them in parallel
                before = total
                flush()
                bar.update(min(total, max_tokens) - min(before, max_tokens))
                if total >= max_tokens:
                    break
        flush()
    rows = min(total, max_tokens) // length
    if rows == 0:
        raise ConfigError(f"{key}={path} has {total} tokens, fewer than one row of {length}; use a larger corpus "
                          f"or a smaller method.ptx_length")
    return torch.cat(parts)[: rows * length].view(rows, length)
