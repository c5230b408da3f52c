"""Compare resolved configs of this checkout's conf/ against a git revision's (default HEAD).

    python .ci/compare_configs.py [REV]

Composes, in both trees, the main config for every teacher and student option (and every pair), every
experiment (alone and with every method), the eval and cache_teacher configs, and prints each difference
of ``OmegaConf.to_yaml`` (values; and key order, reported separately). Exit status 1 if any value differs.
For refactors of conf/ that must leave every job's config.yaml unchanged.
"""
from __future__ import annotations

import subprocess
import sys
import tempfile
from pathlib import Path

from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

ROOT = Path(__file__).resolve().parents[1]


def options(conf: Path, group: str) -> list[str]:
    return sorted(p.stem for p in (conf / group).glob("*.yaml"))


def cases(conf: Path) -> list[tuple[str, tuple[str, ...]]]:
    teachers, students = options(conf, "teacher"), options(conf, "student")
    out = [("config", ())] + [("config", (f"teacher={t}",)) for t in teachers]
    out += [("config", (f"student={s}",)) for s in students]
    out += [("config", (f"student={s}", f"teacher={t}")) for s in students for t in teachers]
    for e in options(conf, "experiment"):
        out += [("config", (f"+experiment={e}",))]
        out += [("config", (f"+experiment={e}", f"method={m}")) for m in options(conf, "method")]
    out += [("eval", ()), ("cache_teacher", ())]
    return out


def render(conf: Path, name: str, overrides: tuple[str, ...]) -> str:
    try:
        with initialize_config_dir(str(conf), version_base="1.3"):
            return OmegaConf.to_yaml(compose(name, overrides=list(overrides)))
    except Exception as err:  # noqa: BLE001  (a case that fails in both trees is not a difference)
        return f"ERROR {type(err).__name__}: {err}"


def main(rev: str = "HEAD") -> int:
    with tempfile.TemporaryDirectory() as tmp:
        archive = subprocess.run(["git", "-C", str(ROOT), "archive", rev, "conf", "experiments", "sweeps"],
                                 check=True, capture_output=True).stdout
        subprocess.run(["tar", "-x", "-C", tmp], input=archive, check=True)
        old_conf, new_conf = Path(tmp) / "conf", ROOT / "conf"
        todo = sorted(set(cases(old_conf)) | set(cases(new_conf)))
        values = order = 0
        for name, overrides in todo:
            old, new = render(old_conf, name, overrides), render(new_conf, name, overrides)
            if old == new:
                continue
            same_values = not old.startswith("ERROR") and not new.startswith("ERROR") and (
                OmegaConf.to_container(OmegaConf.create(old)) == OmegaConf.to_container(OmegaConf.create(new)))
            label = f"{name} {' '.join(overrides)}"
            if same_values:
                order += 1
                print(f"key order only: {label}")
            else:
                values += 1
                print(f"DIFFERENT: {label}")
                import difflib
                sys.stdout.writelines(difflib.unified_diff(old.splitlines(True), new.splitlines(True), rev, "worktree", n=1))
        print(f"{len(todo)} configs compared against {rev}: {values} differ in values, {order} in key order only")
        return 1 if values else 0


if __name__ == "__main__":
    sys.exit(main(*sys.argv[1:]))
