"""Crash-safe files: atomic JSON, atomic folders, and resumable training checkpoints.

A checkpoint is a folder ``checkpoints/step-NNNNNNN`` holding ``params.safetensors`` (every trainable
parameter, by optimizer group) and ``state.pt`` (optimizer and schedule states, RNG states
(:func:`capture_rng`), data position, method state; tensors and plain containers only, loaded with
``weights_only=True``). It is written under a temporary name and renamed, then ``checkpoints/LAST`` is
atomically repointed, and only then are older checkpoints removed: a crash at any moment leaves the
previous checkpoint usable. The newest :data:`KEEP` checkpoints are kept, so that a latest one that does
not load (a truncated file, a ``LAST`` naming a missing folder) leaves an older one to resume from
(:func:`load_checkpoint`).

Everything published here gets the permissions of an ordinary file or folder under the process's umask
(``mkstemp``/``mkdtemp`` and safetensors create owner-only files; run folders are shared by teams).
"""
from __future__ import annotations

import contextlib
import json
import os
import random
import re
import shutil
import sys
import tempfile
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file, save_model

from kdlab import distributed

KEEP = 2   # checkpoints kept: the newest, and one to fall back on when it does not load
STEP = re.compile(r"step-\d{7,}")   # a checkpoint folder's name (save_checkpoint)


def umask() -> int:
    """The process's umask, read without changing it where Linux says it (``os.umask`` sets it, and a
    thread creating a file meanwhile would get the temporary value)."""
    with contextlib.suppress(OSError, ValueError, StopIteration):
        with open("/proc/self/status") as f:
            return int(next(line for line in f if line.startswith("Umask:")).split()[1], 8)
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def publish_mode(path: Path) -> None:
    """Give ``path`` (and, for a folder, everything in it) the mode ``open``/``mkdir`` would have given."""
    mask = umask()
    paths = [Path(path)]
    if paths[0].is_dir():
        paths += list(paths[0].rglob("*"))
    for p in paths:
        os.chmod(p, (0o777 if p.is_dir() else 0o666) & ~mask)


def _fsync_dir(path: Path) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def atomic_write_text(path: Path, text: str) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        publish_mode(Path(tmp))
        os.replace(tmp, path)
    except BaseException:   # a full disk (ENOSPC) or a kill: the previous file stays, no temporary is left
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    _fsync_dir(path.parent)


def atomic_write_json(path: Path, obj) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, default=float) + "\n")


def read_json(path: Path):
    return json.loads(Path(path).read_text())


@contextlib.contextmanager
def atomic_dir(target: Path):
    """Yield a temporary folder that replaces ``target`` when the block succeeds.

    The old folder is moved aside before the new one is renamed in, so at every moment either the
    old or the new complete folder exists (``recover_dir`` restores the old one after a crash).
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp"))
    try:
        yield tmp
        publish_mode(tmp)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    old = target.with_name(f".{target.name}.old")
    shutil.rmtree(old, ignore_errors=True)
    if target.exists():
        os.replace(target, old)
    os.replace(tmp, target)
    _fsync_dir(target.parent)
    shutil.rmtree(old, ignore_errors=True)


def recover_dir(target: Path) -> None:
    old = Path(target).with_name(f".{Path(target).name}.old")
    if not Path(target).exists() and old.exists():
        os.replace(old, target)


def save_checkpoint(root: Path, step: int, params: dict[str, list[torch.Tensor]], state: dict, keep: int = KEEP) -> Path:
    """Write ``step-<step>``, point ``LAST`` at it, then keep the newest ``keep`` checkpoints. Folders of
    later steps are a trajectory this job abandoned (it resumed from an earlier one) and go first."""
    root = Path(root)
    name = f"step-{step:07d}"
    with atomic_dir(root / name) as tmp:
        flat = {f"{group}/{i}": p.detach().contiguous().cpu() for group, ps in params.items() for i, p in enumerate(ps)}
        save_file(flat, tmp / "params.safetensors")
        torch.save(state, tmp / "state.pt")
    atomic_write_text(root / "LAST", name + "\n")
    prune(root.glob("step-*"), name, keep)
    return root / name


def prune(folders, newest: str, keep: int = KEEP) -> None:
    """Remove all of ``folders`` but the ``keep`` newest up to ``newest`` (names sort by age). Later ones
    are a trajectory this job abandoned (it resumed from an earlier one)."""
    folders = set(folders)
    kept = sorted(p for p in folders if p.name <= newest)[-keep:]
    for old in folders - set(kept):
        shutil.rmtree(old, ignore_errors=True)


def load_checkpoint(root: Path, say=lambda line: print(line, file=sys.stderr)):
    """Return ``(flat_params, state)`` of the newest checkpoint that loads, or ``None``.

    ``LAST`` names the one to resume from; when it is missing, unreadable, or names a folder that does
    not load (a kill or a full disk mid-write, a damaged file), the other ``step-*`` folders are tried,
    newest first, and ``say`` gets one line naming the one used. A file damaged but still well-formed
    (a flipped bit in a tensor) is not detected.
    """
    root = Path(root)
    pointer = root / "LAST"
    named = None
    if pointer.exists():
        named = pointer.read_text(errors="replace").strip()
    folders = sorted((p for p in root.glob("step-*") if STEP.fullmatch(p.name) and p.is_dir()), reverse=True)
    if root / str(named) in folders:   # LAST names one of them ("..", "/etc" or "step-x" name none)
        folders.remove(root / named)
        folders.insert(0, root / named)
    problems = [] if named or not folders else ["checkpoints/LAST is missing"]
    if named and root / named not in folders:
        problems.append(f"checkpoints/LAST names {named[:60]!r}, which is not a checkpoint folder")
    for folder in folders:
        try:
            loaded = load_file(folder / "params.safetensors"), torch.load(folder / "state.pt", weights_only=True)
        except Exception as err:  # noqa: BLE001 - whatever a damaged file raises, the checkpoint is unusable
            problems.append(f"{folder.name} does not load ({type(err).__name__}: {(str(err).splitlines() or [''])[0][:120]})")
            continue
        if problems:
            say(f"kdlab: {'; '.join(problems)}: resuming from {folder}")
        return loaded
    if problems:
        say(f"kdlab: {'; '.join(problems)}: no checkpoint in {root} loads, training starts from step 0")
    return None


def restore_params(params: dict[str, list[torch.Tensor]], flat: dict[str, torch.Tensor]) -> None:
    with torch.no_grad():
        for group, ps in params.items():
            for i, p in enumerate(ps):
                p.copy_(flat[f"{group}/{i}"])


def capture_rng(world_size: int) -> dict:
    """This process's RNG states (torch, Python, CUDA where present) and, with several ranks, every
    rank's torch and Python states: each rank draws from its own stream (``distributed.seed_rank``).
    Every rank must call it."""
    state = {"torch_rng": torch.get_rng_state(), "python_rng": random.getstate()}
    if torch.cuda.is_available():
        state["cuda_rng"] = torch.cuda.get_rng_state_all()
    if world_size > 1:
        state["rank_rng"] = distributed.gather_objects((torch.get_rng_state(), random.getstate()))
    return state


def restore_rng(state: dict, rank: int, world_size: int) -> None:
    """Continue the streams :func:`capture_rng` saved; a job resumed on another number of ranks
    continues rank 0's stream on every rank."""
    torch.set_rng_state(state["torch_rng"])
    random.setstate(state["python_rng"])
    if "cuda_rng" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda_rng"])
    if len(state.get("rank_rng", [])) == world_size:
        torch.set_rng_state(state["rank_rng"][rank][0])
        random.setstate(state["rank_rng"][rank][1])


def save_pretrained(model, tokenizer, folder: Path) -> None:
    """``model`` and ``tokenizer`` as one ``from_pretrained`` folder (safetensors), published atomically."""
    with atomic_dir(folder) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)


def save_weights(model, folder: Path) -> None:
    """``model``'s weights alone as ``folder/model.safetensors``, published atomically."""
    with atomic_dir(folder) as tmp:
        save_model(model, str(tmp / "model.safetensors"))
