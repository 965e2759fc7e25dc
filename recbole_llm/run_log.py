"""One log file per run, also for the runs of one process (a comparison's models, a benchmark's settings).

RecBole's init_logger installs its handlers with logging.basicConfig, which does nothing where the root logger has
handlers already: every later run of the process wrote into the first run's log file, and the others stayed empty."""

import logging

from recbole.utils import init_logger

_installed = []  # the handlers the last init_run_logger installed


def init_run_logger(config):
    """RecBole's logger for the run of `config`: the console and log/<model>/<model>-<dataset>-<time>-<hash>.log, the
    previous run's handlers closed first. Handlers that others installed (pytest's capture) stay, and where there are
    some, RecBole installs none, as before."""
    root = logging.getLogger()
    for handler in _installed:
        root.removeHandler(handler)
        handler.close()
    before = set(root.handlers)
    init_logger(config)
    _installed[:] = [handler for handler in root.handlers if handler not in before]
