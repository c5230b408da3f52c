"""One job per run folder: an exclusive ``flock`` on ``<run folder>/.lock``, and the leftovers of killed
jobs removed once it is held. The stores shared by jobs (fine-tuned teachers, teacher caches) have no
lock of their own: they remove the temporaries of writers that are dead (:func:`remove_stale_temporaries`).

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

from kdlab.checkpoint import WRITER_LOCK, recover_dir
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
        if not folder.is_dir():
            continue
        for path in folder.glob(".*.tmp"):
            shutil.rmtree(path) if path.is_dir() and not path.is_symlink() else path.unlink()
            removed.append(path)
        for old in folder.glob(".*.old"):
            target = old.with_name(old.name[1:-len(".old")])
            recover_dir(target)
            if old.exists():
                shutil.rmtree(old)
                removed.append(old)
    return removed


def remove_stale_temporaries(store: Path) -> list[Path]:
    """Remove what killed writers left in ``store``, a folder of entries shared by jobs (fine-tuned teachers,
    teacher caches): a kill while an entry is published leaves its ``.<name>.*.tmp``, a full copy
    (gigabytes for a large teacher), and a kill between ``atomic_dir``'s renames a ``.<name>.old``.
    A temporary is removed when its :data:`~kdlab.checkpoint.WRITER_LOCK` is there and no live process holds
    it; one without that file is not a kdlab writer's and is left alone. A ``.<name>.old`` is removed when
    ``<name>`` is there, and renamed back when it is not and no live writer is replacing it."""
    store, removed, writing = Path(store), [], set()
    for leftover in sorted(store.glob(".*.tmp")):
        try:
            fd = os.open(leftover / WRITER_LOCK, os.O_WRONLY | os.O_APPEND)   # never created here
        except OSError:
            continue
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:   # a live writer's (or no flock on this file system: taken as live)
            writing.add(leftover.name[1:].rsplit(".", 2)[0])   # .<name>.<random, no dot>.tmp
        else:
            shutil.rmtree(leftover, ignore_errors=True)
            removed.append(leftover)
        finally:
            os.close(fd)
    for old in sorted(store.glob(".*.old")):
        name = old.name[1:-len(".old")]
        if (store / name).exists():
            shutil.rmtree(old, ignore_errors=True)
            removed.append(old)
        elif name not in writing:
            recover_dir(store / name)
    return removed
