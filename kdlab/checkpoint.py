"""Crash-safe files: atomic JSON, atomic folders, and resumable training checkpoints.

A checkpoint is a folder ``checkpoints/step-NNNNNNN`` holding ``params.safetensors`` (every trainable
parameter, by optimizer group) and ``state.pt`` (optimizer and schedule states, RNG states
(:func:`capture_rng`), data position, method state; tensors and plain containers only, loaded with
``weights_only=True``). It is written under a temporary name and renamed, then ``checkpoints/LAST`` is
atomically repointed, and only then are older checkpoints removed: a crash at any moment leaves the
previous checkpoint usable. The newest :data:`KEEP` checkpoints are kept, so that a latest one that does
not load (a truncated file, a ``LAST`` naming a missing folder) leaves an older one to resume from
(:func:`load_checkpoint`).

Every file kdlab writes goes through :func:`atomic_file` or :func:`atomic_dir` (appends: :func:`on_full_disk`),
so a full disk or quota, however the library writing met it, ends a job with one line naming the file,
the space free there and the space needed (:class:`DiskFull`).

Everything published here gets the permissions of an ordinary file or folder under the process's umask
(``mkstemp``/``mkdtemp`` and safetensors create owner-only files; run folders are shared by teams).
"""
from __future__ import annotations

import contextlib
import errno
import fcntl
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


DISK_FULL = (errno.ENOSPC, errno.EDQUOT)
WRITER_LOCK = ".writer.lock"   # in an atomic_dir temporary while its writer lives
FULL_BELOW = 1 << 20   # bytes free under which a write that failed in a library's own way met a full disk


class DiskFull(OSError):
    """A write kdlab makes met a full disk (ENOSPC) or quota (EDQUOT); ``str()`` is one line naming the
    file, the space free there and the space it needs."""

    def __init__(self, code: int, path, needed: int = 0):
        super().__init__(code, os.strerror(code), str(path))
        self.needed = needed
        self.free, self.free_inodes = _free(Path(path).parent), _free(Path(path).parent, inodes=True)

    def __str__(self) -> str:
        needed = f"about {size_text(self.needed)} needed" if self.needed else ""
        if self.free_inodes == 0:
            room = "no free inodes there (too many files)"
        elif self.errno == errno.EDQUOT or self.free is None:
            room = needed
        else:   # what a write held when the disk filled is no more than was free: only an estimate says more
            room = f"{size_text(self.free)} free there, " + (needed if self.needed > self.free else "more needed")
        return (f"{self.strerror} writing {self.filename}{f' ({room})' if room else ''}; the files written before "
                f"are intact: free space and run the same command again to resume")


def size_text(size: int) -> str:
    for unit in ("bytes", "KiB", "MiB", "GiB"):
        if size < 1024 or unit == "GiB":
            return f"{size} {unit}" if unit == "bytes" else f"{size:.1f} {unit}"
        size /= 1024


def _free(folder: Path, inodes: bool = False) -> int | None:
    """Bytes (or inodes) an unprivileged process may still use on ``folder``'s file system."""
    with contextlib.suppress(OSError):
        st = os.statvfs(folder)
        return st.f_favail if inodes else st.f_bavail * st.f_frsize
    return None


def tensor_bytes(obj) -> int:
    """Bytes of the tensors in ``obj`` (nested dicts, lists and tuples): what writing them will take."""
    if isinstance(obj, torch.Tensor):
        return obj.numel() * obj.element_size()
    if isinstance(obj, dict):
        obj = list(obj.values())
    return sum(tensor_bytes(v) for v in obj) if isinstance(obj, (list, tuple)) else 0


def disk_bytes(path: Path) -> int:
    """Bytes in ``path`` (a file, or a folder's files; 0 when it is gone)."""
    with contextlib.suppress(OSError):
        if not path.is_dir():
            return path.stat().st_size
        return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())
    return 0


def disk_full_errno(err: BaseException, folder: Path) -> int | None:
    """ENOSPC or EDQUOT when ``err`` comes from a full disk or quota, however the library writing reported it:
    an ``OSError`` (Python, numpy), one in its chain (``torch.save`` to a file object raises a ``RuntimeError``
    from it), the OS's words in its message (safetensors, tokenizers), or else a failed write on a file system
    with less than :data:`FULL_BELOW` left (``torch.save`` to a path, DeepSpeed)."""
    seen, chain = err, []
    while seen is not None and seen not in chain:
        chain.append(seen)
        if isinstance(seen, OSError) and seen.errno in DISK_FULL:
            return seen.errno
        text = str(seen)
        if "No space left on device" in text or "os error 28" in text:
            return errno.ENOSPC
        if "Disk quota exceeded" in text or "os error 122" in text:
            return errno.EDQUOT
        seen = seen.__cause__ or seen.__context__
    free = _free(folder)
    return errno.ENOSPC if isinstance(err, (OSError, RuntimeError)) and free is not None and free < FULL_BELOW else None


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        with contextlib.suppress(OSError):
            path.unlink()


@contextlib.contextmanager
def on_full_disk(path: Path, needed: int = 0, temporary: Path | None = None):
    """Write ``path`` in the block: a full disk or quota met there becomes one :class:`DiskFull` naming
    ``path`` and ``needed`` (bytes, an estimate; 0: unknown). With ``temporary`` (what the block writes
    into), the temporary is removed however the block ends but by succeeding."""
    path = Path(path)
    try:
        yield
    except BaseException as err:
        code = None if isinstance(err, DiskFull) else disk_full_errno(err, path.parent)
        if temporary is not None:
            _remove(temporary)
        if code is None:
            raise
        raise DiskFull(code, path, needed) from err


def _fsync_file(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)   # where a network file system reports a full disk it had accepted writes for
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_file(path: Path, needed: int = 0):
    """Yield a temporary path beside ``path`` that replaces it when the block succeeds: the one way kdlab
    writes a file (:func:`atomic_dir` for folders). A kill or a failure leaves the old file; a full disk
    is a :class:`DiskFull` naming ``path`` (``needed``: the bytes it will need, when known)."""
    path = Path(path)
    with on_full_disk(path, needed):
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        os.close(fd)
    tmp = Path(name)
    with on_full_disk(path, needed, temporary=tmp):
        yield tmp
        _fsync_file(tmp)
        publish_mode(tmp)
        os.replace(tmp, path)
    _fsync_dir(path.parent)


def atomic_write_text(path: Path, text: str) -> None:
    data = text.encode("utf-8")
    with atomic_file(path, needed=len(data)) as tmp:
        tmp.write_bytes(data)


def atomic_write_json(path: Path, obj) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, default=float) + "\n")


def read_json(path: Path):
    return json.loads(Path(path).read_text())


@contextlib.contextmanager
def atomic_dir(target: Path, needed: int = 0):
    """Yield a temporary folder that replaces ``target`` when the block succeeds.

    The old folder is moved aside before the new one is renamed in, so at every moment either the
    old or the new complete folder exists (``recover_dir`` restores the old one after a crash). A full
    disk is a :class:`DiskFull` naming ``target`` and the space needed: ``needed`` (the caller's estimate)
    or else the size of the folder it replaces. Until the old folder is removed, the temporary holds
    :data:`WRITER_LOCK`, locked: a temporary whose lock nobody holds is a killed writer's
    (:func:`kdlab.runlock.remove_stale_temporaries`); a kill after the rename leaves that empty file in
    ``target``, harmless.
    """
    target = Path(target)
    needed = needed or disk_bytes(target)
    with on_full_disk(target, needed):
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp"))
    with contextlib.ExitStack() as held, on_full_disk(target, needed, temporary=tmp):
        writer = held.enter_context(open(tmp / f"{WRITER_LOCK}.new", "a"))
        with contextlib.suppress(OSError):   # a file system without flock: the temporary counts as live
            fcntl.flock(writer, fcntl.LOCK_EX | fcntl.LOCK_NB)
        os.rename(tmp / f"{WRITER_LOCK}.new", tmp / WRITER_LOCK)   # appears locked, never unlocked
        yield tmp
        for path in tmp.rglob("*"):
            if path.is_file():
                _fsync_file(path)
        publish_mode(tmp)
        old = target.with_name(f".{target.name}.old")
        shutil.rmtree(old, ignore_errors=True)
        if target.exists():
            os.replace(target, old)
        os.replace(tmp, target)   # the lock travels with the folder: held until the old one is gone
        _fsync_dir(target.parent)
        shutil.rmtree(old, ignore_errors=True)
        (target / WRITER_LOCK).unlink()


def recover_dir(target: Path) -> None:
    old = Path(target).with_name(f".{Path(target).name}.old")
    if not Path(target).exists() and old.exists():
        os.replace(old, target)


def save_checkpoint(root: Path, step: int, params: dict[str, list[torch.Tensor]], state: dict, keep: int = KEEP) -> Path:
    """Write ``step-<step>``, point ``LAST`` at it, then keep the newest ``keep`` checkpoints. Folders of
    later steps are a trajectory this job abandoned (it resumed from an earlier one) and go first."""
    root = Path(root)
    name = f"step-{step:07d}"
    flat = {f"{group}/{i}": p.detach().contiguous().cpu() for group, ps in params.items() for i, p in enumerate(ps)}
    with atomic_dir(root / name, needed=tensor_bytes([flat, state])) as tmp:
        save_file(flat, tmp / "params.safetensors")
        with open(tmp / "state.pt", "wb") as f:   # a file object: its OSError (a full disk) is in torch's error chain
            torch.save(state, f)
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
    with atomic_dir(folder, needed=tensor_bytes(model.state_dict())) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)


def save_weights(model, folder: Path) -> None:
    """``model``'s weights alone as ``folder/model.safetensors``, published atomically."""
    with atomic_dir(folder, needed=tensor_bytes(model.state_dict())) as tmp:
        save_model(model, str(tmp / "model.safetensors"))
