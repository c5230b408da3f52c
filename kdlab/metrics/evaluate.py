"""Evaluation of one model on one test set: generation metrics, test-set loss, and (for students) the
teacher-forcing analysis against the teacher.

Generation follows MiniLLM's protocol when ``eval.do_sample`` is true (temperature 1, one run per
seed in ``eval.seeds``, the mean reported, per-seed values kept under ``per_seed``) and is greedy
otherwise. ROUGE-L and exact match are those of ``kdlab.metrics`` (rouge-score, stemmer on, F-measure,
max over references, x100); Dist-4 is pooled over the responses.

Sampling is reproducible per seed: batch ``i`` of seed ``s`` is drawn with torch seed
``s + 1_000_003 * i`` (a distinct stream per batch, so batches do not share their random draws), which
does not depend on the other seeds evaluated or on the global RNG. It does depend on
``eval.batch_size`` (batch composition changes the padded shapes and the order of the draws).

Result keys (one dict per model and dataset, see docs/DESIGN.md):
``rougeL``, ``exact_match``, ``dist4`` (means over seeds), ``per_seed`` (``{seed: {rougeL,
exact_match, dist4}}``, sampling only), ``rougeL_per_seed`` (list, sampling only), ``per_row``
(``{"id": [...], "rougeL": [...], "exact_match": [...]}``: each evaluated row's example id and its
scores, averaged over the sampling seeds, so that ``kdlab.report`` can pair two models on the same
rows; rows dropped by ``max_prompt_length`` are not evaluated and not listed), ``samples`` (three
responses of the first seed), ``num_examples``, ``loss`` (token-level NLL of the gold responses), and
with a teacher and ``eval.analysis.enabled`` (see :func:`analysis`): ``top1``, ``kl``,
``unc_buckets``, ``exaccerr``, ``exaccerr_regret_student``, ``exaccerr_regret_teacher``.
"""
from __future__ import annotations

import math
import statistics
from pathlib import Path

import torch
import torch.nn.functional as F

from kdlab.checkpoint import atomic_write_json, read_json
from kdlab.config import ConfigError, Range, Type, check_section
from kdlab.data import collate
from kdlab.distributed import barrier
from kdlab.generation import generate
from kdlab.loggers import progress
from kdlab.metrics import (bucket_token_stats, distinct_n, exact_match, exaccerr, exaccerr_from_regrets,
                           rouge_l_per_example, token_stats)
from kdlab.modeling import response_logits

SCHEMA = {
    "datasets": Type(list, dict, optional=True),   # names or {name: dataset keys}: kdlab.data.eval_datasets
    "test_examples": Range(1, integer=True, optional=True),
    "models": Type(list),
    "batch_size": Range(1, integer=True),
    "max_new_tokens": Range(1, integer=True),
    "do_sample": Type(bool),
    "temperature": Range(0, low_open=True),
    "top_p": Range(0, 1, low_open=True),
    "top_k": Range(0, integer=True),
    "seeds": Type(list),
    "no_repeat_ngram_size": Range(0, integer=True),
    "analysis": Type(dict),
}
ANALYSIS_SCHEMA = {
    "enabled": Type(bool),
    "unc_quantiles": Type(list),
    "exaccerr_lengths": Type(list),
    "exaccerr_samples": Range(1, integer=True),
    "max_examples": Range(1, integer=True, optional=True),
}
MODELS = ("teacher", "student_init", "student")
# Distinct sampling streams per batch: batch i of seed s uses s + SEED_STRIDE * i.
SEED_STRIDE = 1_000_003


def validate_eval(cfg) -> None:
    check_section("eval", cfg, SCHEMA)
    for name in cfg.models:
        if name not in MODELS:
            raise ConfigError(f"eval.models contains {name!r}; valid: {', '.join(MODELS)}")
    if cfg.do_sample and not cfg.seeds:
        raise ConfigError("eval.do_sample=true needs at least one seed; set eval.seeds=[10,20,30,40,50]")
    for i, seed in enumerate(cfg.seeds):
        Range(0, integer=True)(f"eval.seeds[{i}]", seed)
    check_section("eval.analysis", cfg.analysis, ANALYSIS_SCHEMA)
    q = list(cfg.analysis.unc_quantiles)
    if any(isinstance(x, bool) or not isinstance(x, (int, float)) or not 0 < x < 1 for x in q) or q != sorted(set(q)):
        raise ConfigError(f"eval.analysis.unc_quantiles={q} must be strictly increasing numbers in (0, 1), "
                          f"e.g. [0.25,0.5,0.75] ([] gives one bucket)")
    if not cfg.analysis.exaccerr_lengths:
        raise ConfigError("eval.analysis.exaccerr_lengths is empty; set e.g. eval.analysis.exaccerr_lengths=[16]")
    for i, length in enumerate(cfg.analysis.exaccerr_lengths):
        Range(1, integer=True)(f"eval.analysis.exaccerr_lengths[{i}]", length)


def references(example: dict) -> list[str]:
    return list(example.get("references") or [example["output"]])


def chunks(items, size):
    for i in range(0, len(items), size):
        yield items[i:i + size]


@torch.no_grad()
def test_loss(model, encoded, tokenizer, batch_size: int, device, autocast) -> float:
    """Token-level mean NLL of the gold responses (teacher forcing), LM head at response positions only."""
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    for part in chunks(encoded, batch_size):
        batch = collate(part, tokenizer.pad_token_id).to(device)
        with autocast:
            logits = response_logits(model, batch.input_ids, batch.attention_mask, batch.response_mask, len(tokenizer))
        total += F.cross_entropy(logits.float(), batch.labels[batch.response_mask], reduction="sum").item()
        count += int(batch.response_mask.sum())
    model.train(was_training)
    return total / max(count, 1)


@torch.no_grad()
def generate_texts(model, tokenizer, encoded, cfg, device, seed: int | None, desc: str) -> list[str]:
    texts = []
    parts = list(chunks(encoded, cfg.batch_size))
    for i, part in enumerate(progress(parts, desc=desc, leave=False)):
        batch = collate(part, tokenizer.pad_token_id).to(device)
        out = generate(model, tokenizer, batch.prompt_ids, batch.prompt_mask, max_new_tokens=cfg.max_new_tokens,
                       do_sample=cfg.do_sample, temperature=cfg.temperature, top_p=cfg.top_p, top_k=cfg.top_k,
                       no_repeat_ngram_size=cfg.no_repeat_ngram_size,
                       seed=None if seed is None else seed + SEED_STRIDE * i)
        texts.extend(out.texts(tokenizer))
    return texts


def _finite(x: float) -> float | None:
    """JSON has no NaN/inf: an undefined value (empty bucket, zero teacher regret) is stored as null."""
    return x if math.isfinite(x) else None


def pooled_increments(regrets: list[tuple[int, list[float], list[float]]]) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-position mean KL on student and on teacher prefixes, pooled over batches of prompts.

    ``regrets``: per batch ``(prompts, R(1..L), l eps(1..L))``. R and l eps are means over prompts of
    cumulative sums, so the pooled curve is the prompt-weighted mean of the batch curves, and its
    increments are the per-position values that :func:`kdlab.metrics.exaccerr_from_regrets` takes.
    """
    weights = torch.tensor([float(n) for n, _, _ in regrets], dtype=torch.float64)
    curves = [(weights[:, None] * torch.tensor([r[k] for r in regrets], dtype=torch.float64)).sum(0) / weights.sum()
              for k in (1, 2)]
    return tuple(curve.diff(prepend=curve.new_zeros(1)) for curve in curves)


@torch.no_grad()
def analysis(student, teacher, tokenizer, encoded, cfg, runtime, batch_size: int,
             seed: int = 0) -> dict:
    """Teacher-forcing analysis of ``student`` against ``teacher`` (OKD, Rao et al. 2024, Sec. 3).

    On the first ``cfg.max_examples`` gold sequences (``cfg`` is ``eval.analysis``), at every response
    position, with teacher ``p`` and student ``q`` (``kdlab.metrics.analysis`` has the definitions):

    - ``top1``: TOP-1 agreement, mean of ``1[argmax q = argmax p]`` (OKD Eq. 3), in [0, 1];
    - ``kl``: mean KL(p || q) per token;
    - ``unc_buckets``: tokens grouped by the teacher's UNC (OKD Eq. 4; ``1 - p(gold token)``) at the
      quantiles ``cfg.unc_quantiles`` (OKD Figs. 2 and 5). One dict per bucket, easy to hard:
      ``bucket`` (index), ``quantile_low/high``, ``unc_low/high`` (edges), ``unc_mean``, ``count``,
      ``std`` (mean over tokens of the std of the student's logits), ``kl``, ``top1``;
    - ``exaccerr``: ``{"l=<l>": ExAccErr(l) in %}`` for ``l`` in ``cfg.exaccerr_lengths`` (OKD Eqs. 5-7,
      Arora et al. 2022), Monte-Carlo with ``cfg.exaccerr_samples`` continuations per prompt sampled
      from each model (:func:`kdlab.metrics.exaccerr` per batch of prompts, batch ``i`` with torch seed
      ``seed + 1_000_003 * i``, pooled by :func:`pooled_increments`); ``exaccerr_regret_student``
      (R(l)) and ``exaccerr_regret_teacher`` (l eps(l)) alongside.

    Logits are computed batch by batch at response positions only; per-token scalars are kept, never
    the ``(N, V)`` logits of the whole set; ``batch_size`` sequences (prompts for ExAccErr, each with
    its samples) at a time, grouped by length. Undefined values (an empty bucket) are ``None``.
    """
    items = encoded[: cfg.max_examples] if cfg.max_examples else encoded
    longest = max(cfg.exaccerr_lengths)
    # Batches of similar lengths waste little compute on padding; the metrics are order-free means.
    by_length = sorted(items, key=lambda it: (len(it.prompt_ids), len(it.response_ids)))
    pad, vocab_size = tokenizer.pad_token_id, len(tokenizer)
    modes = [(m, m.training) for m in (student, teacher)]
    for m, _ in modes:
        m.eval()
    try:
        parts, regrets = [], []
        for i, part in enumerate(chunks(by_length, batch_size)):
            batch = collate(part, pad).to(runtime.device)
            with runtime.autocast():
                s, t = (response_logits(m, batch.input_ids, batch.attention_mask, batch.response_mask, vocab_size)
                        for m in (student, teacher))
                parts.append(token_stats(s, t, targets=batch.labels[batch.response_mask]))
                del s, t  # (tokens, V) each: free before sampling
                ex = exaccerr(student, teacher, batch.prompt_ids, batch.prompt_mask, lengths=range(1, longest + 1),
                              num_samples=cfg.exaccerr_samples, seed=seed + SEED_STRIDE * i,
                              eos_token_id=tokenizer.eos_token_id, pad_token_id=pad, vocab_size=vocab_size)
            regrets.append((len(part), ex["regret_student"], ex["regret_teacher"]))
    finally:
        for m, was_training in modes:
            m.train(was_training)
    stats = {key: torch.cat([p[key] for p in parts]) for key in parts[0]}
    ex = exaccerr_from_regrets(*pooled_increments(regrets), lengths=list(cfg.exaccerr_lengths))
    buckets = [{"bucket": b["bucket"], "quantile_low": b["quantile_low"], "quantile_high": b["quantile_high"],
                "unc_low": b["unc_low"], "unc_high": b["unc_high"], "unc_mean": _finite(b["unc_mean"]),
                "count": b["count"], "std": _finite(b["student_logit_std"]), "kl": _finite(b["kl"]),
                "top1": _finite(b["top1"])}
               for b in bucket_token_stats(stats, quantiles=list(cfg.unc_quantiles) or None, n_buckets=1)]
    keys = [f"l={length}" for length in ex["lengths"]]
    return {
        "top1": stats["top1"].double().mean().item(),
        "kl": stats["kl"].double().mean().item(),
        "unc_buckets": buckets,
        "exaccerr": dict(zip(keys, map(_finite, ex["exaccerr"]))),
        "exaccerr_regret_student": dict(zip(keys, ex["regret_student"])),
        "exaccerr_regret_teacher": dict(zip(keys, ex["regret_teacher"])),
        "analysis_examples": len(items),
        "analysis_tokens": int(stats["top1"].numel()),
    }


def evaluate(model, tokenizer, encoded, cfg, runtime, desc: str = "eval", teacher=None) -> dict:
    """Metrics of ``model`` on ``encoded`` examples; ``cfg`` is the ``eval`` config section.

    With ``teacher`` (a student row) and ``cfg.analysis.enabled``, the teacher-forcing analysis
    (:func:`analysis`) is added; its ExAccErr samples use the first of ``cfg.seeds`` (0 if none).
    """
    refs = [references(e.example) for e in encoded]
    seeds = list(cfg.seeds) if cfg.do_sample else [None]
    per_seed, row_scores = {}, []
    for seed in seeds:
        texts = generate_texts(model, tokenizer, encoded, cfg, runtime.device, seed, f"{desc} gen"
                               + (f" seed {seed}" if seed is not None else ""))
        rows = {"rougeL": rouge_l_per_example(texts, refs),
                "exact_match": [exact_match([text], [ref]) for text, ref in zip(texts, refs)]}
        row_scores.append(rows)
        per_seed[seed] = {**{key: sum(v) / len(v) if v else 0.0 for key, v in rows.items()},
                          "dist4": distinct_n(texts, 4), "samples": texts[:3]}
    runs = list(per_seed.values())
    result = {key: statistics.fmean(s[key] for s in runs) for key in ("rougeL", "exact_match", "dist4")}
    if cfg.do_sample:
        result["per_seed"] = {str(seed): {k: v for k, v in s.items() if k != "samples"} for seed, s in per_seed.items()}
        result["rougeL_per_seed"] = [s["rougeL"] for s in runs]
    # the example id pairs rows across models and runs (the position would shift with dropped rows)
    result["per_row"] = {"id": [str(e.example.get("id", i)) for i, e in enumerate(encoded)],
                         **{key: [statistics.fmean(row) for row in zip(*(r[key] for r in row_scores))]
                            for key in ("rougeL", "exact_match")}}
    result["samples"] = runs[0]["samples"]
    result["num_examples"] = len(encoded)
    result["loss"] = test_loss(model, encoded, tokenizer, cfg.batch_size, runtime.device, runtime.autocast())
    analysis_cfg = cfg.get("analysis")
    if teacher is not None and analysis_cfg is not None and analysis_cfg.enabled and encoded:
        result.update(analysis(model, teacher, tokenizer, encoded, analysis_cfg, runtime, cfg.batch_size, seed=int(cfg.seeds[0]) if cfg.seeds else 0))
    return result


def check_generation_room(model, sets: dict, max_new_tokens: int, name: str) -> None:
    """The longest prompt of ``sets`` (``{set name: [Encoded]}``) plus ``eval.max_new_tokens`` fits a model
    with a learned position table (GPT-2's ``wpe``: an embedding of ``max_position_embeddings`` rows), which
    otherwise fails mid-generation with an IndexError. Rotary models have no such table and are not limited."""
    limit = getattr(getattr(model, "config", None), "max_position_embeddings", None)
    prompts = [(len(item.prompt_ids), data) for data, items in sets.items() for item in items or []]
    if not limit or not prompts or not any(isinstance(module, torch.nn.Embedding) and module.num_embeddings == limit
                                           for module in model.modules()):
        return
    longest, data = max(prompts)
    if longest + max_new_tokens > limit:
        raise ConfigError(f"eval.max_new_tokens={max_new_tokens} does not fit the {name}: its longest {data} prompt "
                          f"has {longest} tokens and the model {limit} positions; set eval.max_new_tokens to at most "
                          f"{limit - longest}, or lower the dataset's max_prompt_length")


def evaluate_sets(model, tokenizer, sets: dict, cfg, runtime, name: str, teacher=None) -> dict:
    """``{dataset: metrics}`` of ``model`` (a row named ``name``) on every encoded test set of ``sets``."""
    check_generation_room(model, sets, cfg.max_new_tokens, name)
    return {data: evaluate(model, tokenizer, items, cfg, runtime, desc=f"{name}/{data}", teacher=teacher)
            for data, items in sets.items()}


def evaluate_once(run_dir: Path, name: str, model, tokenizer, sets: dict, cfg, runtime, teacher=None) -> dict | None:
    """:func:`evaluate_sets` measured once per job: a resumed job reuses what the interrupted one wrote to
    ``<run_dir>/eval/<name>.json``. Rank 0 (every rank under ZeRO-3) evaluates; the other ranks wait and
    get None."""
    path = run_dir / "eval" / f"{name}.json"
    result = None
    if path.exists():
        result = read_json(path)
    elif runtime.evaluates:
        result = evaluate_sets(model, tokenizer, sets, cfg, runtime, name, teacher)
        if runtime.is_main:
            atomic_write_json(path, result)
    barrier()
    return result


def decoding_text(cfg) -> str:
    """How ``eval`` config ``cfg`` decodes the scored generations, in words (results.json ``run.decoding``)."""
    limit = f", at most {cfg['max_new_tokens']} new tokens"
    limit += f", no repeated {cfg['no_repeat_ngram_size']}-grams" if cfg.get("no_repeat_ngram_size") else ""
    if not cfg["do_sample"]:
        return "greedy" + limit
    cut = "".join(f", {name} {cfg[key]}" for name, key, off in (("top-p", "top_p", 1.0), ("top-k", "top_k", 0))
                  if cfg.get(key, off) != off)
    seeds = list(cfg.get("seeds") or [])
    return f"sampled at temperature {cfg['temperature']}{cut}, mean of {len(seeds)} seeds {seeds}{limit}"


def rows_text(counts: dict | None) -> str:
    """A split's rows as results.json ``data`` counts them: kept of all, and why the others were dropped."""
    if not counts:
        return "not recorded"
    text = f"{counts['kept']} of {counts['rows']}"
    if counts.get("dropped"):
        text += f" ({counts['dropped']} dropped: prompt over {counts.get('max_prompt_length')} tokens)"
    if counts.get("truncated"):
        text += f", {counts['truncated']} responses cut at {counts.get('max_length')} tokens"
    return text


def measured_line(results: dict) -> str:
    """The line under a job's tables: the decoding and the test rows scored behind its numbers ('' for
    results that record neither)."""
    tests = (results.get("data") or {}).get("test") or {}
    decoding = results["run"].get("decoding")
    if not tests and not decoding:
        return ""
    scored = "; ".join(f"{name} {rows_text(counts)}" for name, counts in tests.items())
    return (f"Measured: generations {decoding or 'not recorded'}; test rows scored: {scored or 'not recorded'}.")


def results_table(evals: dict) -> str:
    """Markdown table of ROUGE-L, exact match and test loss per model and dataset."""
    rows = ["| model | dataset | ROUGE-L | EM | loss |", "|---|---|---:|---:|---:|"]
    for model, per_data in evals.items():
        for data, m in per_data.items():
            loss = f"{m['loss']:.3f}" if "loss" in m else "-"
            rows.append(f"| {model} | {data} | {m['rougeL']:.2f} | {m['exact_match']:.2f} | {loss} |")
    return "\n".join(rows)


def analysis_table(evals: dict) -> str:
    """Markdown table of Dist-4 and the analysis metrics per model and dataset ('' when none has them)."""
    lengths = list(dict.fromkeys(k for per_data in evals.values() for m in per_data.values()
                                 for k in m.get("exaccerr", {})))
    rows = []
    for model, per_data in evals.items():
        for data, m in per_data.items():
            if "top1" not in m:
                continue
            ex = [m["exaccerr"].get(k) for k in lengths]
            rows.append(f"| {model} | {data} | {m['dist4']:.3f} | {100 * m['top1']:.2f} | {m['kl']:.4f} | "
                        + " | ".join("-" if v is None else f"{v:.2f}" for v in ex) + " |")
    if not rows:
        return ""
    # "KL(p‖q)": a plain "||" would split the markdown cell
    cols = ["Dist-4", "TOP-1 %", "KL(p‖q)", *(f"ExAccErr {k} %" for k in lengths)]
    head = ["| model | dataset | " + " | ".join(cols) + " |",
            "|---|---|" + "---:|" * (3 + len(lengths))]
    return "\n".join(head + rows)
