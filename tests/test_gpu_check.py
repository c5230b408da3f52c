"""The GPU check (tests/gpu/): its one-line stop without CUDA, the wheelhouse's coverage of kdlab's imports,
the steps' configs, and how its summary judges a job. The check itself needs a CUDA machine (docs/SCALING.md)."""
from __future__ import annotations

import ast
import importlib.metadata as md
import json
import os
import re
import shlex
import subprocess
import sys
import time
from pathlib import Path

import pytest
from packaging.requirements import Requirement

from conftest import ROOT, conf_option

GPU = ROOT / "tests" / "gpu"
SCRIPT = GPU / "run_gpu_check.sh"
# imported by kdlab only inside functions that the GPU check's jobs never call (requirements.txt says why)
LEFT_OUT = {"wandb", "trl", "datasets"}
# what the GPU check imports: kdlab, and the benchmarks it runs
SOURCES = [*sorted((ROOT / "kdlab").rglob("*.py")),
           *(ROOT / "benchmarks" / f"{name}.py" for name in ("__init__", "__main__", "harness", "generation",
                                                            "kd_step", "onpolicy"))]


def canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def listed(file: Path) -> dict[str, Requirement]:
    lines = [line.strip() for line in file.read_text().splitlines()]
    reqs = [Requirement(line) for line in lines if line and not line.startswith("#")]
    return {canonical(r.name): r for r in reqs}


def script_env(tmp_path: Path, **extra) -> dict:
    env = {**os.environ, "GPU_CHECK_RESULTS": str(tmp_path / "results"), "GPU_CHECK_WORK": str(tmp_path / "work"),
           "PYTHON": sys.executable, **extra}
    env.pop("OUT", None)
    return env


def test_without_cuda_it_stops_at_once_with_one_clear_line(tmp_path):
    t0 = time.perf_counter()
    proc = subprocess.run(["bash", str(SCRIPT)], cwd=ROOT, capture_output=True, text=True, timeout=120,
                          env=script_env(tmp_path, CUDA_VISIBLE_DEVICES=""))
    seconds = time.perf_counter() - t0
    lines = (proc.stdout + proc.stderr).strip().splitlines()
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert len(lines) == 1 and lines[0].startswith("gpu-check: no CUDA device ("), lines
    assert "torch.cuda.is_available() is False" in lines[0]
    assert seconds < 60
    assert not (tmp_path / "results").exists() and not (tmp_path / "work").exists()   # nothing ran


def top_level_imports(path: Path) -> dict[str, bool]:
    """Absolute imports of a file: top-level module name -> whether one of them is at module level."""
    tree = ast.parse(path.read_text(), str(path))
    in_function = {id(node) for fn in ast.walk(tree) if isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef))
                   for node in ast.walk(fn)}
    found: dict[str, bool] = {}
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names = [node.module]
        else:
            continue
        for name in names:
            top = name.split(".")[0]
            found[top] = found.get(top, False) or id(node) not in in_function
    return found


def test_wheelhouse_and_image_cover_every_import_of_kdlab():
    wheels, image = listed(GPU / "requirements.txt"), listed(GPU / "preinstalled.txt")
    assert not set(wheels) & set(image), "a package both carried and preinstalled"
    owners = md.packages_distributions()
    missing, eager = [], []
    for path in SOURCES:
        for module, module_level in top_level_imports(path).items():
            if module in sys.stdlib_module_names or module in ("kdlab", "benchmarks", "__future__"):
                continue
            if module in LEFT_OUT:
                if module_level:
                    eager.append(f"{path.relative_to(ROOT)}: {module}")
                continue
            dists = {canonical(d) for d in owners.get(module, [])}
            assert dists, f"{path.relative_to(ROOT)} imports {module}, which no installed distribution provides"
            if not dists & (set(wheels) | set(image)):
                missing.append(f"{path.relative_to(ROOT)}: {module} ({', '.join(sorted(dists))})")
    assert not missing, f"add to tests/gpu/requirements.txt (or preinstalled.txt): {missing}"
    assert not eager, f"imported at module level, so every GPU job would need it: {eager}"


def locked_versions(lock: Path) -> dict[str, str]:
    """The lock's exact pins: canonical name -> version."""
    pins = {}
    for name, req in listed(lock).items():
        exact = [spec.version for spec in req.specifier if spec.operator == "=="]
        assert len(exact) == 1, f"{lock.name}: {req} is not one exact version"
        pins[name] = exact[0]
    return pins


def test_the_kit_takes_every_version_from_the_lock():
    """The wheelhouse is built at the lock's versions (build_wheelhouse.sh passes it as constraints): every
    carried package is pinned there, and a line that names a version of its own must name the lock's."""
    pins = locked_versions(ROOT / "requirements-lock.txt")
    assert '-c "$lock"' in (GPU / "build_wheelhouse.sh").read_text()
    for name, req in listed(GPU / "requirements.txt").items():
        assert name in pins, f"tests/gpu/requirements.txt carries {req.name}, which requirements-lock.txt does not pin"
        assert not req.specifier or req.specifier.contains(pins[name], prereleases=True), \
            f"tests/gpu/requirements.txt: {req} but requirements-lock.txt pins {req.name}=={pins[name]}"


def test_every_carried_wheel_brings_its_requirements():
    """run_gpu_check.sh installs with --no-deps: each requirement of a carried package (for CPython 3.12
    on Linux, no extras) must be carried too or be on the image."""
    wheels, image = listed(GPU / "requirements.txt"), listed(GPU / "preinstalled.txt")
    environment = {"python_version": "3.12", "python_full_version": "3.12.3", "sys_platform": "linux",
                   "platform_system": "Linux", "platform_machine": "x86_64", "extra": ""}
    for name, req in wheels.items():
        for dep in map(Requirement, md.requires(req.name) or []):
            if dep.marker is not None and not dep.marker.evaluate(environment):
                continue
            assert canonical(dep.name) in set(wheels) | set(image), f"{req.name} needs {dep}: carry it"


def plan(wheelhouse: Path) -> list[tuple[str, int, list[str]]]:
    env = {**os.environ, "PYTHON": "python3", "GPU_CHECK_WHEELHOUSE": str(wheelhouse)}
    out = subprocess.run(["bash", str(SCRIPT), "--list"], cwd=ROOT, capture_output=True, text=True, check=True,
                         timeout=30, env=env).stdout
    return [(name, int(limit), shlex.split(command))
            for name, limit, command in (line.split("\t") for line in out.splitlines())]


def test_the_steps_are_every_method_in_bf16_on_cuda_zero2_zero3_and_the_benchmarks(tmp_path):
    from hydra import compose, initialize_config_dir

    from kdlab.cli import CONF_DIR, validate_config

    steps = plan(tmp_path)
    methods = sorted(p.stem for p in (ROOT / "conf" / "method").glob("*.yaml"))
    assert [n for n, _, _ in steps if n.startswith("smoke-")] == [f"smoke-{m}" for m in methods]
    assert {"zero2-kd", "zero3-kd", "bench-generation", "bench-kd_step", "bench-onpolicy"} <= {n for n, _, _ in steps}
    assert sum(limit for name, limit, _ in steps) < 3600 and all(limit <= 300 for _, limit, _ in steps)
    for name, _, argv in steps:
        if "kdlab.run" not in argv:
            continue
        if name.startswith("zero"):
            assert argv[1:5] == ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node=1"]
        overrides = [a for a in argv[argv.index("kdlab.run") + 1:] if not a.startswith("hydra.")]
        with initialize_config_dir(CONF_DIR, version_base="1.3"):
            cfg = compose("config", overrides=overrides)
        assert (cfg.hardware.device, cfg.hardware.dtype) == ("cuda", "bfloat16"), name
        assert cfg.hardware.name == ("gpu" if name.startswith("smoke-") else name.split("-")[0])
        assert cfg.student.name == cfg.teacher.name == "tiny" and cfg.logger.name == "csv"
        cfg.hardware.device = "cpu"   # the rest of the job's config must validate as it will run there
        validate_config(cfg)


@pytest.mark.parametrize("shape", [False, True])
def test_the_benchmarks_take_the_carried_teacher_shape_else_tiny_models(tmp_path, shape):
    if shape:   # build_wheelhouse.sh writes it (tests/gpu/model_shape.py)
        (tmp_path / "smollm2-135m").mkdir()
        (tmp_path / "smollm2-135m" / "config.json").write_text("{}")
    benches = {name: argv for name, _, argv in plan(tmp_path) if "benchmarks" in argv}
    assert set(benches) == {"bench-generation", "bench-kd_step", "bench-onpolicy"}
    for name, argv in benches.items():
        assert (ROOT / "benchmarks" / f"{argv[argv.index('benchmarks') + 1]}.py").exists()
        flags = {"--device=cuda", f"--teacher_shape={tmp_path / 'smollm2-135m'}"} if shape else \
            {"--device=cuda", "--teacher=tiny", "--student=tiny"}
        assert flags <= set(argv) and not any(a.startswith("--teacher=") for a in argv if shape), name


def fake_job(runs: Path, name: str, device: str, losses: list[float], status: str = "completed") -> None:
    run = runs / name
    run.mkdir(parents=True)
    (run / "results.json").write_text(json.dumps({"run": {"method": "kd", "status": status}, "eval": {
        "student": {"synthetic": {"loss": 5.5, "rougeL": 0.1, "num_examples": 8, "samples": ["x"]}}}}))
    (run / "config.yaml").write_text(f"hardware:\n  name: gpu\n  device: {device}\n  dtype: bfloat16\n")
    (run / "metrics.jsonl").write_text("".join(json.dumps({"step": i + 1, "train/loss": x, "train/step_time_s": 0.5})
                                               + "\n" for i, x in enumerate(losses)))


def test_summary_fails_a_job_that_exited_0_without_a_completed_finite_cuda_run(tmp_path):
    runs = tmp_path / "runs"
    fake_job(runs, "smoke-kd", "cuda", [2.0, 1.5])
    fake_job(runs, "smoke-sft", "cpu", [2.0, 1.5])
    fake_job(runs, "smoke-gkd", "cuda", [2.0, float("nan")])
    fake_job(runs, "smoke-okd", "cuda", [2.0], status="running")
    (runs / "zero2-kd").mkdir()
    steps = ["smoke-kd\tpass\t0\t10.0\tc", "smoke-sft\tpass\t0\t9.0\tc", "smoke-gkd\tpass\t0\t8.0\tc",
             "smoke-okd\tpass\t0\t7.0\tc", "zero2-kd\tpass\t0\t6.0\tc", "bench-kd_step\ttimeout\t124\t5.0\tc",
             "bench-onpolicy\tpass\t0\t4.0\tc", "zero3-gkd\tskipped\t\t0\tc"]
    (tmp_path / "steps.tsv").write_text("\n".join(steps) + "\n")
    proc = subprocess.run([sys.executable, str(GPU / "summary.py"), str(tmp_path / "steps.tsv"), str(runs),
                           str(tmp_path / "summary.json")], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 1, proc.stderr
    summary = json.loads((tmp_path / "summary.json").read_text())
    status = {s["name"]: s["status"] for s in summary["steps"]}
    assert status == {"smoke-kd": "pass", "smoke-sft": "fail", "smoke-gkd": "fail", "smoke-okd": "fail",
                      "zero2-kd": "fail", "bench-kd_step": "timeout", "bench-onpolicy": "pass", "zero3-gkd": "skipped"}
    assert summary["counts"] == {"pass": 2, "fail": 4, "timeout": 1, "skipped": 1}
    kd = next(s for s in summary["steps"] if s["name"] == "smoke-kd")["job"]
    assert kd["train_loss_first_last"] == [2.0, 1.5] and kd["train_steps_per_s"] == pytest.approx(2.0)
    assert kd["eval"]["student"]["synthetic"] == {"loss": 5.5, "rougeL": 0.1, "num_examples": 8}
    assert "gpu-check: 2/8 steps passed, 4 fail, 1 timeout, 1 skipped; summary:" in proc.stdout


def test_a_teacher_shape_rebuilds_the_architecture_and_tokenizer_without_the_weights(tmp_path):
    import torch

    from benchmarks.harness import random_teacher
    from kdlab.teacher import load_teacher

    sys.path.insert(0, str(GPU))
    try:
        import model_shape
    finally:
        sys.path.remove(str(GPU))
    model_shape.main(str(tmp_path / "shape"), "tiny")
    assert not list((tmp_path / "shape").glob("*.safetensors")) and (tmp_path / "shape" / "config.json").exists()
    real, real_tok = load_teacher(conf_option("teacher", "tiny"), torch.float32)
    shaped, tok = random_teacher(str(tmp_path / "shape"))
    def arch(model):   # the dtype entry records how a config was made, not the architecture
        return {k: v for k, v in model.config.to_diff_dict().items() if k != "dtype"}

    assert type(shaped) is type(real) and arch(shaped) == arch(real)
    assert [(n, p.shape) for n, p in shaped.named_parameters()] == [(n, p.shape) for n, p in real.named_parameters()]
    assert not any(p.requires_grad for p in shaped.parameters()) and not shaped.training
    text = "Distil the teacher: 1 + 1 = 2\n"
    assert tok(text).input_ids == real_tok(text).input_ids and tok.pad_token_id == real_tok.pad_token_id
