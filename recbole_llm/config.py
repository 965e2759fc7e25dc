"""RecBole's Config with the plugin's model lookup, the plugin's YAML defaults, the CPU budget of the default LLM and
today's-stack fixes."""

import os
import warnings
from importlib.util import find_spec

import numpy as np
import torch
import yaml
from recbole.config import Config as RecBoleConfig

from recbole_llm.distributed import join_process_group
from recbole_llm.errors import RecBoleLLMError
from recbole_llm.llm.backbone import SMOLLM2_ALIAS
from recbole_llm.model.abstract_recommender import LLMSequentialRecommender
from recbole_llm.utils import get_model, properties_dir

# NumPy 2 removed these aliases; RecBole 1.2.1 still uses them (Config, metrics, interaction, dataset).
_NUMPY_ALIASES = {
    "bool": np.bool_, "int": np.int_, "float": np.float64, "complex": np.complex128, "object": np.object_,
    "str": np.str_, "long": np.int_, "unicode": np.str_, "float_": np.float64, "complex_": np.complex128,
    "unicode_": np.str_, "bool8": np.bool_,
}


def restore_numpy_aliases():
    """Adds the aliases this NumPy lacks (a process that loads a checkpoint may not have built a Config before)."""
    with warnings.catch_warnings():  # NumPy 2 warns on the very lookups that find an alias missing
        warnings.simplefilter("ignore", FutureWarning)
        missing = {name: value for name, value in _NUMPY_ALIASES.items() if not hasattr(np, name)}
    for name, value in missing.items():
        setattr(np, name, value)


def bundled_dataset_dir(dataset):
    """The copy of a dataset shipped inside the recbole wheel (only ml-100k), or None."""
    path = os.path.join(find_spec("recbole").submodule_search_locations[0], "dataset_example", dataset)
    return path if os.path.isdir(path) else None


def cpu_budget(config):
    """The settings of ``cpu_budget`` this run takes: all those the user did not set, when it runs the default LLM
    on a CPU; none otherwise (an LLM the user names runs as they say)."""
    budget = config["cpu_budget"]
    if not budget or config["llm_path"] != SMOLLM2_ALIAS or config["device"].type != "cpu":
        return {}
    return {key: value for key, value in budget.items() if key not in config.external_config_dict}


class Config(RecBoleConfig):
    """RecBole's Config; the plugin's YAML files are read after RecBole's, so plugin defaults win over RecBole's
    and the user's files, dicts and ``--key=value`` still win over both."""

    def __init__(self, model=None, dataset=None, config_file_list=None, config_dict=None):
        super().__init__(model, dataset, config_file_list, config_dict)
        self.final_config_dict.update(cpu_budget(self))

    def compatibility_settings(self):
        restore_numpy_aliases()

    def _convert_config_dict(self, config_dict):
        """RecBole's reading of ``--key=value`` (Python literals, true, false), and lists of words written as YAML
        writes them, which Python cannot read: --item_text_fields=[name,year]."""
        with warnings.catch_warnings():  # RecBole evals every text: "{title} ({year})" warns, then stays text
            warnings.simplefilter("ignore", SyntaxWarning)
            config_dict = super()._convert_config_dict(config_dict)
        for key, value in config_dict.items():
            if isinstance(value, str) and value.startswith("[") and value.endswith("]"):
                try:
                    config_dict[key] = yaml.safe_load(value)
                except yaml.YAMLError:
                    pass  # not a list after all: the text as it is
        return config_dict

    def _load_config_files(self, file_list):
        for file in file_list or []:
            if not os.path.isfile(file):
                raise RecBoleLLMError(f"config file '{file}' does not exist: check the path given to --config_files")
        try:
            return super()._load_config_files(file_list)
        except yaml.YAMLError as error:
            mark = getattr(error, "problem_mark", None)
            where = f" at line {mark.line + 1}" if mark else ""
            raise RecBoleLLMError(f"config file is not valid YAML{where}: {getattr(error, 'problem', error)}") from None

    def _get_model_and_dataset(self, model, dataset):
        model = model if model is not None else self.external_config_dict.get("model")
        dataset = dataset if dataset is not None else self.external_config_dict.get("dataset")
        if model is None or dataset is None:
            raise RecBoleLLMError("both a model and a dataset are needed: pass --model=NAME --dataset=NAME")
        if isinstance(model, str):
            return model, get_model(model), dataset
        return model.__name__, model, dataset

    def _load_internal_config_dict(self, model, model_class, dataset):
        super()._load_internal_config_dict(model, model_class, dataset)
        llm_files = ["llm.yaml"] if issubclass(model_class, LLMSequentialRecommender) else []
        plugin_files = ["overall.yaml", *llm_files, f"model/{model}.yaml", f"dataset/{dataset}.yaml"]
        for file in plugin_files:
            path = os.path.join(properties_dir(), file)
            if os.path.isfile(path):
                config_dict = self._update_internal_config_dict(path)
                if file.startswith("dataset/") and config_dict:
                    self.parameters["Dataset"] += [k for k in config_dict if k not in self.parameters["Dataset"]]

    def _init_device(self):
        """RecBole's devices; a process of a multi-process run (``local_rank`` set by quick_start.run) joins a group."""
        if "local_rank" not in self.final_config_dict:
            return super()._init_device()
        join_process_group(self.final_config_dict)

    def _set_default_parameters(self):
        super()._set_default_parameters()
        self.final_config_dict["data_path"] = self._find_dataset()

    def _find_dataset(self):
        """The user's ``data_path/<dataset>`` when it exists, else RecBole's bundled copy (ml-100k only)."""
        # RecBole itself points ml-100k at its bundled copy whatever data_path says; honour data_path when it has one
        data_path = self.external_config_dict.get("data_path") or self.internal_config_dict["data_path"]
        user_dir = os.path.join(data_path, self.dataset)
        inter_file = os.path.join(user_dir, f"{self.dataset}.inter")
        if os.path.isfile(inter_file):
            return user_dir
        bundled = bundled_dataset_dir(self.dataset)
        if bundled:
            return bundled
        raise RecBoleLLMError(
            f"dataset '{self.dataset}' not found: no {inter_file} (looked in data_path "
            f"'{os.path.abspath(os.path.dirname(user_dir))}'); put RecBole atomic files there or pass --data_path=DIR"
        )


def single_process(config):
    """A config saved by a multi-process run, set to run in this one process as RecBole sets a one-process run."""
    if not config["single_spec"]:
        config["single_spec"], config["local_rank"] = True, 0
        config["device"] = torch.device("cuda" if config["gpu_id"] and torch.cuda.is_available() else "cpu")
    return config
