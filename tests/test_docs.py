"""The docs: generated parts up to date, README figures read from their JSON, links and commands real.

These tests read files only (no torch import): they run in a second or two.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
RESULTS = ROOT / "benchmarks" / "results"

# a number standing on its own: not part of a name such as Qwen2, float32, ZeRO-3 or Gemma3
NUMBER = re.compile(r"(?<![\w.\-])\d(?:[\d,]*\d)?(?:\.\d+)?%?")
MARKER = re.compile(r"<!-- data: (.*?) -->")


def _section(text: str, name: str) -> str:
    return text.split(f"<!-- {name}:begin -->", 1)[1].split(f"<!-- {name}:end -->", 1)[0]


def _lookup(data, path: str):
    """A data path as gen_docs.py writes it: steps joined by ``::``; a step is a key, a list index, or
    ``key=value&key=value`` (the first record with those fields). Written again here on purpose: the
    test must not trust the generator's reading of its own paths."""
    for step in path.split("::"):
        if isinstance(data, list) and "=" in step:
            conds = [c.split("=", 1) for c in step.split("&")]
            data = next(r for r in data if all(str(r.get(k)) == v for k, v in conds))
        elif isinstance(data, list):
            data = data[int(step)]
        else:
            data = data[step]
    return data


def _figure_numbers(line: str) -> list[str]:
    """The numbers a reader sees in a figure line: code spans, link targets and the marker left out."""
    text = MARKER.sub("", line)
    text = re.sub(r"`[^`]*`", "", text)
    text = re.sub(r"\]\([^)]*\)", "]", text)
    return NUMBER.findall(text)


def test_generated_docs_are_up_to_date():
    """README.md's config reference and figures and benchmarks/README.md are what gen_docs.py writes now."""
    run = subprocess.run([sys.executable, str(ROOT / "scripts" / "gen_docs.py"), "--check"],
                         capture_output=True, text=True, timeout=60)
    assert run.returncode == 0, run.stdout + run.stderr


def test_every_readme_figure_is_read_from_the_json_it_cites():
    """Each figure line names its JSON file and one data path per number; every number shown is that value."""
    lines = [ln for ln in _section(README.read_text(), "figures").splitlines() if ln.strip()]
    assert len(lines) >= 3, "the README's figures section is empty"
    for line in lines:
        marker = MARKER.search(line)
        assert marker, f"figure without a <!-- data: FILE ; PATH|FORMAT ... --> marker: {line[:80]}"
        file, *paths = [p.strip() for p in marker.group(1).split(";")]
        data = json.loads((RESULTS / file).read_text())
        expected = []
        for p in paths:
            path, _, fmt = p.partition("|")
            expected.append(format(_lookup(data, path), fmt))
        assert _figure_numbers(line) == expected, f"{file}: numbers shown vs read from the JSON: {line[:80]}"
        assert "benchmarks/README.md#" in line, f"figure without a link into the benchmark report: {line[:80]}"


def _anchors(md: Path) -> set[str]:
    heads = [ln.lstrip("#").strip() for ln in md.read_text().splitlines() if ln.startswith("#")]
    return {re.sub(r"[^\w\- ]", "", h.lower()).replace(" ", "-") for h in heads}


def _markdown_files() -> list[Path]:
    return [README, ROOT / "benchmarks" / "README.md", *sorted((ROOT / "docs").glob("*.md"))]


# pages other engineers are writing now; a link to them is expected before they land
PENDING = {"docs/families.md", "docs/data.md"}


@pytest.mark.parametrize("md", _markdown_files(), ids=lambda p: str(p.relative_to(ROOT)))
def test_relative_links_point_at_existing_files(md):
    """Every relative link (and its #anchor, for a markdown target) in the README and docs/ resolves."""
    text = re.sub(r"```.*?```", "", md.read_text(), flags=re.S)
    broken = []
    for target in re.findall(r"\]\(([^)\s]+)\)", text):
        if re.match(r"[a-z]+:", target):
            continue
        path, _, anchor = target.partition("#")
        dest = (md.parent / path).resolve() if path else md
        rel = dest.relative_to(ROOT).as_posix() if dest.is_relative_to(ROOT) else str(dest)
        if not dest.exists():
            if rel not in PENDING:
                broken.append(target)
        elif anchor and dest.suffix == ".md" and anchor not in _anchors(dest):
            broken.append(target)
    assert not broken, f"{md.relative_to(ROOT)}: broken links {broken}"


def test_the_readme_two_commands_exist():
    """The README's two commands are scripts in this repository, and CI runs the test command."""
    block = README.read_text().split("## Two commands", 1)[1].split("```bash", 1)[1].split("```", 1)[0]
    commands = [ln.split("#")[0].strip() for ln in block.splitlines() if ln.strip()]
    assert commands == ["bash scripts/run_example.sh", "bash scripts/test.sh"], commands
    for command in commands:
        assert (ROOT / command.split()[1]).is_file(), command
    assert "bash scripts/test.sh" in (ROOT / ".ci" / "run").read_text()
