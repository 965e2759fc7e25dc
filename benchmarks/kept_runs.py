"""Runs a benchmark keeps as they end: a stopped benchmark goes on where it stopped, in a later session too, and two
processes share its runs (each claims a run before it starts it, so no run is made twice)."""

import os
import pickle
import tempfile
from contextlib import contextmanager


@contextmanager
def claimed(path):
    """Whether this process makes the run kept at `path`: not when it is kept already or another live process
    claimed it."""
    claim = path.with_suffix(".running")
    if path.exists() or (claim.exists() and process_alive(int(claim.read_text() or 0))):
        yield False
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    claim.write_text(str(os.getpid()))
    try:
        yield True
    finally:
        claim.unlink(missing_ok=True)


def process_alive(pid):
    try:
        os.kill(pid, 0)
    except (OSError, ValueError):
        return False
    return pid > 0


def keep(result, path):
    """A run's result dict, pickled to `path` through a temporary file: a stopped process leaves no half-written run."""
    handle, tmp_path = tempfile.mkstemp(dir=path.parent, prefix=".tmp-")
    with os.fdopen(handle, "wb") as file:
        pickle.dump(result, file)
    os.replace(tmp_path, path)


def kept(path):
    with open(path, "rb") as file:
        return pickle.load(file)
