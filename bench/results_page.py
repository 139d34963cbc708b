"""bench/RESULTS.md's parts that a script of its own measures ("### " headings under "## Measured by other
commands"): each script replaces its own part, from its heading to the next, and leaves every other line as it
was. bench/run.py writes the tables above that heading."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from engine.outputs.publish import write_file

PAGE = Path(__file__).resolve().parent / "RESULTS.md"


def replace_part(heading: str, text: str, page: Path = PAGE) -> None:
    """Puts `text` (its first line the heading, e.g. "### The demos on this machine (2 CPU cores)") where the part
    whose heading starts with `heading` is, or at the page's end if there is none yet; written whole or not at all."""
    before, found, rest = page.read_text().partition(heading)
    after = rest.partition("\n### ")
    tail = f"\n### {after[2]}" if found and after[1] else ""
    body = before if found else before.rstrip("\n") + "\n\n"
    write_file(page, lambda tmp: tmp.write_text(body + text.rstrip("\n") + "\n" + tail))
