"""Model and trainer lookup: the plugin first, then RecBole (as RecBole-GNN does); every LLM-based model trains with
the LLMTrainer."""

import importlib
import os
from functools import cache

import torch

from recbole.trainer import Trainer as RecBoleTrainer
from recbole.utils import get_trainer as recbole_get_trainer

from recbole_llm.distributed import DistributedTrainerMixin
from recbole_llm.errors import RecBoleLLMError
from recbole_llm.model.abstract_recommender import LLMSequentialRecommender
from recbole_llm.per_user import PerUserMetricsMixin
from recbole_llm.trainer import CandidateEvaluationMixin, LLMTrainer, SafeCheckpointMixin, Trainer

_PLUGIN_MODEL_KINDS = ["sequential_recommender"]
_RECBOLE_MODEL_KINDS = [
    "general_recommender", "context_aware_recommender", "sequential_recommender",
    "knowledge_aware_recommender", "exlib_recommender",
]


def properties_dir():
    """The plugin's YAML folder: shipped inside the package when installed, at the repository top in a checkout."""
    here = os.path.dirname(os.path.abspath(__file__))
    for path in (os.path.join(here, "properties"), os.path.join(os.path.dirname(here), "properties")):
        if os.path.isfile(os.path.join(path, "overall.yaml")):
            return path
    raise RecBoleLLMError(f"recbole_llm's properties/ folder is missing next to {here}: reinstall with `pip install .`")


def _find_model_module(package, kinds, model_name):
    for kind in kinds:
        try:
            if importlib.util.find_spec(f"{package}.model.{kind}.{model_name.lower()}") is not None:
                return importlib.import_module(f"{package}.model.{kind}.{model_name.lower()}")
        except ImportError:  # e.g. RecBole's exlib_recommender needs xgboost/lightgbm, which are optional
            continue
    return None


def _model_names(package, kinds):
    names = []
    for kind in kinds:
        try:
            spec = importlib.util.find_spec(f"{package}.model.{kind}")
        except ImportError:
            continue
        for folder in spec.submodule_search_locations if spec else []:
            names += [f[:-3] for f in os.listdir(folder) if f.endswith(".py") and not f.startswith("_")]
    return names


def known_models():
    """Every model name the CLI accepts, as file names (lower case)."""
    return sorted(set(_model_names("recbole_llm", _PLUGIN_MODEL_KINDS) + _model_names("recbole", _RECBOLE_MODEL_KINDS)))


def get_model(model_name):
    """The model class called ``model_name``, looked up in recbole_llm first, then in RecBole."""
    module = _find_model_module("recbole_llm", _PLUGIN_MODEL_KINDS, model_name)
    module = module or _find_model_module("recbole", _RECBOLE_MODEL_KINDS, model_name)
    # Importing RecBole's sequential models runs sine.py, which turns autograd anomaly detection on for the whole
    # process: every backward pass then costs about 3x.
    torch.autograd.set_detect_anomaly(False)
    if module is None or not hasattr(module, model_name):
        raise RecBoleLLMError(
            f"unknown model '{model_name}'; known models (case as in RecBole, e.g. SASRec): {', '.join(known_models())}"
        )
    return getattr(module, model_name)


def get_trainer(model_type, model_name):
    """The LLMTrainer for an LLMSequentialRecommender, else RecBole's trainer made to load checkpoints safely and to
    run in several processes."""
    if issubclass(get_model(model_name), LLMSequentialRecommender):
        return LLMTrainer
    return _with_safe_loading(recbole_get_trainer(model_type, model_name))


@cache
def _with_safe_loading(trainer_class):
    if trainer_class is RecBoleTrainer:
        return Trainer
    if issubclass(trainer_class, SafeCheckpointMixin):
        return trainer_class
    return type(
        trainer_class.__name__,
        (CandidateEvaluationMixin, DistributedTrainerMixin, PerUserMetricsMixin, SafeCheckpointMixin, trainer_class),
        {},
    )
