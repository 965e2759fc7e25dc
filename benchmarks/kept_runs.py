"""Runs a benchmark keeps as they end: a stopped benchmark goes on where it stopped, in a later session too, and two
processes share its runs (each claims a run before it starts it, so no run is made twice)."""

import os
import pickle
import socket
import tempfile
from contextlib import contextmanager


@contextmanager
def claimed(path):
    """Whether this process makes the run kept at `path`: not when it is kept already or another live process
    claimed it. A claim names the machine's boot and the process, so one left by a machine that has since restarted
    (where its process id may now be another process's) is taken over, not waited for."""
    claim = path.with_suffix(".running")
    if path.exists() or (claim.exists() and claimant_alive(claim.read_text())):
        yield False
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    claim.write_text(f"{boot_id()} {os.getpid()}")
    try:
        yield True
    finally:
        claim.unlink(missing_ok=True)


def claimant_alive(claim_text):
    """Whether the process that wrote a claim still runs: on this boot of this machine, and alive."""
    *boot, pid = claim_text.split() or ["0"]
    return (not boot or boot[0] == boot_id()) and process_alive(int(pid))


def boot_id():
    """This boot of this machine (Linux); elsewhere its host name, which is the best that is known."""
    try:
        with open("/proc/sys/kernel/random/boot_id") as file:
            return file.read().strip()
    except OSError:
        return socket.gethostname()


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
