"""Helpers every layer uses: threads fitted to the free CPUs."""

import subprocess
import sys

import pytest

import dscompress.core.util as util


@pytest.mark.parametrize(
    "requested,busy,expected,note",
    [
        (None, 0.0, 4, None),  # a quiet machine: every CPU
        (None, 1.2, 3, "used 3 of 4 CPU threads: other processes kept the rest busy; --threads N to choose"),
        (None, 9.0, 1, "used 1 of 4 CPU threads"),  # never below one
        (2, 1.0, 2, None),  # asked for, and free
        (4, 2.0, 4, "--threads 4 but only 2 of 4 CPUs are free: the threads will wait on each other"),
    ],
)
def test_threads_fit_the_free_cpus(requested, busy, expected, note, monkeypatch):
    monkeypatch.setattr(util, "cpu_count", lambda: 4)
    monkeypatch.setattr(util, "other_load", lambda window=0.2: busy)
    threads, said = util.choose_threads(requested)
    assert threads == expected
    assert said == note if note is None else note in said


def test_other_load_sees_a_busy_process():
    """A real busy loop in another process shows up as about one CPU of other load."""
    spinner = subprocess.Popen([sys.executable, "-c", "import time\nend = time.time() + 5\nwhile time.time() < end: pass"])
    try:
        busy = util.other_load(1.0)
    finally:
        spinner.kill()
        spinner.wait()
    assert busy >= 0.5, busy  # the spinner's share, at least (more where other jobs run too)
