"""experiments/dolly-cpu.yaml and its sweeps compose into valid jobs on the real Dolly folder."""
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir

from kdlab.cli import CONF_DIR, validate_config

METHODS = ["sft", "kd", "seqkd", "imitkd", "gkd", "minillm", "dpkd", "okd"]


@pytest.mark.parametrize("method", METHODS)
def test_dolly_cpu_composes_for_every_method(method):
    with initialize_config_dir(CONF_DIR, version_base="1.3"):
        cfg = compose("config", ["+experiment=dolly-cpu", f"method={method}"])
    validate_config(cfg)
    assert cfg.dataset.name == "dolly" and cfg.dataset.path.endswith("shared/data/dolly-1k")
    assert cfg.teacher.name == "smollm2-135m" and cfg.teacher.finetune.max_steps == 100
    assert cfg.teacher.finetune.epochs is None
    assert cfg.student.name == "smollm2-pruned-50" and cfg.student.init == "pruned"   # measured: RESULTS.md
    assert cfg.train.epochs == 1 and cfg.train.max_steps is None and cfg.eval.test_examples >= 100
    assert list(cfg.eval.datasets) == ["sni", "unni"] and cfg.eval.analysis.enabled


@pytest.mark.parametrize("method", METHODS)
def test_every_method_of_the_sweep_builds_with_its_length_in_epochs(method, tmp_path):
    """Each job's method built from the sweep's own method and train sections (one epoch, train.max_steps null),
    on tiny random models, and given training examples: what kdlab.run does before its first step. ImitKD once
    stopped there (its beta schedule needed train.max_steps), which only the 27-job sweep would have shown."""
    import torch

    from conftest import conf_option
    from kdlab.data import encode
    from kdlab.data.synthetic import make_synthetic
    from kdlab.divergences import build_divergence
    from kdlab.hardware import Runtime
    from kdlab.methods import build_method
    from kdlab.methods.base import Context
    from kdlab.modeling import byte_tokenizer, freeze, random_model
    from kdlab.trainer import run_steps

    sweep = "dolly-cpu-minillm" if method == "minillm" else "dolly-cpu"
    with initialize_config_dir(CONF_DIR, version_base="1.3"):
        cfg = compose("config", ["+experiment=dolly-cpu", f"+sweep={sweep}", f"method={method}",
                                 f"output_dir={tmp_path}"]
                      + (["method.generation.max_new_tokens=4"] if method == "seqkd" else []))   # kept short
    tok = byte_tokenizer()
    teacher = freeze(random_model(conf_option("teacher", "tiny").random, len(tok)).eval())
    ctx = Context(teacher=teacher, student=random_model(conf_option("student", "tiny").random, len(tok)),
                  tokenizer=tok, divergence=build_divergence(cfg.divergence), runtime=Runtime(torch.device("cpu"),
                  torch.float32), train_cfg=cfg.train)
    built = build_method(cfg.method, ctx)
    rows = make_synthetic(0, {"train": 16, "valid": 1, "test": 1})["train"]
    items = encode(rows, tok, "alpaca", 320, 400)
    trained_on = built.prepare_data(items)
    assert len(trained_on) == len(items) and built.phases()
    if method == "imitkd":
        assert built.decay_steps == run_steps(cfg.train, len(items)) == 16 // cfg.train.batch_size


def test_dolly_cpu_sweeps_cover_every_method_with_three_seeds():
    with initialize_config_dir(CONF_DIR, version_base="1.3"):
        params = {name: compose("config", ["+experiment=dolly-cpu", f"+sweep={name}"],
                                return_hydra_config=True).hydra.sweeper.params
                  for name in ("dolly-cpu", "dolly-cpu-rkl", "dolly-cpu-minillm")}
    methods = set(params["dolly-cpu"]["method"].split(","))
    assert methods | {"minillm"} == set(METHODS)
    assert all(p["seed"] == "1,2,3" for p in params.values())
    assert Path(CONF_DIR, "sweep", "dolly-cpu-rkl.yaml").read_text().count("rkl") >= 1


def test_the_sweep_script_runs_27_distinct_jobs_then_the_reference_rows_and_the_report(tmp_path):
    """scripts/dolly-cpu.sh with a stand-in interpreter that records its arguments: with JOBS=2 every one of the
    27 (sweep, method, seed) jobs is started once, as a one-job multirun of its sweep, before the reference rows
    (kdlab.eval), the reports and the claims, then the reference rows' own report; finished runs kept by an earlier
    clone are put back first, never over a run's own results."""
    import os
    import subprocess

    calls = tmp_path / "calls"
    fake = tmp_path / "python"
    # kdlab.eval writes its results.json into hydra.run.dir, as the real one does
    fake.write_text(f'#!/bin/sh\necho "$*" >> {calls}\n'
                    'case "$*" in *kdlab.eval*) for a in "$@"; do case "$a" in hydra.run.dir=*)\n'
                    '  d=${a#hydra.run.dir=}; mkdir -p "$d"\n'
                    '  for f in results.json config.yaml; do echo "reference $f" > "$d/$f"; done;; esac; done;; esac\n')
    fake.chmod(0o755)
    root = Path(CONF_DIR).parent
    job = tmp_path / "out" / "multirun" / "dolly-cpu" / "kd-smollm2-pruned-50-s1"
    for folder in ("+sweep=dolly-cpu", "+sweep=dolly-cpu-rkl,divergence=rkl"):   # kd and kd-rkl: one job name
        (job / folder).mkdir(parents=True)
        for name in ("results.json", "metrics.jsonl", "config.yaml"):
            (job / folder / name).write_text(f"{folder} {name}")
    # kept by an earlier clone: put back before the jobs start, except where this clone has the job's own results
    kept_runs = tmp_path / "results" / "runs"
    for name in ("sft-smollm2-pruned-50-s2", "kd-smollm2-pruned-50-s1"):
        (kept_runs / name / "+sweep=dolly-cpu").mkdir(parents=True)
        for file in ("results.json", "metrics.jsonl", "config.yaml"):
            (kept_runs / name / "+sweep=dolly-cpu" / file).write_text(f"kept {name} {file}")
    reference = tmp_path / "out" / "eval" / "dolly-cpu-reference"
    subprocess.run(["bash", "scripts/dolly-cpu.sh"], cwd=root, check=True, timeout=60,
                   env={**os.environ, "JOBS": "2", "PYTHON": str(fake), "OUTPUT_DIR": str(tmp_path / "out"),
                        "RESULTS_DIR": str(tmp_path / "results")})
    restored = tmp_path / "out" / "multirun" / "dolly-cpu" / "sft-smollm2-pruned-50-s2" / "+sweep=dolly-cpu"
    assert sorted(p.read_text() for p in restored.iterdir()) == [
        f"kept sft-smollm2-pruned-50-s2 {file}" for file in ("config.yaml", "metrics.jsonl", "results.json")]
    assert (job / "+sweep=dolly-cpu" / "results.json").read_text() == "+sweep=dolly-cpu results.json"
    lines = calls.read_text().splitlines()
    runs = [line.split() for line in lines if line.startswith("-m kdlab.run ")]
    jobs = set()
    for args in runs:
        given = dict(a.split("=", 1) for a in args[2:] if "=" in a)
        assert given["+experiment"] == "dolly-cpu" and given["output_dir"] == str(tmp_path / "out")
        params = {k.removeprefix("hydra.sweeper.params."): v for k, v in given.items() if k.startswith("hydra.")}
        with initialize_config_dir(CONF_DIR, version_base="1.3"):
            swept = compose("config", ["+experiment=dolly-cpu", f"+sweep={given['+sweep']}",
                                       *(f"hydra.sweeper.params.{k}={v}" for k, v in params.items())],
                            return_hydra_config=True).hydra.sweeper.params
        assert all("," not in str(v) for v in swept.values()), swept   # one job per call
        jobs.add((swept["method"] if "method" in swept else "minillm", swept.get("divergence"), swept["seed"]))
    assert len(runs) == len(jobs) == 27
    assert {m for m, _, _ in jobs} == set(METHODS)
    after = lines[len(runs):]
    assert after[0].startswith("-m kdlab.eval +experiment=dolly-cpu eval.models=[teacher,student]")
    assert after[1].startswith("-m kdlab.report") and "--baseline sft" in after[1]
    reports = [line for line in after if line.startswith("-m kdlab.report") and "--baseline" in line]
    assert {line.split("--baseline ")[1].split(" ")[0] for line in reports} == {"sft", "kd", "gkd", "minillm"}
    assert {line.split("--metric ")[1] for line in reports if "--metric" in line} == {
        "exaccerr.l=16", "loss", "kl", "dist4"}
    assert after[-2] == f"scripts/dolly-cpu-claims.py {tmp_path / 'results'}"
    assert after[-1] == f"-m kdlab.report {reference} --out {tmp_path / 'results' / 'reference'}"   # its table
    assert all(f"--out {tmp_path / 'results'}" in line for line in reports)
    kept = tmp_path / "results" / "runs" / "kd-smollm2-pruned-50-s1"
    for folder in ("+sweep=dolly-cpu", "+sweep=dolly-cpu-rkl,divergence=rkl"):
        assert sorted(p.read_text() for p in (kept / folder).iterdir()) == [
            f"{folder} {name}" for name in ("config.yaml", "metrics.jsonl", "results.json")]
    assert f"hydra.run.dir={reference}" in after[0]
    assert sorted(p.read_text() for p in (tmp_path / "results" / "reference").iterdir()) == [
        "reference config.yaml\n", "reference results.json\n"]


@pytest.mark.parametrize("kept_in", ["results", "out"])
def test_the_sweep_script_measures_the_reference_rows_once(tmp_path, kept_in):
    """Reference rows kept by an earlier clone (results/dolly-cpu/reference/) are put back, results.json last, and
    reference rows already in the output folder are not measured again: kdlab.eval is not called either way, and
    the reports still run."""
    import os
    import subprocess

    calls = tmp_path / "calls"
    fake = tmp_path / "python"
    fake.write_text(f'#!/bin/sh\necho "$*" >> {calls}\n')
    fake.chmod(0o755)
    kept = tmp_path / ("results/reference" if kept_in == "results" else "out/eval/dolly-cpu-reference")
    kept.mkdir(parents=True)
    for name in ("results.json", "config.yaml"):
        (kept / name).write_text(f"kept {name}")
    subprocess.run(["bash", "scripts/dolly-cpu.sh"], cwd=Path(CONF_DIR).parent, check=True, timeout=60,
                   env={**os.environ, "PYTHON": str(fake), "OUTPUT_DIR": str(tmp_path / "out"),
                        "RESULTS_DIR": str(tmp_path / "results")})
    lines = calls.read_text().splitlines()
    assert not [line for line in lines if "kdlab.eval" in line]
    assert any("--baseline sft" in line for line in lines)
    reference = tmp_path / "out" / "eval" / "dolly-cpu-reference"
    assert sorted(p.name for p in reference.iterdir()) == ["config.yaml", "results.json"]
    assert (reference / "results.json").read_text() == "kept results.json"


SMOKE = ["dataset.max_examples={train:16,valid:4,test:4}", "teacher.finetune.max_steps=2",
         "teacher.finetune.epochs=null", "teacher.finetune.batch_size=4", "teacher.finetune.save_every=1",
         "train.max_steps=2", "train.epochs=null", "train.eval_every=null",
         "train.batch_size=4", "train.save_every=1", "train.valid_examples=4", "eval.test_examples=4",
         "eval.batch_size=4", "eval.max_new_tokens=8", "eval.analysis.max_examples=2",
         "hardware.num_threads=2"]


def test_dolly_cpu_smoke_two_methods_one_seed_and_its_report(tmp_path):
    """The experiment end to end at a few rows and steps (the real Dolly, S-NI and UnNI files and the embedded
    teacher, fine-tuned once and shared by both jobs, the student pruned from it once), then RESULTS.md's
    report command on its folder."""
    import json

    from conftest import run_kdlab

    run_kdlab("+experiment=dolly-cpu", *SMOKE, "-m", "method=sft,kd", "seed=1", f"output_dir={tmp_path}")
    found = sorted((tmp_path / "multirun" / "dolly-cpu").rglob("results.json"))
    runs = [json.loads(p.read_text()) for p in found]
    assert sorted(r["run"]["method"] for r in runs) == ["kd", "sft"]
    for r in runs:
        assert r["run"]["status"] == "completed"
        assert set(r["eval"]["student"]) == {"dolly", "sni", "unni"}
        assert all(0 <= m["rougeL"] <= 100 and m["loss"] > 0 for m in r["eval"]["student"].values())
    assert len(list((tmp_path / "teachers").glob("*/finetune.json"))) == 1   # one teacher for both methods
    assert len(list((tmp_path / "students").glob("*/prune.json"))) == 1      # one pruning for both
    proc = run_kdlab(str(tmp_path / "multirun" / "dolly-cpu"), module="kdlab.report")
    report = (tmp_path / "multirun" / "dolly-cpu" / "report.md").read_text()
    rows = [line for line in report.splitlines() if line.startswith("| smollm2-135m | smollm2-pruned-50 |")]
    assert sorted(row.split(" | ")[2].split(" ")[0] for row in rows) == ["kd", "sft"], proc.stdout[-2000:]
    # the reference rows, as scripts/dolly-cpu.sh measures them: the shared teacher and student, not rebuilt
    reference = tmp_path / "eval" / "dolly-cpu-reference"
    proc = run_kdlab("+experiment=dolly-cpu", *SMOKE, "eval.models=[teacher,student]", f"output_dir={tmp_path}",
                     f"hydra.run.dir={reference}", module="kdlab.eval")
    assert "kdlab: pruned" not in proc.stdout and "kdlab: fine-tuning teacher" not in proc.stdout
    rows = json.loads((reference / "results.json").read_text())["eval"]
    assert {name: set(sets) for name, sets in rows.items()} == {name: {"dolly", "sni", "unni"}
                                                                for name in ("teacher", "student")}
    assert rows["teacher"]["dolly"]["loss"] < rows["student"]["dolly"]["loss"]



def load_claims_script():
    import importlib.util

    path = Path(CONF_DIR).parent / "scripts" / "dolly-cpu-claims.py"
    spec = importlib.util.spec_from_file_location("dolly_cpu_claims", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_claims_name_rows_the_sweep_produces():
    """Every row the claims script reads is the label kdlab.report gives one of the sweep's jobs, as its
    results.json records it: the method, the divergence the experiment composes, and the job's override folder
    as Hydra names it (the sweep group, and the swept divergence of the reverse-KL row)."""
    from kdlab.report import Run

    claims = load_claims_script()
    jobs = [(method, [], f"+sweep=dolly-cpu{'-minillm' if method == 'minillm' else ''}") for method in METHODS]
    jobs.append(("kd", ["divergence=rkl"], "+sweep=dolly-cpu-rkl,divergence=rkl"))
    labels = set()
    with initialize_config_dir(CONF_DIR, version_base="1.3"):
        for method, overrides, folder in jobs:
            divergence = compose("config", ["+experiment=dolly-cpu", f"method={method}", *overrides]).divergence.name
            labels.add(Run(Path(folder), {"method": method, "divergence": divergence, "overrides": folder}, {}).label)
    used = {row for _, _, row, _ in claims.QUALITY} | {r for _, a, b in claims.TIME for r in (a, b)}
    assert used <= labels, used - labels


def test_claim_verdicts_follow_both_intervals(tmp_path):
    """A claim holds only where every interval excludes 0 in its direction, fails only where every one excludes
    it the other way; a seed-only metric is decided by its seed interval; the time claim by the ratio."""
    import csv as csv_module

    from kdlab.report import CSV_FIELDS

    claims = load_claims_script()

    def write(folder, rows):
        (tmp_path / folder).mkdir(parents=True, exist_ok=True)
        with open(tmp_path / folder / "report.csv", "w", newline="") as f:
            writer = csv_module.DictWriter(f, CSV_FIELDS)
            writer.writeheader()
            for method, dataset, diff, low, high, seed_low, seed_high, seconds in rows:
                writer.writerow({"method": method, "eval_dataset": dataset, "metric": "rougeL", "diff": diff,
                                 "diff_low": low, "diff_high": high, "diff_seed_low": seed_low,
                                 "diff_seed_high": seed_high, "diff_seeds": 3, "baseline": "b",
                                 "train_time_s": seconds, "decoding": "greedy, at most 64 new tokens",
                                 "test_rows": "" if dataset == "AVG" else "106/125"})

    write(".", [("kd (fkl)", "AVG", 2.0, 0.5, 3.5, 0.2, 3.8, 100), ("kd (fkl)", "dolly", 2.0, 0.5, 3.5, 0.2, 3.8, 100),
                ("okd (fkl)", "AVG", "", "", "", "", "", 100),
                ("gkd (jsd)", "AVG", "", "", "", "", "", 500), ("minillm", "AVG", "", "", "", "", "", 250)])
    write("vs-kd", [("kd (rkl)", "AVG", -2.0, -3.0, -1.0, -4.0, -0.5, 1),      # every interval below 0
                    ("imitkd (fkl)", "AVG", 1.0, 0.1, 2.0, -0.5, 2.5, 1),      # the seed interval spans 0
                    ("gkd (jsd)", "AVG", -1.0, -2.0, 0.2, -3.0, -0.1, 1)])     # the row interval spans 0
    write("exaccerr", [("kd (fkl)", "AVG", 3.0, "", "", 1.0, 5.0, 1), ("sft", "AVG", -3.0, "", "", -5.0, 1.0, 1)])
    verdicts = {line.split(" | ")[0].lstrip("| "): line.rsplit(" | ", 1)[1].rstrip(" |")
                for line in claims.claims(tmp_path) if line.startswith("| ") and not line.startswith("| claim")}
    assert claims.claims(tmp_path)[0] == ("Measured: generations greedy, at most 64 new tokens; test rows scored "
                                          "by the students (kept/rows): dolly 106/125.")
    assert verdicts["KD ≥ SFT (every seed paper)"] == "**holds**"
    assert verdicts["reverse KL beats forward KL (MiniLLM)"] == "**does not hold**"
    assert verdicts["on-policy beats off-policy KD: ImitKD (Lin et al.)"] == "undecided at this power"
    assert verdicts["on-policy beats off-policy KD: GKD (Agarwal et al.)"] == "undecided at this power"
    assert verdicts["DPKD beats KD (Li et al.)"] == "not measured"
    assert verdicts["MiniLLM's exposure bias (ExAccErr) is lower than KD's"] == "**holds**"
    assert verdicts["MiniLLM's exposure bias (ExAccErr) is lower than SFT's"] == "undecided at this power"
    assert verdicts["OKD takes about 1/4 of GKD's training time (Rao et al.)"] == "**holds**"          # 0.20
    assert verdicts["OKD takes about 1/4 of MiniLLM's training time (Rao et al.)"].startswith("undecided")  # 0.40


def test_results_blocks_copy_whole_files_and_numbered_tables(tmp_path):
    """scripts/results-blocks.py replaces each block with its source (a whole file, or its N-th markdown
    table), says which blocks were stale, leaves the rest of the file alone, and refuses a missing source."""
    import subprocess
    import sys

    (tmp_path / "r").mkdir()
    (tmp_path / "r" / "claims.md").write_text("| a |\n|---|\n| 1 |\n")
    (tmp_path / "r" / "report.md").write_text("# x\n\n| t1 |\n|---|\n\ntext\n| t2 |\n|---|\n| 2 |\n\nend\n")
    doc = tmp_path / "RESULTS.md"
    doc.write_text("intro\n<!-- from r/claims.md -->\nold\n<!-- end -->\nmiddle\n"
                   "<!-- from r/report.md table 2 -->\n| t2 |\n|---|\n| 2 |\n<!-- end -->\ntail\n")
    script = [sys.executable, str(Path(CONF_DIR).parent / "scripts" / "results-blocks.py"), "--file", str(doc)]
    check = subprocess.run([*script, "--check"], capture_output=True, text=True)
    assert check.returncode == 1 and "r/claims.md" in check.stderr and "table 2" not in check.stderr
    subprocess.run(script, check=True, capture_output=True)
    assert doc.read_text() == ("intro\n<!-- from r/claims.md -->\n| a |\n|---|\n| 1 |\n<!-- end -->\nmiddle\n"
                               "<!-- from r/report.md table 2 -->\n| t2 |\n|---|\n| 2 |\n<!-- end -->\ntail\n")
    assert subprocess.run([*script, "--check"]).returncode == 0
    doc.write_text("<!-- from r/gone.md -->\n<!-- end -->\n")
    missing = subprocess.run([*script, "--check"], capture_output=True, text=True)
    assert missing.returncode == 1 and "r/gone.md, which does not exist" in missing.stderr


def test_results_md_blocks_are_the_committed_reports():
    """Every table RESULTS.md copies from a committed report is that report's current text."""
    import subprocess
    import sys

    root = Path(CONF_DIR).parent
    check = subprocess.run([sys.executable, "scripts/results-blocks.py", "--check"], cwd=root,
                           capture_output=True, text=True)
    assert check.returncode == 0, check.stderr
