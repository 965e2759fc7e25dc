"""Resuming an interrupted run: where its last checkpoint lives, the random state it holds, and the checks that a
checkpoint given to ``--resume`` belongs to this run's model and dataset.

Beside the best checkpoint ``<name>.pth`` (written when validation improves) the trainer keeps ``<name>-last.pth``,
overwritten after every epoch with everything the next epoch depends on: weights, optimizer and scheduler state,
stage, epoch, early-stopping counter, best score and result, and the random state (Python, NumPy, torch, CUDA and the
training dataloader's shuffle generator). Resuming from it replays the rest of the run as if it had never stopped.
Like every checkpoint it is plain data (recbole_llm.checkpoint): the random states are tensors, tuples and lists.
"""

import os
import random

import numpy as np
import torch

from recbole_llm.checkpoint import load_checkpoint
from recbole_llm.errors import RecBoleLLMError

RESUME_KEYS = ("resume", "resume_checkpoint")  # the plugin's key, and the name of RecBole's Trainer method


def last_checkpoint_path(best_checkpoint_path):
    """``saved/Laser-<time>.pth`` -> ``saved/Laser-<time>-last.pth``."""
    root, extension = os.path.splitext(best_checkpoint_path)
    return f"{root}-last{extension}"


def resume_file(config):
    """The checkpoint that ``--resume`` (or ``resume_checkpoint``) names, or None."""
    return next((config[key] for key in RESUME_KEYS if config[key]), None)


def random_state(train_data):
    """Every random state the next epoch draws from; train_data's generator decides its shuffle order."""
    return {
        "python": random.getstate(),
        "numpy": numpy_random_state(),
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
        "train_data": train_data.generator.get_state() if train_data is not None else None,
    }


def numpy_random_state():
    """NumPy's random state with its key array as a list: torch's safe loader reads it, np.random.set_state takes it."""
    name, keys, *position = np.random.get_state()
    return (name, keys.tolist(), *position)


def restore_random_state(state, train_data):
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if state["cuda"] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    if state["train_data"] is not None:
        train_data.generator.set_state(state["train_data"])


def read_resume_checkpoint(path, config):
    """The checkpoint at ``path``, refused in one line unless this plugin's trainer wrote it for this model and
    dataset and the best checkpoint it continues is still there."""
    checkpoint = load_checkpoint(str(path), trust_checkpoint=config["trust_checkpoint"])
    if not isinstance(checkpoint, dict) or "random_state" not in checkpoint or "optimizer" not in checkpoint:
        raise RecBoleLLMError(
            f"--resume={path} is not a checkpoint that recbole_llm's trainer wrote: pass the <name>-last.pth file "
            "beside the best checkpoint of the interrupted run"
        )
    saved_config = checkpoint["config"]
    for key in ("model", "dataset"):
        if saved_config[key] != config[key]:
            raise RecBoleLLMError(
                f"--resume={path} is a checkpoint of {key} {saved_config[key]}, but this run's {key} is {config[key]}: "
                f"pass --{key}={saved_config[key]} or the checkpoint of a {config[key]} run"
            )
    best = checkpoint["best_model_file"]
    if checkpoint["best_valid_result"] is not None and not os.path.isfile(best):
        raise RecBoleLLMError(
            f"--resume={path} continues a run whose best checkpoint {best} is missing: put it back, or start afresh"
        )
    return checkpoint
