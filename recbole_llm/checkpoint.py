"""Checkpoints that are data, not code: every checkpoint the plugin writes loads with torch's safe loader
(``torch.load(weights_only=True)``); a file that only the full unpickler reads loads only with the user's consent,
``trust_checkpoint``, since unpickling it could run any code it names.

RecBole's trainer pickles its whole Config (RecBole's enums, the model class, a YAML loader class). Here a checkpoint
holds the Config's settings, with those enums by name and without the two classes, and the Config is rebuilt from them
when the checkpoint is read; the rest of a checkpoint (weights, optimizer and random states, metrics) is plain data
already where it is made (recbole_llm.trainer, recbole_llm.resume).
"""

import os
import pickle
import tempfile
from enum import Enum

import torch
from recbole.config import Config
from recbole.utils import EvaluatorType, InputType, ModelType

from recbole_llm.errors import RecBoleLLMError

# The settings RecBole's Config holds as enums: stored by name.
ENUM_SETTINGS = {"MODEL_TYPE": ModelType, "MODEL_INPUT_TYPE": InputType, "eval_type": EvaluatorType}
# What built a Config rather than what it says: left out (the model's class is found by config["model"] where needed).
CONFIG_BUILDERS = ("model_class", "yaml_loader")


def load_checkpoint(path, map_location="cpu", trust_checkpoint=False):
    """The checkpoint at ``path``, its Config rebuilt; a file the safe loader refuses only with trust_checkpoint."""
    checkpoint = unpickled(path, map_location, trust_checkpoint)
    if isinstance(checkpoint, dict) and isinstance(checkpoint.get("config"), dict):
        checkpoint["config"] = config_from_data(checkpoint["config"])
    return checkpoint


def unpickled(path, map_location, trust_checkpoint):
    if not os.path.isfile(path):
        raise RecBoleLLMError(f"checkpoint '{path}' does not exist: check the path or train the model first")
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError:
        if not trust_checkpoint:
            raise RecBoleLLMError(
                f"checkpoint '{path}' is not plain data: reading it with the full unpickler could run any code it "
                "holds (RecBole's own trainer, and recbole_llm before its checkpoints were data, write such files); if "
                "you trust where it comes from, pass --trust_checkpoint=True (trust_checkpoint=True from Python)"
            ) from None
    except (EOFError, RuntimeError) as error:
        raise unreadable(path, error) from None
    try:
        return torch.load(path, map_location=map_location, weights_only=False)
    except (pickle.UnpicklingError, EOFError, RuntimeError) as error:
        raise unreadable(path, error) from None


def unreadable(path, error):
    return RecBoleLLMError(f"checkpoint '{path}' is not a readable torch file ({error}); it may be truncated")


def save_checkpoint_atomically(state, path):
    """Write ``state``, its Config as data, to a temporary file in the same folder, then rename: a crash never leaves a
    half-written checkpoint, and a state that the safe loader would refuse is never written."""
    if isinstance(state.get("config"), Config):
        state = {**state, "config": config_as_data(state["config"])}
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    handle, tmp_path = tempfile.mkstemp(dir=folder, prefix=".tmp-", suffix=".pth")
    os.close(handle)
    try:
        torch.save(state, tmp_path)
        code = torch.serialization.get_unsafe_globals_in_checkpoint(tmp_path)
        if code:
            raise RecBoleLLMError(
                f"checkpoint {path} would not be plain data: it holds {', '.join(code)}, which torch's safe loader "
                "refuses (settings are numbers, strings, lists or dicts)"
            )
        os.replace(tmp_path, path)
    finally:
        if os.path.exists(tmp_path):
            os.remove(tmp_path)


def config_as_data(config):
    """A Config's attributes as plain data: its settings with RecBole's enums by name, without its builders."""
    return {
        name: settings_as_data(attribute) if isinstance(attribute, dict) else attribute
        for name, attribute in vars(config).items()
        if name not in CONFIG_BUILDERS
    }


def config_from_data(data):
    """The Config config_as_data stored, as a RecBole Config: once built, the plugin's subclass differs from it only
    in how it was built."""
    config = Config.__new__(Config)
    for name, attribute in data.items():
        setattr(config, name, settings_from_data(attribute) if isinstance(attribute, dict) else attribute)
    config.yaml_loader = config._build_yaml_loader()  # RecBole's dataset reads its download list with it
    return config


def settings_as_data(settings):
    return {key: value.name if isinstance(value, Enum) and key in ENUM_SETTINGS else value
            for key, value in settings.items()}


def settings_from_data(settings):
    return {key: ENUM_SETTINGS[key][value] if isinstance(value, str) and key in ENUM_SETTINGS else value
            for key, value in settings.items()}
