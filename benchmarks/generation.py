"""Generation throughput of the engine (:mod:`kdlab.generation`): batched vs one prompt at a time.

The student ``smollm2-6l`` (6 of SmolLM2-135M-Instruct's layers, fp32) continues ``--batch`` (16)
synthetic chat prompts by ``--new_tokens`` (32) sampled tokens (temperature 1, fixed seed):

- ``one at a time``: ``kdlab.generation.generate`` called per prompt (transformers' ``generate``, batch 1);
- ``batched``: one ``generate`` call on the left-padded batch;
- ``mixture batched``: ``sample_mixture`` with the teacher (alpha = 0.2; two models per token).

Throughput = generated tokens (up to and including EOS) / wall-clock seconds, median of ``--repeats`` (3),
the variants interleaved (:func:`benchmarks.harness.median_times`).
``--teacher``/``--teacher_shape``/``--student``/``--device``: other models or CUDA
(:func:`benchmarks.harness.load_models`); ``--max_prompt_length``/``--max_length`` (256/512; a byte-level
tokenizer, as ``tiny``'s, needs 384/512).
Target: batched >= 4x one-at-a-time tokens/s at batch 16.
"""
from __future__ import annotations


from benchmarks.harness import autocast_steps, load_models, median_times, placement, teacher_label
from benchmarks.onpolicy import examples


def run(args: dict) -> dict:
    from kdlab.data import collate, encode
    from kdlab.generation import generate, sample_mixture

    batch, new_tokens, repeats = int(args.get("batch", 16)), int(args.get("new_tokens", 32)), int(args.get("repeats", 3))
    teacher, student, tok, template, runtime = load_models(args)
    student.eval()
    b = collate(encode(examples(batch), tok, template, int(args.get("max_prompt_length", 256)),
                       int(args.get("max_length", 512))), tok.pad_token_id).to(runtime.device)
    kw = dict(max_new_tokens=new_tokens, do_sample=True, seed=0)
    counts = {}

    def single():
        n = 0
        for i in range(batch):
            mask = b.prompt_mask[i:i + 1]
            keep = mask[0].bool()
            n += int(generate(student, tok, b.prompt_ids[i:i + 1, keep], mask[:, keep], **kw).response_mask.sum())
        counts["one at a time"] = n

    def batched():
        counts["batched"] = int(generate(student, tok, b.prompt_ids, b.prompt_mask, **kw).response_mask.sum())

    def mixture():
        out = sample_mixture(student, teacher, tok, b.prompt_ids, b.prompt_mask, alpha=0.2, max_new_tokens=new_tokens,
                             seed=0)
        counts["mixture batched"] = int(out.response_mask.sum())

    seconds = median_times(autocast_steps({"one at a time": single, "batched": batched, "mixture batched": mixture},
                                          runtime), repeats)
    rows = [{"generation": name, "batch": 1 if name == "one at a time" else batch, "tokens": counts[name],
             "s": s, "tokens/s": counts[name] / s} for name, s in seconds.items()]
    speedup = rows[1]["tokens/s"] / rows[0]["tokens/s"]
    return {"rows": rows, "notes": [
        f"{batch} prompts, up to {new_tokens} new tokens each, sampling at temperature 1 (seed 0), student "
        f"{args.get('student', 'smollm2-6l')} (mixture: + teacher {teacher_label(args)}), {placement(runtime)}. "
        f"Batched / one-at-a-time throughput: {speedup:.1f}x "
        f"(target >= 4x)."]}


if __name__ == "__main__":
    import sys

    from benchmarks.harness import main

    sys.exit(main(["generation", *sys.argv[1:]]))
