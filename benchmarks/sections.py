"""Writing one benchmark's table between its markers in benchmarks/RESULTS.md."""

from __future__ import annotations

import pathlib
import re

RESULTS = pathlib.Path(__file__).with_name("RESULTS.md")


def write_section(begin: str, end: str, block: str, path: pathlib.Path = RESULTS) -> None:
    """Replaces the text between ``begin`` and ``end`` (markers included) with ``block``,
    or appends ``block`` if the markers are absent; the rest of the file is kept."""
    text = path.read_text() if path.exists() else "# Benchmark results\n"
    if begin in text:
        head, rest = text.split(begin, 1)
        text = head + block + rest.split(end, 1)[1]
    else:
        text = text.rstrip() + "\n\n" + block + "\n"
    path.write_text(text)


def sections(path: pathlib.Path = RESULTS) -> list[str]:
    """The marked sections (``<!-- name:begin -->`` … ``<!-- name:end -->``) in ``path``,
    in order: what another benchmark wrote, to keep when ``run.py`` rewrites the file."""
    text = path.read_text() if path.exists() else ""
    return [m.group(0) for m in re.finditer(
        r"<!-- ([\w-]+):begin -->.*?<!-- \1:end -->", text, flags=re.S)]


def publish(begin: str, end: str, body: list[str], path: pathlib.Path = RESULTS) -> None:
    """Prints the section (``begin``, the ``body`` lines, ``end``) and writes it to ``path``."""
    block = "\n".join([begin, *body, end])
    print(block)
    write_section(begin, end, block, path)
