"""Shared test settings: the tiny real dataset (300 ml-100k users with titles) and small, fast model sizes."""

import logging
import os

import pytest

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
