"""The documentation runs: every ```python block of README.md and docs/*.md is executed (in a temporary folder, on the
built-in models), and the README's quick start runs top to bottom as a new user would type it, shortened with the
same flags the other tests use.

A block that cannot run here says why on the line before it: `<!-- not run: REASON -->` (a server, a download).
"""

from __future__ import annotations

import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
NOT_RUN = re.compile(r"<!--\s*not run:\s*(.+?)\s*-->")


def python_blocks(path: Path) -> list[tuple[int, str, str | None]]:
    """(line, code, reason it is not run or None) of each ```python block."""
    lines = path.read_text().splitlines()
    blocks, i = [], 0
    while i < len(lines):
        if lines[i].strip() == "```python":
            start = i + 1
            end = next(j for j in range(start, len(lines)) if lines[j].strip() == "```")
            marker = NOT_RUN.search(lines[i - 1]) if i else None
            blocks.append((start, "\n".join(lines[start:end]), marker.group(1) if marker else None))
            i = end
        i += 1
    return blocks


SNIPPETS = [pytest.param(path, line, code, reason, id=f"{path.name}:{line}")
            for path in DOCS for line, code, reason in python_blocks(path)]


def test_every_document_with_python_is_found():
    assert {p.values[0].name for p in SNIPPETS} >= {"README.md", "interop.md", "loading.md", "methods.md", "vision.md"}


@pytest.mark.parametrize(("path", "line", "code", "reason"), SNIPPETS)
def test_python_snippet_runs(path, line, code, reason, tmp_path, monkeypatch):
    if reason is not None:
        assert len(reason) > 10, f"{path.name}:{line}: say why the block is not run"
        pytest.skip(f"not run: {reason}")
    monkeypatch.chdir(tmp_path)
    exec(compile(code, f"{path.name}:{line}", "exec"), {"__name__": "__doc_snippet__"})


# ---------------------------------------------------------------- the README's quick start, in order


def quick_start_commands() -> list[str]:
    """The `mambapeft ...` lines of the README's bash blocks from "## Quick start" to the next section."""
    text = (ROOT / "README.md").read_text()
    section = text.split("## Quick start", 1)[1].split("\n## ", 1)[0]
    commands = []
    for block in re.findall(r"```bash\n(.*?)```", section, re.S):
        for line in block.splitlines():
            line = line.split("#", 1)[0].strip()
            if line.startswith("mambapeft "):
                commands.append(line)
    return commands


# flags that shorten each kind of command (the same ones the other tests use), and what needs the network
SHORT_TRAIN = ["--max-steps", "2", "--eval-steps", "2", "--logging-steps", "1", "--eval-batch-size", "64"]
SHORT_SEARCH = ["--trial-steps", "12", "--step1-trials", "1", "--step2-trials", "0", "--no-final"]
NEEDS_NETWORK = ("state-spaces/", "--data-root", "--data commonsense")


def shortened(command: str) -> list[str] | None:
    args = shlex.split(command)[1:]
    if any(sign in command for sign in NEEDS_NETWORK):
        return None
    if args[0] == "train":
        extra = list(SHORT_TRAIN)
        if "--task" in args and "vision" in args:
            extra = ["--max-steps", "2", "--eval-epochs", "0.1", "--logging-steps", "1"]
        if "sequence" in args or "tiny-s4d" in args:             # past SDT's one-epoch warm-up (7 steps)
            extra = ["--max-steps", "10", "--logging-steps", "1"]
        if "--config" in args:
            extra = ["--max-steps", "2"]
        return args + extra
    if args[0] == "search":
        return args + SHORT_SEARCH
    if args[0] == "eval":
        return args + ["--limit", "8"]
    return args


def test_the_readme_quick_start_runs_in_order(tmp_path):
    commands = quick_start_commands()
    assert commands[0] == "mambapeft train" and any(c.startswith("mambapeft eval") for c in commands)
    ran = []
    for command in commands:
        args = shortened(command)
        if args is None:
            continue                                     # a hub model or a data set to download: not offline
        done = subprocess.run([sys.executable, "-m", "mambapeft", *args], cwd=tmp_path, capture_output=True,
                              text=True, timeout=900, env={**__import__("os").environ, "OMP_NUM_THREADS": "1"})
        assert done.returncode == 0, f"{command} ({' '.join(args)}) failed:\n{done.stdout[-2000:]}\n{done.stderr}"
        assert "Traceback" not in done.stderr and "Warning" not in done.stderr, f"{command}:\n{done.stderr}"
        ran.append(command)
    assert len(ran) >= 5, ran
