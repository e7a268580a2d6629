"""`rs list`: the shipped configs, one line each (path and the first line of its header comment)."""

from __future__ import annotations

import argparse
from pathlib import Path

CONFIG_ROOT = Path(__file__).resolve().parents[2] / "configs"


def describe(path: Path) -> str:
    """First comment line of a YAML config (its one-line description), or ''."""
    for line in path.read_text().splitlines():
        text = line.strip()
        if text.startswith("#"):
            return text.lstrip("#").strip()
        if text:
            break
    return ""


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="rs list", description="List the configs shipped in configs/.")
    parser.add_argument("family", nargs="?", help="only this family (e.g. text, captioning, front)")
    args = parser.parse_args(argv)
    root = CONFIG_ROOT / args.family if args.family else CONFIG_ROOT
    if not root.is_dir():
        print(f"rs list: no config folder {root}")
        return 2
    for path in sorted(root.rglob("*.yaml")):
        print(f"{path.relative_to(CONFIG_ROOT.parent)!s:<55} {describe(path)}")
    return 0
