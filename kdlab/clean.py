"""``python -m kdlab.clean <folder> ... [--dry-run]``: free the disk that finished jobs' checkpoints hold.

A job keeps its newest resumable checkpoints (``checkpoints/``: trainable weights, optimizer state, RNG
states; about 2 GB for an 81M-parameter student) after it completes, so a sweep of many seeds fills a disk.
Once ``results.json`` says ``completed`` nothing reads them: running the same command again reports the
finished results without loading a checkpoint, and the trained students stay in ``student/`` and
``student_best/`` (``from_pretrained``). This removes ``checkpoints/`` of every completed run folder under the
given folders and leaves everything else: an unfinished job keeps its checkpoints (it resumes from them),
and a folder a live job holds (its run lock, :mod:`kdlab.runlock`) or that cannot be locked is skipped
and named. A removal interrupted half-way leaves a completed folder that still reports its results;
running this again finishes it. It prints each folder it cleaned with the bytes freed, then the total.
"""
from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path

from kdlab import runlock
from kdlab.checkpoint import disk_bytes, read_json, size_text
from kdlab.config import ConfigError


def completed(run_dir: Path) -> bool:
    """Whether ``results.json`` says the job completed (one that cannot be read does not)."""
    try:
        return read_json(run_dir / "results.json").get("run", {}).get("status") == "completed"
    except (OSError, ValueError, AttributeError):
        return False


def clean(folders: list[Path], dry_run: bool = False) -> tuple[list[tuple[Path, int]], list[str]]:
    """Remove the checkpoints of the completed runs under ``folders``: ``([(run folder, bytes)], [skipped
    folders with why])``; with ``dry_run``, what would be removed, removing nothing."""
    removed, skipped = [], []
    runs = sorted({p.parent for folder in folders for p in folder.rglob("results.json")
                   if (p.parent / "checkpoints").is_dir() and completed(p.parent)})
    for run_dir in runs:
        try:
            with runlock.hold(run_dir):
                size = disk_bytes(run_dir / "checkpoints")
                if not dry_run:
                    shutil.rmtree(run_dir / "checkpoints")
                removed.append((run_dir, size))
        except ConfigError as why:   # a live job holds it, or its file system cannot lock
            skipped.append(str(why))
    return removed, skipped


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("folders", type=Path, nargs="+", help="folders searched recursively for run folders")
    parser.add_argument("--dry-run", action="store_true", help="say what would be removed, remove nothing")
    args = parser.parse_args(argv)
    missing = [str(f) for f in args.folders if not f.is_dir()]
    if missing:
        print(f"kdlab: error: {', '.join(missing)} is not a folder; pass the output folder of a run or sweep "
              f"(e.g. outputs/multirun/<experiment>)", file=sys.stderr)
        sys.exit(2)
    removed, skipped = clean(args.folders, args.dry_run)
    verb = "would remove" if args.dry_run else "removed"
    for run_dir, size in removed:
        print(f"kdlab: {verb} {run_dir}/checkpoints ({size_text(size)})")
    for why in skipped:
        print(f"kdlab: skipped: {why}")
    print(f"kdlab: {verb} the checkpoints of {len(removed)} completed run(s), {size_text(sum(s for _, s in removed))}; "
          f"unfinished runs keep theirs")


if __name__ == "__main__":
    main()
