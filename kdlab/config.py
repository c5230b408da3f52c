"""Config validation: every group's values are checked before any model loads.

Each module that a config group maps onto declares a ``SCHEMA``: a dict from key to a check. A check
is called with the dotted key and the value and raises :class:`ConfigError` with a one-line message
that names the bad value and how to fix it.
"""
from __future__ import annotations

import hashlib
import json
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable


class ConfigError(ValueError):
    """A bad config value; the message is one line naming the value and the fix."""


def plain(value: Any) -> Any:
    """OmegaConf containers as plain dicts and lists (other values unchanged)."""
    from omegaconf import DictConfig, ListConfig, OmegaConf

    if isinstance(value, (DictConfig, ListConfig)):
        return OmegaConf.to_container(value, resolve=True)
    return value


def content_key(components, digits: int = 12) -> str:
    """The hex digest naming what a content-keyed store holds: SHA-1 of ``components`` (plain JSON values)
    serialised with sorted keys, so equal inputs give one folder whatever the dict order. Every store uses it:
    fine-tuned teachers, pruned students, the top-k teacher cache, SeqKD's teacher outputs."""
    return hashlib.sha1(json.dumps(components, sort_keys=True).encode()).hexdigest()[:digits]


@dataclass(frozen=True)
class Range:
    """A finite number (an integer with ``integer=True``) within ``[low, high]`` (open ends with ``low_open`` /
    ``high_open``; no bound where None); ``optional=True`` also allows None."""
    low: float | None = None
    high: float | None = None
    integer: bool = False
    low_open: bool = False
    high_open: bool = False
    optional: bool = False

    def __call__(self, key: str, value: Any) -> None:
        if value is None and self.optional:
            return
        kind = "an integer" if self.integer else "a number"
        if isinstance(value, bool) or not isinstance(value, (int, float)) or (
            self.integer and not isinstance(value, int)
        ):
            raise ConfigError(f"{key}={value!r} is not {kind}; set {key} to {kind} in {self.describe()}")
        if not math.isfinite(value):   # NaN compares false with every bound, and no setting means infinity
            raise ConfigError(f"{key}={value} is not a finite number; set {key} to {kind} in {self.describe()}")
        too_low = self.low is not None and (value <= self.low if self.low_open else value < self.low)
        too_high = self.high is not None and (value >= self.high if self.high_open else value > self.high)
        if too_low or too_high:
            raise ConfigError(f"{key}={value} is out of range; set {key} to {kind} in {self.describe()}")

    def describe(self) -> str:
        lo = "-inf" if self.low is None else f"{self.low:g}"
        hi = "inf" if self.high is None else f"{self.high:g}"
        return f"{'(' if self.low_open or self.low is None else '['}{lo}, {hi}{')' if self.high_open or self.high is None else ']'}"


@dataclass(frozen=True, init=False)
class _Allowed:
    """A check given what it allows positionally (``OneOf("a", "b")``); ``optional=True`` also allows None."""
    allowed: tuple
    optional: bool = False

    def __init__(self, *allowed: Any, optional: bool = False):
        object.__setattr__(self, "allowed", tuple(allowed))
        object.__setattr__(self, "optional", optional)

    def __call__(self, key: str, value: Any) -> None:
        if value is None and self.optional:
            return
        self.check(key, value)

    def check(self, key: str, value: Any) -> None:
        raise NotImplementedError


class OneOf(_Allowed):
    """One of the given values."""

    def check(self, key: str, value: Any) -> None:
        if value not in self.allowed:
            raise ConfigError(f"{key}={value!r} is not valid; choose one of: {', '.join(map(str, self.allowed))}")


class Type(_Allowed):
    """An instance of one of the given types (a bool only where bool is given)."""

    def check(self, key: str, value: Any) -> None:
        value = plain(value)
        if isinstance(value, bool) and bool not in self.allowed:
            ok = False
        else:
            ok = isinstance(value, self.allowed)
        if not ok:
            names = " or ".join(t.__name__ for t in self.allowed)
            raise ConfigError(f"{key}={value!r} has the wrong type; set {key} to a {names}")


NAME = re.compile(r"\w[\w.+=,@-]{0,127}")


def check_name(key: str, value: Any) -> None:
    """A name that becomes a path component (``teacher.name`` in ``teachers/<key>/``, ``run_name`` in the run
    folder, ...): letters, digits and ``_ . + = , @ -``, not starting with a dot, so that it can neither
    leave its folder (``..``, ``/``) nor pass for one of kdlab's hidden temporaries."""
    if not isinstance(value, str) or not NAME.fullmatch(value):
        raise ConfigError(f"{key}={value!r} is not a valid name (it becomes part of a file path); use letters, "
                          f"digits and _ . + = , @ - only, not starting with a dot, at most 128 characters")


def check_under(root: str | Path, path: str | Path, what: str) -> Path:
    """``path``, refused unless it lies inside ``root`` once both are resolved (``..`` and symbolic links
    followed): a store never writes outside its own folder."""
    root_resolved, resolved = Path(root).expanduser().resolve(), Path(path).expanduser().resolve()
    if not resolved.is_relative_to(root_resolved) or resolved == root_resolved:
        raise ConfigError(f"{what}: {path} is not inside {root}; check the names that make up the path")
    return Path(path)


def check_section(prefix: str, section: dict, schema: dict, ignore: Iterable[str] = ("name",)) -> None:
    """Check every key of ``section`` against ``schema``; unknown keys are typos and are rejected."""
    for key, value in section.items():
        if key in ignore:
            continue
        dotted = f"{prefix}.{key}"
        if key not in schema:
            valid = ", ".join(sorted(schema)) or "(none)"
            raise ConfigError(f"{dotted} is not a known key; valid keys of {prefix}: {valid}")
        schema[key](dotted, value)


def load_option(group: str, name: str, conf_dir: str | Path | None = None):
    """``conf/<group>/<name>.yaml`` as a job sees it, composed over its defaults (teacher and student options
    extend ``conf/model/``), as a plain, writable DictConfig: for code that builds a model outside a job."""
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    conf_dir = Path(conf_dir) if conf_dir else Path(__file__).resolve().parents[1] / "conf"
    with initialize_config_dir(str(conf_dir), version_base="1.3"):
        return OmegaConf.create(OmegaConf.to_container(compose("config", overrides=[f"{group}={name}"])[group]))
