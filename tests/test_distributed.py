"""Scale-out: rendezvous from torchrun/SLURM, per-rank data slices, DeepSpeed configs, and 2-process
gloo runs (`torchrun --nproc_per_node 2 -m kdlab.run hardware=ddp hardware.device=cpu`) whose replicas
stay identical and match one process on the same global batch."""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf
from safetensors.torch import load_file

from conftest import ROOT, kdlab_env
from kdlab import distributed
from kdlab.data import Encoded, collate

SMOKE = ["+experiment=smoke", "train.max_steps=4", "train.batch_size=4", "train.save_every=4", "train.log_every=1"]
CPU_DDP = ["hardware=ddp", "hardware.device=cpu", "hardware.dtype=float32", "hardware.num_threads=1"]


# -- rendezvous ------------------------------------------------------------------------------------
def test_torchrun_environment_wins_over_slurm():
    env = {"RANK": "3", "WORLD_SIZE": "8", "LOCAL_RANK": "1", "MASTER_ADDR": "h0", "MASTER_PORT": "1234",
           "SLURM_PROCID": "0", "SLURM_NTASKS": "1"}
    assert distributed.dist_env(env) == distributed.DistEnv(3, 8, 1, "h0", 1234)
    assert distributed.dist_env({}) is None


def test_slurm_environment_gives_rank_world_and_first_host():
    env = {"SLURM_PROCID": "9", "SLURM_NTASKS": "16", "SLURM_LOCALID": "1", "SLURM_JOB_ID": "123456",
           "SLURM_JOB_NODELIST": "gpu[03-05,09],cpu1"}
    got = distributed.dist_env(env)
    assert (got.rank, got.world_size, got.local_rank) == (9, 16, 1)
    assert got.master_port == 20000 + 123456 % 20000
    if shutil.which("scontrol") is None:   # on a SLURM node scontrol answers instead
        assert got.master_addr == "gpu03"
        assert distributed.first_host("node7") == "node7"
        assert distributed.first_host("a-1,b-2") == "a-1"


# -- data ------------------------------------------------------------------------------------------
def test_rank_slices_equal_collating_each_ranks_items():
    g = torch.Generator().manual_seed(0)
    items = [Encoded(torch.randint(3, 50, (int(torch.randint(1, 9, (), generator=g)),), generator=g).tolist(),
                     torch.randint(3, 50, (int(torch.randint(1, 9, (), generator=g)),), generator=g).tolist(), {"i": i})
             for i in range(8)]
    full = collate(items, pad_id=0)
    for rank in range(4):
        got, want = distributed.rank_slice(full, rank, 4), collate(items[2 * rank: 2 * rank + 2], pad_id=0)
        for field in ("input_ids", "attention_mask", "labels", "response_mask", "prompt_ids", "prompt_mask"):
            assert torch.equal(getattr(got, field), getattr(want, field)), (rank, field)
        assert got.examples == want.examples


# -- reductions (2 gloo processes) -----------------------------------------------------------------
def _reduce_worker(rank: int, store_path: str, out_path: str) -> None:
    import torch.distributed as dist
    dist.init_process_group("gloo", init_method=f"file://{store_path}", rank=rank, world_size=2)
    a, b, c = (torch.nn.Parameter(torch.zeros(n)) for n in (2, 1, 3))
    a.grad = torch.tensor([1.0, 2.0]) if rank == 0 else torch.tensor([3.0, 4.0])
    b.grad = None if rank == 0 else torch.tensor([2.0])      # unused on rank 0: counts as zeros
    distributed.average_gradients([a, b, c])                   # c: no gradient anywhere, stays None
    logs = {"loss": 1.0, "only0": 5.0, "tokens": 10} if rank == 0 else {"loss": 3.0, "tokens": 20}
    result = {"a": a.grad.tolist(), "b": b.grad.tolist(), "c": c.grad, "logs": distributed.reduce_logs(logs, ("tokens",))}
    torch.save(result, f"{out_path}.{rank}")
    dist.destroy_process_group()


def test_gradients_are_averaged_and_logs_reduced_over_ranks(tmp_path):
    torch.multiprocessing.spawn(_reduce_worker, args=(str(tmp_path / "store"), str(tmp_path / "out")), nprocs=2)
    for rank in range(2):
        got = torch.load(tmp_path / f"out.{rank}")
        assert got["a"] == [2.0, 3.0] and got["b"] == [1.0] and got["c"] is None
        assert got["logs"] == {"loss": 2.0, "only0": 5.0, "tokens": 30}


# -- MiniLLM's sampler under ZeRO-3 (2 gloo processes) -----------------------------------------------
class ForcedEOS(torch.nn.Module):
    """A model whose every step says EOS (``bias`` +1e4) or never does (-1e4); counts its forwards."""

    def __init__(self, model, eos: int, bias: float):
        super().__init__()
        self.model, self.eos, self.bias, self.calls = model, eos, bias, 0

    def forward(self, **kwargs):
        self.calls += 1
        out = self.model(**kwargs)
        out.logits[..., self.eos] += self.bias
        return out


def _mixture_worker(rank: int, store_path: str, out_path: str, synced: bool) -> None:
    import torch.distributed as dist
    from kdlab import generation
    from kdlab.modeling import byte_tokenizer, random_model

    dist.init_process_group("gloo", init_method=f"file://{store_path}", rank=rank, world_size=2)
    generation.is_deepspeed_zero3_enabled = lambda: synced
    tok = byte_tokenizer()
    arch = {"arch": "llama", "hidden_size": 16, "num_layers": 1, "num_heads": 2, "intermediate_size": 32,
            "max_positions": 64}
    bias = 1e4 if rank == 0 else -1e4      # rank 0 is done after one token, rank 1 never before the limit
    student, teacher = (ForcedEOS(random_model({**arch, "seed": s}, len(tok)), tok.eos_token_id, bias) for s in (0, 1))
    ids = torch.tensor([[1, 2, 3], [4, 5, 6]])
    g = generation.sample_mixture(student, teacher, tok, ids, torch.ones_like(ids), alpha=0.2, max_new_tokens=5, seed=0)
    torch.save({"calls": (student.calls, teacher.calls), "lengths": g.response_mask.sum(1).tolist()}, f"{out_path}.{rank}")
    dist.destroy_process_group()


@pytest.mark.parametrize("synced", [True, False])
def test_mixture_sampling_keeps_ranks_in_step_under_zero3(synced, tmp_path):
    """Under ZeRO-3 each forward is collective: a rank whose rows have all ended keeps stepping (padding
    them) until every rank has, else the others would wait forever for its shard gathers."""
    torch.multiprocessing.spawn(_mixture_worker, args=(str(tmp_path / "store"), str(tmp_path / "out"), synced),
                                nprocs=2)
    done, running = (torch.load(tmp_path / f"out.{rank}") for rank in range(2))
    assert done["lengths"] == [1, 1] and running["lengths"] == [5, 5]   # EOS counts in the response
    assert running["calls"] == (5, 5)
    assert done["calls"] == ((5, 5) if synced else (1, 1))


# -- DeepSpeed configs -----------------------------------------------------------------------------
def hardware(name: str):
    return OmegaConf.load(ROOT / "conf" / "hardware" / f"{name}.yaml")


@pytest.mark.parametrize("name", ["zero2", "zero3"])
def test_generated_deepspeed_configs_pass_deepspeed_validation(name):
    pytest.importorskip("deepspeed")
    train = OmegaConf.create({"batch_size": 64, "grad_accum": 2, "grad_clip": 1.0})
    hw = hardware(name)
    config = distributed.deepspeed_config(hw.strategy, hw.dtype, train, 8, {"zero_optimization": {"reduce_bucket_size": 1e7}})
    parsed = distributed.validate_deepspeed_config(config, world_size=8)
    assert parsed.zero_optimization_stage == distributed.ZERO_STAGE[name]
    assert (parsed.train_batch_size, parsed.train_micro_batch_size_per_gpu, parsed.gradient_accumulation_steps) == (64, 4, 2)
    assert parsed.bfloat16_config.enabled and not parsed.float16_config.enabled and parsed.gradient_clipping == 1.0
    assert config["zero_optimization"]["reduce_bucket_size"] == 1e7   # hardware.deepspeed is merged in
    teacher = distributed.validate_deepspeed_config(distributed.teacher_deepspeed_config(hw.dtype, train, 8), 8)
    assert teacher.zero_optimization_stage == 3
    # a global batch the ranks cannot split evenly is refused by DeepSpeed itself
    with pytest.raises(AssertionError):
        distributed.validate_deepspeed_config(distributed.deepspeed_config(name, hw.dtype, train, 3), 3)


@pytest.mark.parametrize("name", ["ddp", "zero2", "zero3"])
def test_hardware_files_validate_and_keep_the_slurm_block(name):
    from kdlab.hardware import validate_hardware
    hw = hardware(name)
    hw.device = "cpu"  # no GPU here; the rest of the file is checked as written
    validate_hardware(hw)
    assert hw.slurm.tasks_per_node == hw.slurm.gpus_per_node
    assert set(hardware("gpu").slurm) <= set(hw.slurm)


# -- 2-process runs --------------------------------------------------------------------------------
def launch(run_dir: Path, *args: str, nproc: int = 2, env_extra: dict | None = None) -> subprocess.Popen:
    env = {**kdlab_env(), "OMP_NUM_THREADS": "1", **(env_extra or {})}
    head = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc)] \
        if nproc > 1 else [sys.executable]
    return subprocess.Popen([*head, "-m", "kdlab.run", *args, f"hydra.run.dir={run_dir}"], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def kill_job(pid: int) -> None:
    """SIGKILL the launcher and every rank, as a preempted SLURM job (torchrun starts each rank in a
    session of its own, so killing its process group would leave the ranks running)."""
    import psutil
    launcher = psutil.Process(pid)
    for proc in [*launcher.children(recursive=True), launcher]:
        proc.kill()


def shm_op_built() -> bool:
    return any(Path(os.path.expanduser("~/.cache/torch_extensions")).glob("*/deepspeed_shm_comm/deepspeed_shm_comm*.so"))


def zero2_skip_reason() -> str | None:
    try:
        import deepspeed  # noqa: F401
    except ImportError:
        return "deepspeed is not installed"
    if not shm_op_built():
        return ("DeepSpeed's CPU accelerator JIT-compiles its shm_comm op on first use (several minutes here); "
                "build it once with: DS_ACCELERATOR=cpu python -c "
                "'from deepspeed.comm.torch import build_shm_op; build_shm_op()'")
    return None


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, Path]:
    """All jobs of this module at once (each is mostly process start-up): 2-rank DDP kd and okd, 2-rank
    ZeRO-2 kd (DeepSpeed's CPU accelerator, gloo), and the single-process reference: the same global
    batch of 4 as 2 micro-batches of 2 (2 ranks x micro-batch 2 sees the same examples)."""
    root = tmp_path_factory.mktemp("dist")
    quiet = ["train.eval_every=null", "eval.models=[student]"]
    jobs = {
        "ddp": launch(root / "ddp", *SMOKE, "method=kd", *CPU_DDP),
        "single": launch(root / "single", *SMOKE, "method=kd", "train.grad_accum=2", *quiet,
                         "hardware.num_threads=1", nproc=1),
    }
    if (ROOT / "conf" / "method" / "okd.yaml").exists():
        jobs["okd"] = launch(root / "okd", *SMOKE, "method=okd", *CPU_DDP, *quiet)
    if zero2_skip_reason() is None:
        jobs["zero2"] = launch(root / "zero2", *SMOKE, "method=kd", "hardware=zero2", "hardware.device=cpu",
                               "hardware.dtype=float32", "hardware.num_threads=1", *quiet,
                               env_extra={"DS_ACCELERATOR": "cpu"})
    outputs = {name: proc.communicate(timeout=500)[0] for name, proc in jobs.items()}
    for name, proc in jobs.items():
        assert proc.returncode == 0, f"{name} failed:\n{outputs[name][-4000:]}"
    return {name: root / name for name in jobs}


def last_state(run_dir: Path) -> dict:
    return torch.load(run_dir / "checkpoints" / state_dir_name(run_dir) / "state.pt", weights_only=True)


def state_dir_name(run_dir: Path) -> str:
    return (run_dir / "checkpoints" / "LAST").read_text().strip()


def metric_lines(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def train_losses(run_dir: Path) -> dict[int, float]:
    return {line["step"]: line["train/loss"] for line in metric_lines(run_dir) if "train/loss" in line}


def assert_same_student(run_dir: Path, reference: Path, atol: float) -> None:
    a = load_file(run_dir / "student" / "model.safetensors")
    b = load_file(reference / "student" / "model.safetensors")
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=atol, msg=key)


def test_ddp_kd_replicas_agree_and_match_one_process_on_the_same_global_batch(runs):
    """Same examples and the same mean gradient: only the floating-point order of the reduction differs."""
    digests = last_state(runs["ddp"])["replica_digests"]
    assert len(digests) == 2 and digests[0] == digests[1]
    assert_same_student(runs["ddp"], runs["single"], atol=2e-5)
    loss = train_losses(runs["ddp"])
    assert sorted(loss) == [1, 2, 3, 4] and loss == pytest.approx(train_losses(runs["single"]), rel=1e-5)

    # rank 0 alone wrote: one line per step, one result, evaluation by rank 0 with the others waiting
    steps = [line["step"] for line in metric_lines(runs["ddp"])]
    assert steps == sorted(set(steps))
    results = json.loads((runs["ddp"] / "results.json").read_text())
    assert results["run"]["status"] == "completed" and set(results["eval"]) == {"teacher", "student_init", "student"}
    assert not list(runs["ddp"].glob("**/*.tmp"))


def test_ddp_okd_trains_student_and_online_module_identically_on_both_ranks(runs):
    if "okd" not in runs:
        pytest.skip("method okd is not in this checkout")
    state = last_state(runs["okd"])
    digests = state["replica_digests"]
    assert len(digests) == 2 and digests[0] == digests[1]
    flat = load_file(runs["okd"] / "checkpoints" / state_dir_name(runs["okd"]) / "params.safetensors")
    assert {key.split("/")[0] for key in flat} == {"student", "module"}   # both groups checkpointed and compared
    # the ranks draw their own dropout masks (distributed.seed_rank), yet stay equal after all-reduce
    assert len(state["rank_rng"]) == 2 and not torch.equal(state["rank_rng"][0][0], state["rank_rng"][1][0])


def test_zero2_on_cpu_matches_one_process_on_the_same_global_batch(runs):
    if "zero2" not in runs:
        pytest.skip(zero2_skip_reason())
    run_dir = runs["zero2"]
    assert (run_dir / "checkpoints" / "deepspeed" / "phase0-step0000004").is_dir()
    assert "student" not in last_state(run_dir)["optimizers"]   # ZeRO's shards hold the student's Adam states
    loss = train_losses(run_dir)
    assert loss == pytest.approx(train_losses(runs["single"]), rel=1e-5)
    assert_same_student(run_dir, runs["single"], atol=2e-5)
    assert json.loads((run_dir / "results.json").read_text())["run"]["status"] == "completed"


def test_a_killed_ddp_job_resumes_exactly(tmp_path):
    """Two ranks of on-policy GKD (each rank samples with its own RNG stream) killed with SIGKILL after
    their step-8 checkpoint, then rerun: the same losses at every step and a bit-identical student."""
    args = ["+experiment=smoke", "method=gkd", "train.max_steps=40", "train.batch_size=4", "train.save_every=4",
            "train.log_every=1", "train.eval_every=null", "eval.models=[student]", *CPU_DDP]
    reference = launch(tmp_path / "uninterrupted", *args)
    killed = launch(tmp_path / "killed", *args)
    pointer = tmp_path / "killed" / "checkpoints" / "LAST"
    deadline = time.time() + 400
    while time.time() < deadline and killed.poll() is None:
        if pointer.exists() and int(pointer.read_text().split("-")[1]) >= 8:
            kill_job(killed.pid)
            break
        time.sleep(0.05)
    killed.communicate(timeout=60)
    assert killed.returncode == -signal.SIGKILL, "the job finished before it could be killed"
    assert not (tmp_path / "killed" / "results.json").exists()
    resumed = launch(tmp_path / "killed", *args)
    for name, proc in {"uninterrupted": reference, "resumed": resumed}.items():
        out = proc.communicate(timeout=500)[0]
        assert proc.returncode == 0, f"{name} failed:\n{out[-4000:]}"
    steps = [line["step"] for line in metric_lines(tmp_path / "killed")]
    assert steps == sorted(set(steps)), "the resumed job logged some steps twice"
    assert train_losses(tmp_path / "killed") == train_losses(tmp_path / "uninterrupted")
    assert sorted(train_losses(tmp_path / "killed")) == list(range(1, 41))
    assert_same_student(tmp_path / "killed", tmp_path / "uninterrupted", atol=0)
