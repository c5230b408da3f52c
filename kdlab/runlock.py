"""One job per run folder: an exclusive ``flock`` on ``<run folder>/.lock``, and the leftovers of killed
jobs removed once it is held. The stores shared by jobs (fine-tuned teachers, teacher caches) lock each
entry the same way while writing it (:func:`hold_entry`) and remove the leftovers of killed writers of any
entry that no live job holds (:func:`remove_stale_temporaries`).

The lock is an advisory ``fcntl.flock`` held for the whole job by its main process (global rank 0 of a
distributed job: the other ranks of the same job must not be refused by it). The kernel drops it when
that process ends, however it ends (``kill -9`` included), so a killed job never blocks its rerun; the
file stays and only says who held it last. A second job into a held folder stops at once with one line
naming the holder. What this needs of a shared file system is in docs/SLURM.md; what it guarantees in
docs/RELIABILITY.md.
"""
from __future__ import annotations

import contextlib
import datetime
import fcntl
import json
import os
import shutil
import socket
from pathlib import Path

from kdlab.checkpoint import recover_dir
from kdlab.config import ConfigError

LOCK_NAME = ".lock"
# folders of a run that atomic writes (kdlab.checkpoint, kdlab.loggers) put temporaries into
TEMP_FOLDERS = (".", "checkpoints", "eval")


class RunFolderBusy(ConfigError):
    """Another live job holds the run folder."""


def main_process() -> bool:
    """Whether this process is the one of its job that holds the lock: global rank 0 of a torchrun or
    SLURM multi-task job (ranks from the environment: the process group does not exist yet)."""
    for var in ("RANK", "SLURM_PROCID"):
        if var in os.environ:
            return int(os.environ[var]) == 0
    return True


@contextlib.contextmanager
def hold(run_dir: Path, locks: bool = True):
    """Hold ``run_dir``'s lock for the block (nothing when ``locks`` is false: the other ranks of a job),
    after creating the folder; raises :class:`RunFolderBusy` when a live job holds it."""
    run_dir = Path(run_dir)
    if not locks:
        yield
        return
    run_dir.mkdir(parents=True, exist_ok=True)
    fd = os.open(run_dir / LOCK_NAME, os.O_RDWR | os.O_CREAT, 0o666)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise RunFolderBusy(f"{run_dir} is in use by another job ({holder(fd)}); wait for it to end, or "
                                f"pass hydra.run.dir=<another folder>") from None
        except OSError as err:   # ENOLCK, ENOSYS, EOPNOTSUPP: a file system mounted without flock
            raise ConfigError(f"cannot lock {run_dir / LOCK_NAME} ({err.strerror}): its file system does not "
                              f"support flock (see docs/SLURM.md, Run-folder lock); pass hydra.run.dir=<a folder "
                              f"on one that does>") from None
        since = datetime.datetime.now().astimezone().isoformat(timespec="seconds")
        info = json.dumps({"host": socket.gethostname(), "pid": os.getpid(), "since": since}) + "\n"
        os.ftruncate(fd, 0)
        os.pwrite(fd, info.encode(), 0)
        yield
    finally:
        os.close(fd)   # releases the lock


def holder(fd: int) -> str:
    """'host H, pid P, since T' from the lock file (a holder that has not written it yet is 'starting')."""
    with contextlib.suppress(OSError, ValueError, KeyError, TypeError):
        info = json.loads(os.pread(fd, 4096, 0))
        return f"host {info['host']}, pid {info['pid']}, since {info['since']}"
    return "it is starting; host and pid not written yet"


def remove_leftovers(run_dir: Path) -> list[Path]:
    """Delete the temporaries of writes a killed job left (``.<name>.*.tmp``: checkpoints, students,
    evaluations, metrics rewrites) and settle folders an ``atomic_dir`` replace left half-done
    (``.<name>.old``: restored when ``<name>`` is missing, removed when it is there). Call with the
    lock held: a live job's temporaries are its own writes in progress."""
    removed = []
    for sub in TEMP_FOLDERS:
        folder = Path(run_dir) / sub
        if folder.is_dir():
            removed += [path for path in [*folder.glob(".*.tmp"), *folder.glob(".*.old")] if _settle(path)]
    return removed


def _settle(leftover: Path) -> bool:
    """Remove a killed write's ``.<name>.*.tmp``, or settle its ``.<name>.old`` (renamed back when ``<name>`` is
    missing, else removed); whether something was removed."""
    if leftover.name.endswith(".old"):
        recover_dir(leftover.with_name(leftover.name[1:-len(".old")]))
    if not leftover.exists() and not leftover.is_symlink():
        return False
    shutil.rmtree(leftover) if leftover.is_dir() and not leftover.is_symlink() else leftover.unlink()
    return True


def _entry_name(leftover: Path) -> str:
    """``<name>`` of a store entry's leftover: ``.<name>.<random>.tmp`` (``tempfile``'s random part has no dot) or
    ``.<name>.old``."""
    if leftover.name.endswith(".old"):
        return leftover.name[1:-len(".old")]
    return leftover.name[1:].rsplit(".", 2)[0]


@contextlib.contextmanager
def hold_entry(root: Path, name: str, doing: str):
    """Hold ``<root>/<name>.lock`` for the block: the right to write the store entry ``<root>/<name>``. Another
    job holding it is waited for (one line says so; it may publish the entry meanwhile, so check again inside
    the block). Once held, the store's stale temporaries are removed, this entry's included."""
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    lock = root / f"{name}.lock"
    with open(lock, "a") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            print(f"kdlab: waiting for {lock} (another job is {doing})", flush=True)
            fcntl.flock(f, fcntl.LOCK_EX)
        try:
            remove_stale_temporaries(root, held=name)
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def remove_stale_temporaries(root: Path, held: str | None = None) -> list[Path]:
    """Remove what killed writers left in the store ``root`` (a kill while publishing leaves a full copy:
    gigabytes for a large teacher): each ``.<name>.*.tmp`` and ``.<name>.old`` whose ``<name>.lock`` exists
    (a kdlab entry: the lock is taken before anything of it is written) and is free, held by no live job,
    or is ``held`` by this one. Files that no lock marks are not kdlab's and are left alone."""
    root = Path(root)
    removed = []
    for leftover in sorted([*root.glob(".*.tmp"), *root.glob(".*.old")]):
        name = _entry_name(leftover)
        lock = root / f"{name}.lock"
        if name == held:
            removed += [leftover] if _settle(leftover) else []
            continue
        with contextlib.suppress(OSError), open(lock, "r") as f:   # no lock file: not a kdlab entry
            try:
                fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:   # a live job is writing this entry: the temporary is its work in progress
                continue
            removed += [leftover] if _settle(leftover) else []
    return removed
