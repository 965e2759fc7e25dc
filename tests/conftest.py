"""Shared test settings: the tiny real dataset (300 ml-100k users with titles) and small, fast model sizes."""

import logging
import os
from contextlib import contextmanager

import pytest
import torch

TESTS_DIR = os.path.dirname(os.path.abspath(__file__))
TINY_DATASET = "ml-100k-tiny"


def tiny_config(tmp_path, **overrides):
    """A config dict for ``ml-100k-tiny``: one short epoch, small sizes, outputs under ``tmp_path``."""
    config = {
        "data_path": os.path.join(TESTS_DIR, "data"),
        "load_col": {"inter": ["user_id", "item_id", "timestamp"], "item": ["item_id", "movie_title", "release_year", "class"]},
        "MAX_ITEM_LIST_LENGTH": 10,
        "epochs": 1,
        "train_batch_size": 256,
        "eval_batch_size": 256,
        "hidden_size": 32,
        "inner_size": 64,
        "embedding_size": 32,
        "checkpoint_dir": str(tmp_path / "saved"),
        "show_progress": False,
        "state": "WARNING",
    }
    config.update(overrides)
    return config


@pytest.fixture(autouse=True)
def _isolated_outputs(tmp_path, monkeypatch):
    """RecBole writes log/ and log_tensorboard/ into the working directory: keep them out of the repository."""
    monkeypatch.chdir(tmp_path)
    yield
    logging.getLogger().handlers.clear()


@contextmanager
def module_workdir(tmp_path_factory, name):
    """A working directory for a test module's shared fixtures, run single-threaded.

    RecBole's trainers write log_tensorboard/ into the working directory; on tiny tensors torch's thread hand-offs
    cost more than they save, several times over on a busy machine.
    """
    path = tmp_path_factory.mktemp(name)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with pytest.MonkeyPatch.context() as patch:
            patch.chdir(path)
            yield path
    finally:
        torch.set_num_threads(threads)
