"""The README's shell and Python blocks run as written, in order, from an empty folder.

Only the sizes shrink, so that the whole README runs in about a minute: the substitutions are in
:data:`SMALLER`. A block preceded by ``<!-- readme-test: skip (why) -->`` is not run (the two
make commands, recipes that the pipeline tests run, data that is not shipped); the reason must be
given.
"""

from __future__ import annotations

import os
import re
import shlex

import pytest
from click.testing import CliRunner

from dscompress.cli.main import cli

README = os.path.join(os.path.dirname(__file__), "..", "README.md")
BLOCK = re.compile(r"(?:<!-- readme-test: skip \((?P<why>[^)]+)\) -->\n)?```(?P<lang>bash|python)\n(?P<body>.*?)```", re.S)
SMALLER = [
    (r"3,32,32", "3,16,16"),
    (r"3,64,64", "3,32,32"),
    (r"\(3, 32, 32\)", "(3, 16, 16)"),
    (r"--epochs \d+", "--epochs 1"),
    (r"epochs=\d+", "epochs=1"),
    (r"--iters \d+", "--iters 3"),
    (r"--batches \d+", "--batches 2"),
    (r"--calibrate-batches \d+", "--calibrate-batches 2"),
]


def blocks(lang: str) -> list[str]:
    text = open(README).read()
    found = []
    for match in BLOCK.finditer(text):
        if match["lang"] == lang and not match["why"]:
            body = match["body"]
            for pattern, small in SMALLER:
                body = re.sub(pattern, small, body)
            found.append(body)
    return found


def test_skipped_blocks_say_why():
    text = open(README).read()
    assert all(m["why"].strip() for m in BLOCK.finditer(text) if m["why"] is not None)
    assert len(blocks("bash")) >= 5 and len(blocks("python")) >= 2


@pytest.mark.slow
def test_shell_blocks_run_in_order(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    commands = [shlex.split(line, comments=True) for body in blocks("bash") for line in body.splitlines()]
    commands = [c for c in commands if c]
    assert all(c[0] == "dscompress" for c in commands), [c for c in commands if c[0] != "dscompress"]
    for command in commands:
        result = CliRunner().invoke(cli, command[1:])
        assert result.exit_code == 0, f"{shlex.join(command)}\n{result.output}"


@pytest.mark.slow
def test_python_blocks_run(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    for body in blocks("python"):
        exec(compile(body, README, "exec"), {"__name__": "readme"})
