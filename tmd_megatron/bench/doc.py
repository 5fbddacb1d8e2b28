"""The generated sections of docs/benchmarks.md: each benchmark rewrites only the text between its two markers,
so the prose around the tables is edited by hand and survives reruns."""
from __future__ import annotations

import re
import sys
from pathlib import Path

DOC = Path(__file__).resolve().parents[2] / "docs" / "benchmarks.md"


def markers(name: str) -> tuple[str, str]:
    return f"<!-- {name}:begin -->", f"<!-- {name}:end -->"


def write_section(name: str, text: str, doc: Path = DOC) -> None:
    begin, end = markers(name)
    old = doc.read_text()
    if begin not in old or end not in old:
        raise ValueError(f"{doc} lacks the markers {begin} / {end} around its generated {name} section; "
                         "add them where the table should go")
    pattern = re.compile(re.escape(begin) + ".*?" + re.escape(end), re.S)
    new, count = pattern.subn(lambda _: f"{begin}\n{text}\n{end}", old)
    if count != 1:
        raise ValueError(f"{doc} must hold exactly one {begin} ... {end} section (found {count}); fix the markers")
    doc.write_text(new)


def command_line(module: str, argv: list[str] | None) -> str:
    """The command that produced a table, as a reader would retype it."""
    return f"python -m {module}" + "".join(f" {a}" for a in (argv if argv is not None else sys.argv[1:]))


def publish(name: str, text: str, write: bool) -> None:
    print(text)
    if write:
        write_section(name, text)
        print(f"\nwritten to {DOC}")
