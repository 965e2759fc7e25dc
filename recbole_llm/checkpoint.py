"""Loading RecBole checkpoints under torch >= 2.6, whose ``torch.load`` defaults to ``weights_only=True``.

A RecBole checkpoint pickles its whole Config (enums, the model class, a YAML loader class), which the weights-only
unpickler refuses. It is loaded with the full unpickler only after the weights-only one failed on exactly that, and
only from files the user named or RecBole's own trainer wrote: checkpoints are code, like any pickle.
"""

import os
import pickle
import tempfile
from logging import getLogger

import torch

from recbole_llm.errors import RecBoleLLMError


def load_checkpoint(path, map_location="cpu"):
    if not os.path.isfile(path):
        raise RecBoleLLMError(f"checkpoint '{path}' does not exist: check the path or train the model first")
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError:
        getLogger().debug(f"{path} holds a pickled RecBole Config; loading it with the full unpickler")
    try:
        return torch.load(path, map_location=map_location, weights_only=False)
    except (pickle.UnpicklingError, EOFError, RuntimeError) as error:
        raise RecBoleLLMError(f"checkpoint '{path}' is not a readable torch file ({error}); it may be truncated") from None


def save_checkpoint_atomically(state, path):
    """Write to a temporary file in the same folder, then rename: a crash never leaves a half-written checkpoint."""
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    handle, tmp_path = tempfile.mkstemp(dir=folder, prefix=".tmp-", suffix=".pth")
    os.close(handle)
    try:
        torch.save(state, tmp_path, pickle_protocol=4)
        os.replace(tmp_path, path)
    finally:
        if os.path.exists(tmp_path):
            os.remove(tmp_path)
