"""Report aggregation on fake run folders with known numbers, checked against numpy."""
from __future__ import annotations

import csv
import json

import numpy as np
import pytest

from kdlab.report import main, mean_curve, scan

METHODS = {"sft": None, "kd": "fkl"}  # method -> divergence
SEEDS = (1, 2)
DATASETS = ("dolly", "sinst")
BASE = {("sft", "dolly"): 20.0, ("sft", "sinst"): 10.0, ("kd", "dolly"): 25.0, ("kd", "sinst"): 14.0}
# per-seed noise, different per cell so that a swapped index shows up
NOISE = {("sft", 1): (0.3, -1.1), ("sft", 2): (-0.5, 0.4), ("kd", 1): (1.25, 0.0), ("kd", 2): (-0.75, 1.5)}
TIME = {("sft", 1): 100.0, ("sft", 2): 140.0, ("kd", 1): 300.0, ("kd", 2): 260.0}


def student_score(method, seed, dataset):
    return BASE[(method, dataset)] + NOISE[(method, seed)][DATASETS.index(dataset)]


def teacher_score(seed, dataset):
    return {"dolly": 40.0, "sinst": 30.0}[dataset] + 0.5 * seed


def valid_score(method, seed, step):
    return step / 10 + seed ** 2 + (5.0 if method == "kd" else 0.0)


def write_run(run_dir, method, seed, status="completed", results=True):
    (run_dir / ".hydra").mkdir(parents=True)
    cfg = f"method:\n  name: {method}\nstudent:\n  name: tiny-s\nseed: {seed}\ndataset:\n  name: dolly\n"
    (run_dir / ".hydra" / "config.yaml").write_text(cfg)
    (run_dir / "config.yaml").write_text(cfg)
    if not results:
        return
    unc = [{"bucket": b, "std": 0.1 * b + seed, "kl": 0.2 * b, "top1": 0.9 - 0.1 * b} for b in range(3)]
    student = {d: {"rougeL": student_score(method, seed, d), "exact_match": 1.0} for d in DATASETS} if status == "completed" else {}
    if student:
        student["dolly"]["unc_buckets"] = unc
    results_json = {
        "run": {"method": method, "student": "tiny-s", "teacher": "tiny-t", "seed": seed, "divergence": METHODS.get(method),
                "dataset": "dolly", "experiment": "exp1", "train_time_s": TIME.get((method, seed)), "status": status},
        "eval": {"teacher": {d: {"rougeL": teacher_score(seed, d)} for d in DATASETS}, "student": student},
    }
    (run_dir / "results.json").write_text(json.dumps(results_json))
    with open(run_dir / "metrics.jsonl", "w") as f:
        for step in (10, 20, 30):
            f.write(json.dumps({"step": step, "split": "train", "train/loss": 1.0 / step}) + "\n")
            f.write(json.dumps({"step": step, "split": "valid", "valid/rougeL": valid_score(method, seed, step)}) + "\n")
    # wandb keeps a config.yaml of its own: not a run directory
    (run_dir / "wandb" / "offline-run-x" / "files").mkdir(parents=True)
    (run_dir / "wandb" / "offline-run-x" / "files" / "config.yaml").write_text("a: 1\n")


@pytest.fixture
def sweep(tmp_path):
    root = tmp_path / "multirun"
    job = 0
    for method in METHODS:
        for seed in SEEDS:
            write_run(root / "2025-01-01" / str(job), method, seed)
            job += 1
    write_run(root / "2025-01-01" / "failed", "kd", 3, status="failed")
    write_run(root / "2025-01-01" / "missing", "minillm", 1, results=False)
    return root


def read_csv(path):
    with open(path, newline="") as f:
        return {(r["method"], r["eval_dataset"]): r for r in csv.DictReader(f)}


def test_table_numbers_match_numpy(sweep, tmp_path, capsys):
    out = tmp_path / "report"
    main([str(sweep), "--out", str(out)])
    printed = capsys.readouterr().out
    md = (out / "report.md").read_text()
    assert printed == md
    rows = read_csv(out / "report.csv")

    for method, div in METHODS.items():
        label = f"{method} ({div})" if div else method
        per_seed = np.array([[student_score(method, s, d) for d in DATASETS] for s in SEEDS])  # (seeds, datasets)
        for j, dataset in enumerate(DATASETS):
            row = rows[(label, dataset)]
            assert float(row["mean"]) == pytest.approx(per_seed[:, j].mean())
            assert float(row["std"]) == pytest.approx(per_seed[:, j].std(ddof=1))
            assert int(row["n"]) == len(SEEDS)
            assert f"{per_seed[:, j].mean():.2f} ± {per_seed[:, j].std(ddof=1):.2f} (2)" in md
        avg = per_seed.mean(axis=1)
        assert float(rows[(label, "AVG")]["mean"]) == pytest.approx(avg.mean())
        assert float(rows[(label, "AVG")]["std"]) == pytest.approx(avg.std(ddof=1))
        assert float(rows[(label, "dolly")]["train_time_s"]) == pytest.approx(np.mean([TIME[(method, s)] for s in SEEDS]))

    teacher = np.array([[teacher_score(s, d) for d in DATASETS] for s in SEEDS])
    assert float(rows[("teacher", "dolly")]["mean"]) == pytest.approx(teacher[:, 0].mean())
    assert float(rows[("teacher", "dolly")]["std"]) == pytest.approx(teacher[:, 0].std(ddof=1))
    assert int(rows[("teacher", "dolly")]["n"]) == 2  # once per seed, not once per run
    # the failed run (seed 3, a huge time would show) is not averaged in
    assert int(rows[("kd (fkl)", "sinst")]["n"]) == 2

    # row order: teacher, then methods in the papers' order
    table_lines = [line for line in md.splitlines() if line.startswith("| tiny-t")]
    assert [line.split(" | ")[2] for line in table_lines] == ["teacher", "sft", "kd (fkl)"]


def test_missing_and_failed_listed(sweep, tmp_path):
    out = tmp_path / "report"
    main([str(sweep), "--out", str(out)])
    md = (out / "report.md").read_text()
    section = md.split("## Missing/failed runs", 1)[1]
    lines = [line for line in section.splitlines() if line.startswith("| 2025")]
    assert len(lines) == 2
    failed = next(line for line in lines if "failed |" in line)
    missing = next(line for line in lines if "/missing" in line)
    assert "| kd |" in failed and "| 3 |" in failed
    assert "| minillm |" in missing and "no results.json" in missing
    assert "wandb" not in section and ".hydra" not in section


def test_plots_written(sweep, tmp_path):
    out = tmp_path / "report"
    main([str(sweep), "--out", str(out)])
    pngs = sorted(p.name for p in out.glob("*.png"))
    assert pngs == ["curves_exp1-dolly.png", "unc_exp1-dolly_dolly.png"]  # no UNC data on sinst
    for name in pngs:
        data = (out / name).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5000
        assert f"]({name})" in (out / "report.md").read_text()


def test_mean_validation_curve(sweep):
    runs, _ = scan(sweep)
    kd_runs = [r for r in runs if r.meta["method"] == "kd"]
    assert len(kd_runs) == 2
    expected = {step: np.mean([valid_score("kd", s, step) for s in SEEDS]) for step in (10, 20, 30)}
    assert mean_curve(kd_runs, "valid/rougeL") == pytest.approx(expected)
    assert list(mean_curve(kd_runs, "valid/rougeL")) == [10, 20, 30]


def test_single_seed_std_is_dash(tmp_path):
    write_run(tmp_path / "runs" / "0", "sft", 1)
    out = tmp_path / "report"
    main([str(tmp_path / "runs"), "--out", str(out)])
    md = (out / "report.md").read_text()
    assert f"{student_score('sft', 1, 'dolly'):.2f} ± - (1)" in md
    assert read_csv(out / "report.csv")[("sft", "dolly")]["std"] == ""
    assert "None." in md.split("## Missing/failed runs", 1)[1]


def test_ablation_points_get_a_row_each(tmp_path):
    """Runs of one method that differ in an override (an ablation grid) are not averaged together;
    overrides that change nothing measured (hardware, logger) or that the table shows (divergence)
    stay out of the label."""
    for seed in SEEDS:
        for overrides, score in (("method.lora_layers=0.25,hardware.num_threads=1", 30.0),
                                 ("divergence=fkl,eval.datasets=[sni,unni],method.lora_layers=null", 40.0)):
            run_dir = tmp_path / overrides.replace("/", "_") / f"s{seed}"
            write_run(run_dir, "kd", seed)
            results = json.loads((run_dir / "results.json").read_text())
            results["run"]["overrides"] = overrides
            for dataset in DATASETS:
                results["eval"]["student"][dataset]["rougeL"] = score + seed
            (run_dir / "results.json").write_text(json.dumps(results))
    main([str(tmp_path), "--out", str(tmp_path / "out")])
    with open(tmp_path / "out" / "report.csv") as f:
        cells = {(r["method"], r["eval_dataset"]): float(r["mean"]) for r in csv.DictReader(f) if r["method"] != "teacher"}
    assert cells[("kd (fkl) [method.lora_layers=0.25]", "dolly")] == pytest.approx(31.5)
    assert cells[("kd (fkl) [eval.datasets=[sni,unni], method.lora_layers=null]", "dolly")] == pytest.approx(41.5)
