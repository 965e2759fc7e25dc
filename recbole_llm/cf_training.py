"""Training the frozen CF model an LLM model reads, when the user names no ``cf_checkpoint``: the run does it before
the model is built, with RecBole's trainer on the same dataset and split, and caches the checkpoint under
``checkpoint_dir``, keyed by the dataset, the seed, the CF model and its settings only, so that the next run reuses
it.

The CF model's training settings are its RecBole defaults (with the plugin's overall.yaml) and ``cf_config``; of
the LLM model's settings it takes only what decides the data and the split, and where it runs.

A comparison that has the CF model's own row before the LLM model (``--model=SASRec,Laser``) trains it anyway: when
that row trains as the CF model would (every setting alike but its number of epochs, at least as many), its best
checkpoint after the CF model's last epoch is the CF model, and is cached then (``caching_cf_models``) instead of
trained again.
"""

import hashlib
import json
import os
from logging import getLogger

from recbole.data import create_dataset
from recbole.utils import init_seed

from recbole_llm.checkpoint import load_checkpoint, save_checkpoint_atomically
from recbole_llm.cold_items import data_preparation
from recbole_llm.config import Config
from recbole_llm.distributed import synchronize, writes_files
from recbole_llm.errors import RecBoleLLMError
from recbole_llm.model.abstract_recommender import LLMSequentialRecommender
from recbole_llm.model.collaborative import CF_MODELS, item_id_fingerprint
from recbole_llm.utils import get_model, get_trainer

# The LLM model's settings the CF model is trained with, beside RecBole's data settings (config.parameters["Dataset"]):
# the split, and where and how visibly it runs. cf_config goes on top.
CARRIED_KEYS = ["eval_args", "cold_item_ratio", "repeatable", "checkpoint_dir", "gpu_id", "use_gpu", "show_progress"]
# Settings that do not change the trained CF model, so they stay out of its cache key.
NOT_IN_CACHE_KEY = {
    "checkpoint_dir", "data_path", "gpu_id", "use_gpu", "device", "show_progress", "state", "worker", "log_wandb",
    "wandb_project", "eval_batch_size", "save_dataset", "dataset_save_path", "save_dataloaders",
    "dataloaders_save_path", "single_spec", "local_rank", "resume", "resume_checkpoint", "trust_checkpoint",
    "nproc", "world_size", "ip", "port", "offset", "ddp_timeout",  # how a run is spread, not what the model learns
    "detect_anomaly",  # a check on training, not a change to it
    "item_text_fields", "item_text_template",  # the LLM models' item text, in a dataset's YAML
}


class CFConfig(Config):
    """The CF model's Config: built from the LLM model's settings only; ``--key=value`` is meant for the LLM model."""

    def _load_cmd_line(self):
        return {}


def cf_training_config(config):
    """The Config to train ``cf_model`` with: its defaults, the LLM model's data and split, then cf_config."""
    carried = {key: config[key] for key in config.parameters["Dataset"] + CARRIED_KEYS if key in config}
    carried["data_path"] = os.path.dirname(config["data_path"])  # the final data_path already ends in the dataset
    # one CF model per seed, so that a comparison over seeds has the CF model's variance in it (and which items are
    # cold, with cold_item_ratio, is drawn with the seed: the CF model must not see them either)
    carried["seed"] = config["seed"]
    if config["cf_hidden_size"]:
        carried["hidden_size"] = config["cf_hidden_size"]
    return CFConfig(model=config["cf_model"], dataset=config["dataset"], config_dict={**carried, **config["cf_config"]})


def trained_checkpoint(config, dataset):
    """The cached CF checkpoint for this dataset and these settings; trains and caches it first when missing (in a
    multi-process run, local rank 0 trains it in one process while the others wait, then all read the file)."""
    cf_config = cf_training_config(config)
    path = cached_checkpoint_path(cf_config, dataset)
    if os.path.isfile(path):
        getLogger().info(f"collaborative model: reusing the {cf_config['model']} trained earlier, {path}")
    elif writes_files(config):
        train_into_cache(cf_config, dataset, path)
    synchronize(config)
    return path


def train_into_cache(cf_config, dataset, path):
    """Train cf_model with RecBole's trainer on the dataset rebuilt from cf_config, and cache it at ``path``."""
    model_name = cf_config["model"]
    getLogger().info(f"collaborative model: no cf_checkpoint given; training {model_name} into {path}")
    full_dataset = create_dataset(cf_config)  # the model's dataset is the train split; RecBole splits the whole one
    if item_id_fingerprint(full_dataset) != item_id_fingerprint(dataset):
        raise RecBoleLLMError(
            f"the {model_name} dataset rebuilt from this run's data settings maps item ids differently from the "
            f"model's dataset: train {model_name} on the same data yourself and pass cf_checkpoint=PATH"
        )
    train_data, valid_data, _ = data_preparation(cf_config, full_dataset)
    init_seed(cf_config["seed"], cf_config["reproducibility"])
    model = CF_MODELS[model_name](cf_config, train_data._dataset).to(cf_config["device"])
    trainer = get_trainer(cf_config["MODEL_TYPE"], model_name)(cf_config, model)
    trainer.saved_model_file = f"{path}.{os.getpid()}.partial"  # a crash mid-training leaves no cache file behind
    try:
        trainer.fit(train_data, valid_data, saved=True, show_progress=cf_config["show_progress"])
        checkpoint = load_checkpoint(trainer.saved_model_file)
        checkpoint["item_id_fingerprint"] = item_id_fingerprint(dataset)
        save_checkpoint_atomically(checkpoint, path)
    finally:  # the partial files (the best so far and its resume point) go, whether training ended or failed
        for partial in (trainer.saved_model_file, trainer.last_checkpoint_file):
            if partial and os.path.isfile(partial):
                os.remove(partial)
    getLogger().info(f"collaborative model: trained {model_name}, saved to {path}")


def cf_training_configs(model_configs):
    """{CF model name: [the Config each LLM model's CF model would be trained with]} of the given configs of a run's
    models, for those that read a CF model and name no cf_checkpoint."""
    wanted = {}
    for config in model_configs:
        model_class = get_model(config["model"])
        if issubclass(model_class, LLMSequentialRecommender) and model_class.reads_cf_model(config) \
                and not config["cf_checkpoint"]:
            wanted.setdefault(config["cf_model"], []).append(cf_training_config(config))
    return wanted


def caching_cf_models(row_config, trainer, dataset, cf_configs, callback_fn=None):
    """RecBole's fit callback for a row (`row_config`, its `trainer`, its training `dataset`) that trains as some of
    `cf_configs` would but for more epochs: after each one's last epoch, the row's best checkpoint so far is cached as
    that CF model (unless cached already); then callback_fn(epoch, valid_score)."""
    alike = [cf_config for cf_config in cf_configs if trains_alike(row_config, cf_config)]

    def callback(epoch_idx, valid_score):
        for cf_config in alike:
            path = cached_checkpoint_path(cf_config, dataset)
            if epoch_idx + 1 == cf_config["epochs"] and not os.path.isfile(path):
                checkpoint = load_checkpoint(trainer.saved_model_file)
                checkpoint.update(config=cf_config, item_id_fingerprint=item_id_fingerprint(dataset))
                save_checkpoint_atomically(checkpoint, path)
                getLogger().info(f"collaborative model: the {cf_config['model']} of epochs 1-{cf_config['epochs']} of "
                                 f"this run, cached as the CF model it repeats: {path}")
        if callback_fn:
            callback_fn(epoch_idx, valid_score)

    return callback


def trains_alike(row_config, cf_config):
    """Whether a row trains the CF model over its first cf_config['epochs'] epochs, validating after each: the same
    model and every setting of the CF model's that is in its cache key, except the number of epochs (the row's at
    least as many)."""
    if row_config["model"] != cf_config["model"] or row_config["epochs"] < cf_config["epochs"] \
            or row_config["eval_step"] != 1:
        return False
    settings = cf_config.final_config_dict
    return all(row_config[key] == value for key, value in settings.items()
               if key not in NOT_IN_CACHE_KEY and key != "epochs")


def cached_checkpoint_path(cf_config, dataset):
    """``<checkpoint_dir>/cf-<model>-<dataset>-<hash>.pth``, the hash over all that changes the trained model."""
    settings = {key: value for key, value in cf_config.final_config_dict.items() if key not in NOT_IN_CACHE_KEY}
    if not settings.get("cold_item_ratio"):
        settings.pop("cold_item_ratio", None)  # without cold items, the key caches had before the setting: still valid
    # checkpoint_format: a cache written before checkpoints were data (its Config pickled) is trained again, not reused
    settings.update(
        item_id_fingerprint=item_id_fingerprint(dataset), training_samples=dataset.inter_num, checkpoint_format="data"
    )
    settings_hash = hashlib.sha1(json.dumps(settings, sort_keys=True, default=str).encode()).hexdigest()[:10]
    file_name = f"cf-{cf_config['model']}-{cf_config['dataset']}-{settings_hash}.pth"
    return os.path.join(cf_config["checkpoint_dir"], file_name)
