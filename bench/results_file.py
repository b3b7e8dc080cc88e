"""Writing one titled section of a benchmark results file, replacing that section if it is there."""

from __future__ import annotations

from pathlib import Path


def write_section(path: Path, title: str, text: str) -> None:
    """Put ``text`` (which starts with ``title``) into ``path``, replacing the old section of that title."""
    path = Path(path)
    old = path.read_text() if path.exists() else "# Benchmark results\n"
    start = old.find(title)
    if start >= 0:
        end = old.find("\n## ", start + 1)
        old = old[:start] + (old[end + 1:] if end >= 0 else "")
    path.write_text(old.rstrip() + "\n\n" + text)
