"""Helpers every layer uses: threads fitted to the free CPUs, caches shared by processes."""

import json
import multiprocessing
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


def _add(path, key, barrier):
    cache = util.JsonCache(path)
    cache[key] = [1.0, 2.0]
    barrier.wait()  # both have read the file before either writes
    cache.save()


def test_two_processes_filling_one_cache_keep_both_entries(tmp_path):
    """Written last-writer-wins, the second save dropped the first's entry."""
    path = str(tmp_path / "cache" / "latency.json")
    util.write_json(path, {"old": 0})
    context = multiprocessing.get_context("spawn")
    barrier = context.Barrier(2)
    workers = [context.Process(target=_add, args=(path, key, barrier)) for key in ("a", "b")]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join(120)
    assert [worker.exitcode for worker in workers] == [0, 0]
    with open(path) as f:
        assert json.load(f) == {"old": 0, "a": [1.0, 2.0], "b": [1.0, 2.0]}


def test_a_damaged_cache_is_empty_and_written_again(tmp_path):
    path = tmp_path / "latency.json"
    path.write_text("{not json")
    cache = util.JsonCache(str(path))
    assert "a" not in cache
    cache["a"] = 1
    cache.save()
    assert json.loads(path.read_text()) == {"a": 1} and util.JsonCache(str(path))["a"] == 1
