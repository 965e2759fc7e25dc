"""RecBole's Config with the plugin's model lookup, the plugin's YAML defaults and today's-stack fixes."""

import os
import warnings
from datetime import timedelta
from importlib.util import find_spec

import numpy as np
import torch
import torch.distributed as dist
import yaml
from recbole.config import Config as RecBoleConfig

from recbole_llm.errors import RecBoleLLMError
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


class Config(RecBoleConfig):
    """RecBole's Config; the plugin's YAML files are read after RecBole's, so plugin defaults win over RecBole's
    and the user's files, dicts and ``--key=value`` still win over both."""

    def compatibility_settings(self):
        restore_numpy_aliases()

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
        plugin_files = ["overall.yaml", f"model/{model}.yaml", f"dataset/{dataset}.yaml"]
        for file in plugin_files:
            path = os.path.join(properties_dir(), file)
            if os.path.isfile(path):
                config_dict = self._update_internal_config_dict(path)
                if file.startswith("dataset/") and config_dict:
                    self.parameters["Dataset"] += [k for k in config_dict if k not in self.parameters["Dataset"]]

    def _init_device(self):
        """RecBole's devices. In a multi-process run (``local_rank`` set by quick_start.run) a process runs on GPU
        ``local_rank`` of gpu_id, or on the CPU, in a process group whose backend fits the device: nccl on GPUs, gloo
        on CPUs (RecBole hard-codes nccl, which has no CPU support)."""
        settings = self.final_config_dict
        if "local_rank" not in settings:
            return super()._init_device()
        gpu_id = settings["gpu_id"]
        gpu_id = ",".join(map(str, gpu_id)) if isinstance(gpu_id, tuple) else str(gpu_id)
        settings["gpu_id"] = gpu_id
        os.environ["CUDA_VISIBLE_DEVICES"] = gpu_id
        on_gpus = len(gpu_id) > 0 and torch.cuda.is_available()  # RecBole's rule for one process
        nproc, local_rank = settings["nproc"], settings["local_rank"]
        if on_gpus and len(gpu_id.split(",")) < nproc:
            raise RecBoleLLMError(
                f"nproc={nproc} processes need one GPU each, but gpu_id is '{gpu_id}': pass as many ids, "
                f"e.g. --gpu_id={','.join(map(str, range(nproc)))}"
            )
        if settings.get("llm_device_map"):
            raise RecBoleLLMError(
                "llm_device_map spreads one LLM over every GPU of one process, but this run has several processes: "
                "use llm_device_map with nproc=1, or drop it to run one copy of the LLM per GPU"
            )
        if not dist.is_initialized():  # a comparison runs several models in one process group
            dist.init_process_group(
                backend="nccl" if on_gpus else "gloo",
                init_method=f"tcp://{settings['ip']}:{settings['port']}",
                rank=local_rank + settings["offset"],
                world_size=settings["world_size"],
                timeout=timedelta(minutes=settings["ddp_timeout"]),
            )
        settings["single_spec"] = False
        settings["device"] = torch.device("cuda", local_rank) if on_gpus else torch.device("cpu")
        if on_gpus:
            torch.cuda.set_device(local_rank)
        elif "OMP_NUM_THREADS" not in os.environ:  # as torchrun does: the processes share the CPU's cores
            torch.set_num_threads(max(1, torch.get_num_threads() // nproc))
        if local_rank != 0:  # as RecBole: the other processes only report errors
            settings.update(state="error", show_progress=False, verbose=False)

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
