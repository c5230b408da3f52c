"""Metric sinks: jsonl / csv contents, resume truncation, rank gating, config checks, and a W&B
offline run read back from its ``.wandb`` transaction log."""
from __future__ import annotations

import csv
import json
import struct
import zlib
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from kdlab import network
from kdlab.config import ConfigError
from kdlab.loggers import build_logger, flatten, resolve_wandb_mode, validate_logger

WANDB_DEFAULTS = dict(project="kdlab", entity=None, group=None, job_type="train", tags=[], mode=None, dir=None)


def make_cfg(name: str, **logger_fields):
    fields = {**WANDB_DEFAULTS, **logger_fields} if name == "wandb" else logger_fields
    return OmegaConf.create(
        {"run_name": "kd-tiny-s1", "group": "sweep-a", "seed": 1, "lr": "${seed}", "logger": {"name": name, **fields}}
    )


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def read_csv(path: Path) -> list[list[str]]:
    with open(path, newline="") as f:
        return list(csv.reader(f))


def test_jsonl_lines_and_tensor_values(tmp_path):
    logger = build_logger(make_cfg("none"), tmp_path)
    logger.log({"split": "train", "train/loss": torch.tensor(2.5), "train/lr/student": 1e-3}, step=1)
    logger.log({"split": "valid", "valid/rougeL": 31.25}, step=10)
    logger.finish()
    assert read_jsonl(tmp_path / "metrics.jsonl") == [
        {"step": 1, "split": "train", "train/loss": 2.5, "train/lr/student": 1e-3},
        {"step": 10, "split": "valid", "valid/rougeL": 31.25},
    ]
    assert not (tmp_path / "metrics.csv").exists()


def test_jsonl_is_flushed_per_line(tmp_path):
    logger = build_logger(make_cfg("none"), tmp_path)
    logger.log({"train/loss": 1.0}, step=0)
    # read before finish(): a crash right now must not lose the line
    assert read_jsonl(tmp_path / "metrics.jsonl") == [{"step": 0, "train/loss": 1.0}]
    logger.finish()


def test_csv_long_format_with_new_keys(tmp_path):
    logger = build_logger(make_cfg("csv"), tmp_path)
    logger.log({"split": "train", "train/loss": 3.0}, step=0)
    logger.log({"train/loss": 2.0, "valid/rougeL": 12.5}, step=5)
    logger.finish()
    assert read_csv(tmp_path / "metrics.csv") == [
        ["step", "key", "value"],
        ["0", "train/loss", "3.0"],  # the string `split` stays in the jsonl only
        ["5", "train/loss", "2.0"],
        ["5", "valid/rougeL", "12.5"],
    ]
    assert len(read_jsonl(tmp_path / "metrics.jsonl")) == 2


def test_truncate_after_on_resume(tmp_path):
    logger = build_logger(make_cfg("csv"), tmp_path)
    for step in range(6):
        logger.log({"train/loss": float(step)}, step=step)
    logger.finish()
    with open(tmp_path / "metrics.jsonl", "a") as f:
        f.write('{"step": 6, "train/lo')  # the line a crash cut short
    with open(tmp_path / "metrics.csv", "a") as f:
        f.write("6,train/lo")

    resumed = build_logger(make_cfg("csv"), tmp_path)  # opens the existing files
    resumed.truncate_after(2)
    resumed.log({"train/loss": 30.0}, step=3)
    resumed.finish()

    rows = read_jsonl(tmp_path / "metrics.jsonl")
    assert [(r["step"], r["train/loss"]) for r in rows] == [(0, 0.0), (1, 1.0), (2, 2.0), (3, 30.0)]
    assert read_csv(tmp_path / "metrics.csv") == [
        ["step", "key", "value"],
        ["0", "train/loss", "0.0"],
        ["1", "train/loss", "1.0"],
        ["2", "train/loss", "2.0"],
        ["3", "train/loss", "30.0"],
    ]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["metrics.csv", "metrics.jsonl"]  # no temp files left


def test_non_main_rank_writes_nothing(tmp_path):
    logger = build_logger(make_cfg("csv"), tmp_path / "run", is_main=False)
    logger.log({"train/loss": 1.0}, step=0)
    logger.summary({"eval": {"x": 1.0}})
    logger.finish()
    assert not (tmp_path / "run").exists()


def test_flatten_nested_and_bucket_lists():
    tree = {"eval": {"student": {"d": {"rougeL": 30.0, "unc_buckets": [{"bucket": 0, "kl": 0.5}]}}}, "n": 3}
    assert flatten(tree) == {
        "eval/student/d/rougeL": 30.0,
        "eval/student/d/unc_buckets/0/bucket": 0,
        "eval/student/d/unc_buckets/0/kl": 0.5,
        "n": 3,
    }


@pytest.mark.parametrize(
    "section, match",
    [
        ({"name": "mlflow"}, "logger.name"),
        ({"name": "csv", "project": "x"}, "logger.project is not a known key"),
        ({**WANDB_DEFAULTS, "name": "wandb", "mode": "dryrun"}, "logger.mode"),
        ({**WANDB_DEFAULTS, "name": "wandb", "job_type": "sweep"}, "logger.job_type"),
        ({**WANDB_DEFAULTS, "name": "wandb", "tags": ["ok", 3]}, "logger.tags"),
    ],
)
def test_validate_logger_rejects(section, match):
    with pytest.raises(ConfigError, match=match):
        validate_logger(OmegaConf.create(section))


def test_shipped_yaml_configs_validate():
    for path in (Path(__file__).parents[1] / "conf" / "logger").glob("*.yaml"):
        # as composed: `logger` under a run config that has an `experiment` name
        validate_logger(OmegaConf.create({"experiment": "x", "logger": OmegaConf.load(path)}).logger)


def test_wandb_mode_resolution(monkeypatch):
    monkeypatch.setattr(network, "reachable", lambda url, timeout: False)
    monkeypatch.setenv("WANDB_MODE", "disabled")
    assert resolve_wandb_mode("online") == ("online", False)  # explicit config wins
    assert resolve_wandb_mode(None) == ("disabled", False)  # then the environment
    monkeypatch.delenv("WANDB_MODE")
    assert resolve_wandb_mode(None) == ("offline", True)  # then reachability
    monkeypatch.setattr(network, "reachable", lambda url, timeout: True)
    assert resolve_wandb_mode(None) == ("online", True)


# --- W&B offline run, read back with the record format that `wandb sync` replays -----------------
# The .wandb file is a LevelDB-style log (wandb-core's `leveldb` writer): a 7-byte header
# (":W&B", magic 0xBEE1, version 0), then 32 KiB blocks of chunks, each with a 7-byte header
# (CRC-32 of type byte + data, length, type FULL=1/FIRST=2/MIDDLE=3/LAST=4) carrying a serialised
# `wandb_internal_pb2.Record`. wandb 0.31 ships no Python reader (the old `datastore` is gone).

BLOCK, HEADER = 32768, 7


def wandb_records(path: Path):
    from wandb.proto import wandb_internal_pb2

    data = path.read_bytes()
    assert struct.unpack("<4sHB", data[:HEADER]) == (b":W&B", 0xBEE1, 0)
    pos, pending = HEADER, b""
    while pos + HEADER <= len(data):
        if BLOCK - pos % BLOCK < HEADER:  # block trailer padding
            pos += BLOCK - pos % BLOCK
            continue
        crc, length, kind = struct.unpack("<IHB", data[pos : pos + HEADER])
        chunk = data[pos + HEADER : pos + HEADER + length]
        pos += HEADER + length
        if kind == 0:
            continue
        assert crc == zlib.crc32(chunk, zlib.crc32(bytes([kind]))), "corrupt chunk"
        pending += chunk
        if kind in (1, 4):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            pending = b""
            yield record


def item_key(item) -> str:
    return item.key or "/".join(item.nested_key)


def test_wandb_offline_run_is_readable(tmp_path, monkeypatch):
    pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_MODE", "offline")
    cfg = make_cfg("wandb", tags=["unit"])
    logger = build_logger(cfg, tmp_path)
    for step in (1, 2, 3):
        logger.log({"split": "train", "train/loss": 4.0 - step}, step=step)
    logger.log({"split": "valid", "valid/rougeL": 17.5}, step=3)
    final = {
        "eval": {
            "student": {
                "synthetic": {
                    "rougeL": 21.25,
                    "top1": 0.625,
                    "exaccerr": 12.0,
                    "dist4": 0.875,
                    "unc_buckets": [{"bucket": 0, "std": 0.1, "kl": 0.2, "top1": 0.9}, {"bucket": 1, "std": 0.3, "kl": 0.4, "top1": 0.5}],
                }
            }
        }
    }
    logger.summary(final)
    logger.finish()

    (run_file,) = tmp_path.glob("wandb/offline-run-*/run-*.wandb")
    records = list(wandb_records(run_file))
    kinds = [r.WhichOneof("record_type") for r in records]

    (run,) = [r.run for r in records if r.HasField("run")]
    assert (run.display_name, run.run_group, run.job_type, run.project) == ("kd-tiny-s1", "sweep-a", "train", "kdlab")
    assert list(run.tags) == ["unit"]
    config = {u.key: json.loads(u.value_json) for u in run.config.update}
    assert config["lr"] == 1 and config["logger"]["name"] == "wandb"  # resolved config

    history = [{item_key(i): json.loads(i.value_json) for i in r.history.item} for r in records if r.HasField("history")]
    assert [(h["_step"], h["train/loss"]) for h in history] == [(1, 3.0), (2, 2.0), (3, 1.0)]
    assert history[-1]["valid/rougeL"] == 17.5  # same step: one row
    assert all("split" not in h for h in history)

    summary = {}
    for r in records:
        if r.HasField("summary"):
            summary.update({item_key(u): json.loads(u.value_json) for u in r.summary.update})
    for key, value in flatten(final).items():
        assert summary[key] == pytest.approx(value), key
    assert "eval/student/synthetic/unc_buckets/1/kl" in summary
    assert kinds[-1] == "exit"
    assert read_jsonl(tmp_path / "metrics.jsonl")[-1] == {"step": 3, "split": "valid", "valid/rougeL": 17.5}
