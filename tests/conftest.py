"""Shared test settings and fixtures: the tiny real dataset (300 ml-100k users with titles), small and fast model
sizes, a working directory per test module, one tiny CF model for the session, models built as a run builds them,
and checkpoints that only the full unpickler reads (RecBole's own, and one that runs code)."""

import logging
import os
import pathlib
from contextlib import contextmanager
from dataclasses import dataclass

import pytest
import recbole.trainer
import torch
from recbole.config import Config as RecBoleConfig
from recbole.data import create_dataset
from recbole.model.sequential_recommender.sasrec import SASRec
from recbole.utils import init_seed

from recbole_llm.cf_training import trained_checkpoint
from recbole_llm.cold_items import data_preparation  # RecBole's, without the cold items' training rows (cold_item_ratio)
from recbole_llm.config import Config
from recbole_llm.quick_start import build_model

TESTS_DIR = os.path.dirname(os.path.abspath(__file__))
TINY_DATASET = "ml-100k-tiny"

# A CF model small enough to train in seconds: one block of width 32.
TINY_CF = {"epochs": 1, "hidden_size": 32, "inner_size": 64, "n_layers": 1, "train_batch_size": 2048}
LASER_SIZES = {
    "llm_path": "tiny-llama",
    "max_prompt_items": 3,
    "max_item_tokens": 12,
    "n_experts": 3,
    "n_query": 4,
    "mformer_hidden": 32,
    "mformer_heads": 4,
    "n_mformer_layers": 2,
    "train_batch_size": 8,
    "train_batches_per_epoch": 2,
    "eval_batch_size": 300,
    "item_batch_size": 431,
    "stage1_epochs": 1,
    "stage2_epochs": 1,
    "cf_model": "SASRec",
    "cf_config": TINY_CF,
}
RSLLM_SIZES = {
    "llm_path": "tiny-llama",
    "lora_r": 4,
    "lora_dropout": 0.0,
    "max_prompt_items": 3,
    "max_item_tokens": 8,
    "train_batch_size": 8,
    "train_batches_per_epoch": 2,
    "eval_batch_size": 64,
    "item_batch_size": 256,
    "stage1_epochs": 1,
    "stage2_epochs": 1,
    "n_candidates": 5,
    "n_candidate_users": 16,
    "cf_config": TINY_CF,
}
SIZES = {"Laser": LASER_SIZES, "RSLLM": RSLLM_SIZES}


def tiny_config(tmp_path, **overrides):
    """A config dict for ``ml-100k-tiny``: one short epoch, small sizes, outputs under ``tmp_path``."""
    config = {
        "data_path": os.path.join(TESTS_DIR, "data"),
        "load_col": {"inter": ["user_id", "item_id", "timestamp"], "item": ["item_id", "movie_title", "release_year", "class"]},
        "item_text_fields": ["movie_title", "release_year"],  # ml-100k's item text (properties/dataset/ml-100k.yaml)
        "item_text_template": "{movie_title} ({release_year})",
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


@dataclass
class TinyRun:
    """An LLM model's tiny settings and data loaders; `build` makes the model as a run does (settings checked, its
    CF model trained into the checkpoint folder when none is given)."""

    config_dict: dict
    config: Config
    train_data: object
    valid_data: object
    test_data: object

    def build(self, **overrides):
        config = self.config
        if overrides:
            config = Config(model=config["model"], dataset=TINY_DATASET, config_dict={**self.config_dict, **overrides})
        return build_model(config, self.train_data._dataset)


def tiny_run(model, checkpoint_root, **settings):
    """A TinyRun of `model` with its tiny sizes and `settings` on top, writing under checkpoint_root."""
    config_dict = tiny_config(checkpoint_root, **{**SIZES[model], **settings})
    config = Config(model=model, dataset=TINY_DATASET, config_dict=config_dict)
    init_seed(config["seed"], config["reproducibility"])
    return TinyRun(config_dict, config, *data_preparation(config, create_dataset(config)))


def recbole_trainer_checkpoint(checkpoint_root, dataset, **settings):
    """A SASRec checkpoint written by RecBole's own Trainer (its Config pickled, pickle protocol 4) on `dataset`:
    its path and the model. RecBole's Config reads the command line: call it with sys.argv set to ["pytest"]."""
    config_dict = {**tiny_config(checkpoint_root, **settings), "train_neg_sample_args": None}
    stock_config = RecBoleConfig(model="SASRec", dataset=TINY_DATASET, config_dict=config_dict)
    model = SASRec(stock_config, dataset)
    trainer = recbole.trainer.Trainer(stock_config, model)
    trainer._save_checkpoint(0)  # RecBole's own writer (what fit calls after a best epoch), without an epoch
    return trainer.saved_model_file, model


class CreatesAFile:
    """Read by the full unpickler, it creates the file `path`: the code that a shared checkpoint could run."""

    def __init__(self, path):
        self.path = pathlib.Path(path)

    def __reduce__(self):
        return pathlib.Path.touch, (self.path,)


def checkpoint_that_runs_code(path, target):
    """A checkpoint at `path`, shaped as RecBole's, whose reading by the full unpickler creates the file `target`."""
    torch.save({"config": CreatesAFile(target), "state_dict": {}, "random_state": {}, "optimizer": {}}, path)
    return str(path)


@pytest.fixture(autouse=True)
def _isolated_outputs(tmp_path, monkeypatch):
    """RecBole writes log/ and log_tensorboard/ into the working directory: keep them out of the repository."""
    monkeypatch.chdir(tmp_path)
    yield
    logging.getLogger().handlers.clear()


@contextmanager
def module_workdir(tmp_path_factory, name):
    """A working directory for shared fixtures, run single-threaded.

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


@pytest.fixture(scope="module")
def workdir(tmp_path_factory, request):
    """The test module's working directory for its shared fixtures (see module_workdir)."""
    with module_workdir(tmp_path_factory, request.module.__name__.removeprefix("test_")) as path:
        yield path


@pytest.fixture(scope="module")
def tiny(workdir, cf_checkpoint, request):
    """The TinyRun of the test module's MODEL, on the session's tiny SASRec."""
    return tiny_run(request.module.MODEL, workdir, cf_checkpoint=cf_checkpoint)


@pytest.fixture(scope="module")
def batch(tiny):
    """A training batch of the module's TinyRun."""
    return next(iter(tiny.train_data))


@pytest.fixture(scope="session")
def cf_checkpoint(tmp_path_factory):
    """One tiny SASRec of ml-100k-tiny (hidden size 32), written by the plugin's trainer, for the session."""
    with module_workdir(tmp_path_factory, "cf") as path:
        run = tiny_run("Laser", path)
        return trained_checkpoint(run.config, run.train_data._dataset)


def assert_users_in_chunks_score_as_one_pass(model, users):
    """RecBole's evaluator scores eval_batch_size users at a time: full-ranking scores of users in chunks of 7 equal
    those of one pass, though each chunk pads its prompts to its own longest."""
    model.eval()
    with torch.no_grad():
        model.begin_evaluation()
        one_pass = model.full_sort_predict(users)
        in_chunks = torch.cat([model.full_sort_predict(users[start:start + 7]) for start in range(0, len(users), 7)])
    assert one_pass.shape == (len(users), model.n_items)
    assert torch.allclose(one_pass, in_chunks, atol=1e-4)
