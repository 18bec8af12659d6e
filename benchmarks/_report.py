"""Shared by the benchmark scripts: print a table and keep docs/benchmarks.md up to date.

Each script owns one section of docs/benchmarks.md (between HTML comment markers) and replaces
only that section, so scripts can run in any order.
"""

from __future__ import annotations

import os
import platform
import re
from pathlib import Path

import torch

DOC = Path(__file__).resolve().parents[1] / "docs" / "benchmarks.md"
HEADER = "# Benchmarks\n\nMeasured numbers; each section names the command that produced it.\n"


def machine() -> str:
    """One line describing where the numbers were measured."""
    device = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "CPU only"
    return (f"{platform.machine()}, {os.cpu_count()} cores, {device}, torch {torch.__version__}, "
            f"Python {platform.python_version()}")


def table(headers: list[str], rows: list[list]) -> str:
    """A Markdown table."""
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def update_section(name: str, title: str, command: str, body: str) -> Path:
    """Replace (or append) section ``name`` of docs/benchmarks.md and print it."""
    section = (f"<!-- {name}:start -->\n## {title}\n\nCommand: `{command}`  \n"
               f"Machine: {machine()}\n\n{body}\n<!-- {name}:end -->")
    print(section)
    text = DOC.read_text() if DOC.exists() else HEADER
    pattern = re.compile(rf"<!-- {re.escape(name)}:start -->.*?<!-- {re.escape(name)}:end -->", re.S)
    text = pattern.sub(lambda _: section, text) if pattern.search(text) else text.rstrip() + "\n\n" + section + "\n"
    DOC.parent.mkdir(parents=True, exist_ok=True)
    DOC.write_text(text)
    return DOC
