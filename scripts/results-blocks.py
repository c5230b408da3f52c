"""Refresh RESULTS.md's copied blocks from the files they copy, so that its tables are the committed reports'
own text, never retyped. A block is

    <!-- from results/dolly-cpu/claims.md -->            the whole file
    <!-- from results/dolly-cpu/report.md table 2 -->    its second markdown table (1-based)
    ...
    <!-- end -->

    python scripts/results-blocks.py            rewrite RESULTS.md's blocks
    python scripts/results-blocks.py --check    exit 1, naming each stale block, where a block differs
"""
import argparse
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BLOCK = re.compile(r"(<!-- from (\S+)(?: table (\d+))? -->\n)(.*?)(<!-- end -->)", re.S)


def tables(text: str) -> list[str]:
    """The markdown tables of ``text``: runs of consecutive lines that start with ``|``."""
    found, current = [], []
    for line in text.splitlines(keepends=True):
        if line.startswith("|"):
            current.append(line)
        elif current:
            found.append("".join(current))
            current = []
    return found + (["".join(current)] if current else [])


def source(base: Path, path: str, table: str | None) -> str:
    file = base / path
    if not file.exists():
        raise SystemExit(f"RESULTS.md copies {path}, which does not exist; run the command that writes it")
    text = file.read_text()
    if table is None:
        return text if text.endswith("\n") else text + "\n"
    found = tables(text)
    if not 1 <= int(table) <= len(found):
        raise SystemExit(f"RESULTS.md copies table {table} of {path}, which has {len(found)} tables")
    return found[int(table) - 1]


def refresh(text: str, base: Path) -> tuple[str, list[str]]:
    """``text`` with every block replaced by its source (paths relative to ``base``), and the sources of the
    blocks that changed."""
    stale = []

    def replace(match: re.Match) -> str:
        new = source(base, match.group(2), match.group(3))
        if new != match.group(4):
            stale.append(match.group(2) + (f" table {match.group(3)}" if match.group(3) else ""))
        return match.group(1) + new + match.group(5)

    return BLOCK.sub(replace, text), stale


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--check", action="store_true", help="only say which blocks are stale")
    parser.add_argument("--file", type=Path, default=ROOT / "RESULTS.md")
    args = parser.parse_args()
    text, stale = refresh(args.file.read_text(), args.file.resolve().parent)
    if args.check:
        if stale:
            sys.exit(f"{args.file.name}: stale blocks (run scripts/results-blocks.py): {', '.join(stale)}")
        return
    args.file.write_text(text)
    print(f"{args.file.name}: {len(stale)} block(s) refreshed" + (f": {', '.join(stale)}" if stale else ""))


if __name__ == "__main__":
    main()
