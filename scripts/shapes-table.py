"""RESULTS.md "Pruned students after 150 steps": one markdown row per student shape from the runs of
scripts/shapes-dolly.sh (``<OUT>/runs/shape-<name>-<method>/*/``), read from each run's results.json (greedy
ROUGE-L and response-token loss of ``student_init`` and ``student`` on the ``valid`` and ``dolly`` (test) sets),
metrics.jsonl (median ``train/step_time_s``) and the trained student's config.json and safetensors header.
    python scripts/shapes-table.py /work/shapes/runs > results/shapes-dolly.md
"""
import json
import statistics
import struct
import sys
from pathlib import Path


def one_run(root: Path, name: str, method: str) -> Path | None:
    found = sorted((root / f"shape-{name}-{method}").glob("*/results.json"))
    return found[0].parent if found else None


def parameters(student: Path) -> tuple[int, int]:
    """(all, in the transformer blocks) from the safetensors header: tied embeddings are stored once."""
    with open(student / "model.safetensors", "rb") as f:
        header = json.loads(f.read(struct.unpack("<Q", f.read(8))[0]))
    sizes = {k: 1 for k in header if k != "__metadata__"}
    for key in sizes:
        for n in header[key]["shape"]:
            sizes[key] *= n
    return sum(sizes.values()), sum(v for k, v in sizes.items() if ".layers." in k or ".h." in k)


def step_time(run: Path) -> float:
    times = [json.loads(line)["train/step_time_s"] for line in open(run / "metrics.jsonl")
             if "train/step_time_s" in line]
    return statistics.median(times)


def cell(results: dict, model: str, dataset: str) -> str:
    scores = results["eval"].get(model, {}).get(dataset)
    return "—" if scores is None else f"{scores['rougeL']:.2f} / {scores['loss']:.2f}"


def main(root: Path) -> None:
    names = sorted({p.name[len("shape-"):].rsplit("-", 1)[0] for p in root.glob("shape-*")})
    print("| shape | blocks | heads / kv | MLP | block params | all params | s/step SFT | s/step KD "
          "| start valid | SFT valid | KD valid | start test | SFT test | KD test |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    teacher = None
    for name in names:
        runs = {m: one_run(root, name, m) for m in ("sft", "kd")}
        first = next((r for r in runs.values() if r), None)
        if first is None:
            continue
        results = {m: json.loads((r / "results.json").read_text()) for m, r in runs.items() if r}
        shape = json.loads((first / "student" / "config.json").read_text())
        total, blocks = parameters(first / "student")
        init = results.get("sft", results.get("kd"))
        teacher = teacher or (init["eval"].get("teacher") and init)
        row = [name, shape["num_hidden_layers"], f"{shape['num_attention_heads']}/{shape['num_key_value_heads']}",
               shape["intermediate_size"], f"{blocks / 1e6:.1f}M", f"{total / 1e6:.1f}M",
               *(f"{step_time(runs[m]):.2f}" if runs[m] else "—" for m in ("sft", "kd"))]
        for dataset in ("valid", "dolly"):
            row.append(cell(init, "student_init", dataset))
            row += [cell(results[m], "student", dataset) if m in results else "—" for m in ("sft", "kd")]
        print("| " + " | ".join(str(c) for c in row) + " |")
    if teacher:
        print(f"\nFine-tuned teacher (ROUGE-L / loss): valid {cell(teacher, 'teacher', 'valid')}, "
              f"test {cell(teacher, 'teacher', 'dolly')}")


if __name__ == "__main__":
    main(Path(sys.argv[1]))
