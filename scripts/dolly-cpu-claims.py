"""RESULTS.md's claims table: each of the seed papers' claims decided from the report.csv files that
scripts/dolly-cpu.sh writes (one per baseline, ``kdlab.report --baseline``), with the interval that decides it.

A quality claim "A beats B" reads the row A of the report against baseline B (or B against A when the claim is
that A is lower, as for ExAccErr) at the ``AVG`` column (the mean over Dolly, S-NI and UnNI) and, beside it, Dolly.
It **holds** where the difference's 95 % intervals (over test rows, bootstrap, and over seeds, t; a metric
without per-row scores has the seed interval only) all exclude 0 in the claimed direction, **does not hold**
where they all exclude it in the other direction, and is **undecided at this power** otherwise. OKD's time claim
(about 1/4 of GKD's and MiniLLM's training time) compares the mean training times: it holds at a ratio of at
most 1/3 and does not hold at 1/2 or more (between: undecided).
    python scripts/dolly-cpu-claims.py results/dolly-cpu > results/dolly-cpu/claims.md
"""
import argparse
import csv
import math
from pathlib import Path

# (claim, report folder under the root, row, direction: +1 when the row should be above its baseline)
QUALITY = [
    ("KD ≥ SFT (every seed paper)", ".", "kd (fkl)", +1),
    ("reverse KL beats forward KL (MiniLLM)", "vs-kd", "kd (rkl)", +1),
    ("on-policy beats off-policy KD: ImitKD (Lin et al.)", "vs-kd", "imitkd (fkl)", +1),
    ("on-policy beats off-policy KD: GKD (Agarwal et al.)", "vs-kd", "gkd (jsd)", +1),
    ("on-policy beats off-policy KD: MiniLLM (Gu et al.)", "vs-kd", "minillm", +1),
    ("DPKD beats KD (Li et al.)", "vs-kd", "dpkd", +1),
    ("OKD beats GKD (Rao et al.)", "vs-gkd", "okd (fkl)", +1),
    ("OKD beats MiniLLM (Rao et al.)", "vs-minillm", "okd (fkl)", +1),
    ("MiniLLM's exposure bias (ExAccErr) is lower than KD's", "exaccerr", "kd (fkl)", +1),
    ("MiniLLM's exposure bias (ExAccErr) is lower than SFT's", "exaccerr", "sft", +1),
    ("MiniLLM's exposure bias (ExAccErr) is lower than SeqKD's", "exaccerr", "seqkd", +1),
]
TIME = [("OKD takes about 1/4 of GKD's training time (Rao et al.)", "okd (fkl)", "gkd (jsd)"),
        ("OKD takes about 1/4 of MiniLLM's training time (Rao et al.)", "okd (fkl)", "minillm")]


def number(text: str) -> float:
    return float(text) if text not in ("", None) else math.nan


def read(path: Path) -> dict[tuple[str, str], dict]:
    with open(path, newline="") as f:
        return {(row["method"], row["eval_dataset"]): row for row in csv.DictReader(f)}


def verdict(intervals: list[tuple[float, float]], direction: int) -> str:
    known = [(low, high) for low, high in intervals if not math.isnan(low)]
    if not known:
        return "undecided at this power (no interval)"
    if all(direction * low > 0 and direction * high > 0 for low, high in known):
        return "**holds**"
    if all(direction * low < 0 and direction * high < 0 for low, high in known):
        return "**does not hold**"
    return "undecided at this power"


def difference(row: dict | None) -> tuple[str, list[tuple[float, float]]]:
    if row is None or row["diff"] == "":
        return "—", []
    rows = (number(row["diff_low"]), number(row["diff_high"]))
    seeds = (number(row["diff_seed_low"]), number(row["diff_seed_high"]))
    text = f"{number(row['diff']):+.2f}"
    text += f" rows [{rows[0]:+.2f}, {rows[1]:+.2f}]" if not math.isnan(rows[0]) else ""
    text += f" seeds [{seeds[0]:+.2f}, {seeds[1]:+.2f}]" if not math.isnan(seeds[0]) else ""
    return text + f" ({row['diff_seeds']} seeds)", [rows, seeds]


def measured(table: dict[tuple[str, str], dict]) -> list[str]:
    """What the compared numbers are, from the report's CSV: the decoding and the test rows the students scored
    (``kept/rows`` per set; where runs differ, each value with its number of runs)."""
    decodings = sorted({row.get("decoding") for row in table.values() if row.get("decoding")})
    rows: dict[str, set] = {}
    for (method, dataset), row in table.items():
        if method != "teacher" and row.get("test_rows"):
            rows.setdefault(dataset, set()).add(row["test_rows"])
    if not decodings and not rows:
        return []
    scored = "; ".join(f"{dataset} {' or '.join(sorted(values))}" for dataset, values in rows.items())
    return [f"Measured: generations {' or '.join(decodings) or 'not recorded'}; test rows scored by the students "
            f"(kept/rows): {scored or 'not recorded'}.", ""]


def claims(root: Path) -> list[str]:
    base = root / "report.csv"
    out = measured(read(base)) if base.exists() else []
    out += ["| claim | compared (row − baseline) | AVG (Dolly, S-NI, UnNI) | Dolly | verdict (AVG) |",
            "|---|---|---|---|---|"]
    for claim, folder, row_label, direction in QUALITY:
        path = root / folder / "report.csv"
        table = read(path) if path.exists() else {}
        avg_text, avg_intervals = difference(table.get((row_label, "AVG")))
        dolly_text, _ = difference(table.get((row_label, "dolly")))
        base = next((r["baseline"] for r in table.values() if r["method"] == row_label and r["baseline"]), "?")
        metric = next((r["metric"] for r in table.values()), "?")
        out.append(f"| {claim} | `{row_label}` − `{base}` ({metric}) | {avg_text} | {dolly_text} | "
                   f"{verdict(avg_intervals, direction) if avg_intervals else 'not measured'} |")
    times = {key[0]: number(row["train_time_s"]) for key, row in read(root / "report.csv").items()} \
        if (root / "report.csv").exists() else {}
    out += ["", "| claim | training time (mean s) | ratio | verdict |", "|---|---|---|---|"]
    for claim, okd, other in TIME:
        a, b = times.get(okd, math.nan), times.get(other, math.nan)
        ratio = a / b if b else math.nan
        decided = ("not measured" if math.isnan(ratio) else "**holds**" if ratio <= 1 / 3 else
                   "**does not hold**" if ratio >= 1 / 2 else "undecided (between 1/3 and 1/2)")
        out.append(f"| {claim} | {okd}: {a:.0f}; {other}: {b:.0f} | {ratio:.2f} | {decided} |")
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("root", type=Path, help="results/dolly-cpu (scripts/dolly-cpu.sh's reports)")
    print("\n".join(claims(parser.parse_args().root)))


if __name__ == "__main__":
    main()
