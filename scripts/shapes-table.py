"""RESULTS.md "Pruned students after 150 steps": one markdown row per student shape from the runs of
scripts/shapes-dolly.sh, read from each run's results.json (greedy ROUGE-L and response-token loss of
``student_init`` and ``student`` on the ``valid`` and ``dolly`` (test) sets) and metrics.jsonl (median
``train/step_time_s``; the machine it ran on is listed below the table). A run is
``<OUT>/runs/shape-<name>-<method>/*/`` as it ran, or ``results/shapes-dolly/shape-<name>-<method>/`` as kept
(its small files only); the roots are searched in the order given. The shape and parameter counts come from
the trained student (config.json, safetensors header) where the run folder has it, else from the shape's row of
``--prune-rows`` (scripts/prune-dolly.sh's ``python -m kdlab.prune`` lines, the same shape by the same
settings).
Then, per method, each shape's ROUGE-L minus that of the ``--against`` shape nearest to it in block parameters
(default ``even-15 even-8``: the even cut of the same size) over the same valid / test rows, with a 95 % paired
bootstrap interval over rows (10,000 resamples, seed 0; one training seed, so seed variance is not in it), and KD
minus SFT per shape, the same way.
    python scripts/shapes-table.py outputs/runs results/shapes-dolly [--against even-15 even-8]
"""
import argparse
import json
import statistics
import struct
from pathlib import Path


def one_run(roots: list[Path], name: str, method: str) -> Path | None:
    for root in roots:
        folder = root / f"shape-{name}-{method}"
        found = sorted(folder.glob("results.json")) + sorted(folder.glob("*/results.json"))
        if found:
            return found[0].parent
    return None


def shape_and_parameters(run: Path, prune_rows: dict[str, dict], name: str) -> tuple[dict, int, int]:
    """(shape, all parameters, block parameters) of the run's student."""
    student = run / "student"
    if (student / "config.json").exists():
        config = json.loads((student / "config.json").read_text())
        shape = {"num_layers": config["num_hidden_layers"], "num_attention_heads": config["num_attention_heads"],
                 "num_key_value_heads": config["num_key_value_heads"],
                 "intermediate_size": config["intermediate_size"]}
        return (shape, *parameters(student))
    if name not in prune_rows:
        raise SystemExit(f"{run} keeps no student/ and --prune-rows has no row {name!r}: pass the prune rows of "
                         f"scripts/prune-dolly.sh (results/prune-dolly.jsonl)")
    row = prune_rows[name]
    return row["shape"], row["student_params"], row["student_block_params"]


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


def paired(a: dict, b: dict) -> str:
    """mean of a - b over the rows both scored, and its 95 % bootstrap interval over rows."""
    import numpy as np

    ra, rb = (dict(zip(x["per_row"]["id"], x["per_row"]["rougeL"])) for x in (a, b))
    d = np.array([ra[i] - rb[i] for i in sorted(ra) if i in rb])
    rng = np.random.default_rng(0)
    means = d[rng.integers(0, len(d), (10_000, len(d)))].mean(axis=1)
    low, high = np.percentile(means, [2.5, 97.5])
    return f"{d.mean():+.2f} [{low:+.2f}, {high:+.2f}] ({len(d)} rows)"


def differences(roots: list[Path], names: list[str], against: list[str], block_params: dict[str, int]) -> None:
    """Each shape against the ``against`` shape nearest in block parameters, then KD against SFT."""
    print(f"\nROUGE-L minus the nearest-sized of {', '.join(against)} (same method), paired over rows (95 % "
          f"bootstrap interval):\n")
    print("| shape | method | minus | valid | test |")
    print("|---|---|---|---|---|")
    present = [a for a in against if a in block_params]
    for method in ("sft", "kd"):
        for name in names:
            if name in against or not present:
                continue
            nearest = min(present, key=lambda a: abs(block_params[a] - block_params[name]))
            base, run = one_run(roots, nearest, method), one_run(roots, name, method)
            if base is None or run is None:
                continue
            base, student = (json.loads((r / "results.json").read_text())["eval"]["student"] for r in (base, run))
            print(f"| {name} | {method} | {nearest} | {paired(student['valid'], base['valid'])} | "
                  f"{paired(student['dolly'], base['dolly'])} |")
    print("\nKD minus SFT, same shape, paired over rows:\n")
    print("| shape | valid | test |")
    print("|---|---|---|")
    for name in names:
        runs = [one_run(roots, name, m) for m in ("kd", "sft")]
        if all(runs):
            kd, sft = (json.loads((r / "results.json").read_text())["eval"]["student"] for r in runs)
            print(f"| {name} | {paired(kd['valid'], sft['valid'])} | {paired(kd['dolly'], sft['dolly'])} |")


def main(roots: list[Path], against: list[str], prune_rows: Path | None) -> None:
    rows = {}
    if prune_rows is not None:
        rows = {row["student"]: row for row in map(json.loads, prune_rows.read_text().splitlines()) if row}
    names = sorted({p.name[len("shape-"):].rsplit("-", 1)[0] for root in roots for p in root.glob("shape-*")})
    print("| shape | blocks | heads / kv | MLP | block params | all params | s/step SFT | s/step KD "
          "| start valid | SFT valid | KD valid | start test | SFT test | KD test |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    teacher, machines, block_params = None, {}, {}
    for name in names:
        runs = {m: one_run(roots, name, m) for m in ("sft", "kd")}
        first = next((r for r in runs.values() if r), None)
        if first is None:
            continue
        results = {m: json.loads((r / "results.json").read_text()) for m, r in runs.items() if r}
        for method, result in results.items():
            machine = result["run"].get("machine") or "not recorded (runs before results.json kept run.machine)"
            machines.setdefault(machine, []).append(f"{name} {method}")
        shape, total, blocks = shape_and_parameters(first, rows, name)
        block_params[name] = blocks
        init = results.get("sft", results.get("kd"))
        teacher = teacher or (init["eval"].get("teacher") and init)
        row = [name, shape["num_layers"], f"{shape['num_attention_heads']}/{shape['num_key_value_heads']}",
               shape["intermediate_size"], f"{blocks / 1e6:.1f}M", f"{total / 1e6:.1f}M",
               *(f"{step_time(runs[m]):.2f}" if runs[m] else "—" for m in ("sft", "kd"))]
        for dataset in ("valid", "dolly"):
            row.append(cell(init, "student_init", dataset))
            row += [cell(results[m], "student", dataset) if m in results else "—" for m in ("sft", "kd")]
        print("| " + " | ".join(str(c) for c in row) + " |")
    print("\nWhere each run's step time was measured (its results.json's run.machine):\n")
    for machine, rows_there in sorted(machines.items()):
        print(f"- {machine}: {', '.join(rows_there)}")
    if teacher:
        print(f"\nFine-tuned teacher (ROUGE-L / loss): valid {cell(teacher, 'teacher', 'valid')}, "
              f"test {cell(teacher, 'teacher', 'dolly')}")
    differences(roots, names, against, block_params)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("roots", type=Path, nargs="+",
                        help="<OUT>/runs of scripts/shapes-dolly.sh, and/or results/shapes-dolly (kept runs)")
    parser.add_argument("--against", nargs="+", default=["even-15", "even-8"],
                        help="the shapes every other is compared with (each with the nearest in block parameters)")
    parser.add_argument("--prune-rows", type=Path, default=Path("results/prune-dolly.jsonl"),
                        help="the shapes' kdlab.prune rows, for runs kept without their student")
    args = parser.parse_args()
    main(args.roots, args.against, args.prune_rows if args.prune_rows.exists() else None)
