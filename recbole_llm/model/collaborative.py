"""The frozen ID-based recommender (a RecBole SASRec or BERT4Rec checkpoint) that Laser and RSLLM build on.

``cf_checkpoint`` names a checkpoint written by RecBole's trainer; without one, the CF model is trained here with
RecBole's trainer on the same dataset and split, and cached under ``checkpoint_dir`` for the next run.
"""

import hashlib
import json
import os
import random
from contextlib import contextmanager
from logging import getLogger

import numpy as np
import torch
from recbole.data import create_dataset, data_preparation
from recbole.model.sequential_recommender.bert4rec import BERT4Rec
from recbole.model.sequential_recommender.sasrec import SASRec
from recbole.utils import init_seed
from torch import nn

from recbole_llm.checkpoint import load_checkpoint, save_checkpoint_atomically
from recbole_llm.config import Config
from recbole_llm.distributed import synchronize, writes_files
from recbole_llm.errors import RecBoleLLMError
from recbole_llm.utils import get_trainer

CF_MODELS = {"SASRec": SASRec, "BERT4Rec": BERT4Rec}

# The LLM model's settings that decide the data, the split, the evaluation protocol and the training budget,
# given to the CF model too (with RecBole's data settings, config.parameters["Dataset"]); cf_config goes on top.
CARRIED_KEYS = [
    "seed", "reproducibility", "checkpoint_dir", "gpu_id", "use_gpu", "show_progress", "eval_args", "repeatable",
    "metrics", "topk", "valid_metric", "train_batch_size", "eval_batch_size", "epochs", "stopping_step", "eval_step",
]
# Settings that do not change the trained CF model, so they stay out of its cache key.
NOT_IN_CACHE_KEY = {
    "checkpoint_dir", "data_path", "gpu_id", "use_gpu", "device", "show_progress", "state", "worker", "log_wandb",
    "wandb_project", "eval_batch_size", "save_dataset", "dataset_save_path", "save_dataloaders",
    "dataloaders_save_path", "single_spec", "local_rank", "resume", "resume_checkpoint",
    "nproc", "world_size", "ip", "port", "offset", "ddp_timeout",  # how a run is spread, not what the model learns
}


class CollaborativeEncoder(nn.Module):
    """A frozen RecBole SASRec/BERT4Rec: its item embedding table and its hidden states of item sequences.

    Reads ``cf_model`` (SASRec or BERT4Rec), ``cf_checkpoint`` (a path, or None to train and cache one),
    ``cf_config`` (overrides for training the CF model) and ``cf_hidden_size`` (checked when set).
    """

    def __init__(self, config, dataset):
        super().__init__()
        cf_model = config["cf_model"]
        self.n_items = dataset.item_num
        checkpoint = load_given_checkpoint(config, dataset)
        with preserved_random_state():  # building or training the CF model must not shift the LLM model's init
            if checkpoint is None:
                self.checkpoint_path = trained_checkpoint(config, dataset)
                checkpoint = load_checkpoint(self.checkpoint_path)
                check_checkpoint_fits(checkpoint, self.checkpoint_path, config, dataset)
            else:
                self.checkpoint_path = config["cf_checkpoint"]
            self.recommender = CF_MODELS[cf_model](checkpoint["config"], dataset)
            self.recommender.load_state_dict(checkpoint["state_dict"])
        self.recommender.requires_grad_(False)
        self.recommender.eval()
        self.hidden_size = self.recommender.hidden_size
        getLogger().info(f"collaborative encoder: frozen {cf_model} from {self.checkpoint_path}")

    def train(self, mode=True):
        """Frozen: stays in eval mode (no dropout) whatever the parent model asks."""
        return super().train(False)

    @property
    def item_embeddings(self):
        """The CF model's item table [n_items, d], padding row 0 included (BERT4Rec's mask-token row left out)."""
        return self.recommender.item_embedding.weight[: self.n_items].detach()

    @torch.no_grad()
    def encode(self, item_seq, item_len):
        """Hidden states of item sequences [B, L] (padded at the end), as RecBole's model computes them.

        Returns the states of all positions [B, L, d] (zero where ``valid`` is False), ``valid`` [B, L] and the
        user state [B, d] the model predicts the next item from: SASRec's output at the last item, BERT4Rec's at the
        mask token appended after it (``valid`` covers the real items and, for BERT4Rec, that mask token).
        """
        if isinstance(self.recommender, BERT4Rec):
            masked_seq, mask_position = self.with_mask_token(item_seq, item_len)  # [B, L], [B]
            states = self.recommender(masked_seq)  # [B, L, d]
            last = self.recommender.gather_indexes(states, mask_position)
            valid = masked_seq > 0
        else:
            encoder_outputs = []  # SASRec.forward keeps only the last position; hook its encoder for all of them
            hook = self.recommender.trm_encoder.register_forward_hook(
                lambda module, inputs, outputs: encoder_outputs.append(outputs[-1])
            )
            try:
                last = self.recommender(item_seq, item_len)  # [B, d]
            finally:
                hook.remove()
            states, valid = encoder_outputs[0], item_seq > 0
        return states.masked_fill(~valid.unsqueeze(-1), 0.0), valid, last

    def with_mask_token(self, item_seq, item_len):
        """BERT4Rec's input for predicting the next item: the mask token right after the last item [B, L], and its
        position [B]. Only a full history loses its oldest item to make room; RecBole's reconstruct_test_data
        drops it from every history, which turns a one-item history into the mask token alone."""
        max_len = item_seq.shape[1]
        full = (item_len >= max_len)[:, None]  # [B, 1]
        shifted = torch.where(full, item_seq.roll(-1, dims=1), item_seq)
        mask_position = item_len.clamp(max=max_len - 1)  # [B]
        return shifted.scatter(1, mask_position[:, None], self.recommender.mask_token), mask_position


def load_given_checkpoint(config, dataset):
    """The cf_checkpoint the user named, checked against this run's cf_model and dataset; None when none is named.
    Cheap, so models call it first too: a misfit checkpoint fails before the LLM loads."""
    cf_model, path = config["cf_model"], config["cf_checkpoint"]
    if cf_model not in CF_MODELS:
        raise RecBoleLLMError(f"cf_model must be SASRec or BERT4Rec, got {cf_model!r}: set cf_model=SASRec")
    if not path:
        return None
    if not os.path.isfile(path):
        raise RecBoleLLMError(
            f"cf_checkpoint {path} does not exist: pass the .pth file RecBole's trainer wrote for {cf_model} on "
            f"{config['dataset']}, or drop cf_checkpoint to train one"
        )
    checkpoint = load_checkpoint(path)
    check_checkpoint_fits(checkpoint, path, config, dataset)
    return checkpoint


def item_id_fingerprint(dataset):
    """sha1 of the dataset's item-id mapping (internal id -> original token): equal only for the same mapping."""
    return hashlib.sha1("\n".join(dataset.field2id_token[dataset.iid_field]).encode()).hexdigest()


def check_checkpoint_fits(checkpoint, path, config, dataset):
    """Refuses, in one line, a checkpoint that is not a SASRec/BERT4Rec of this dataset, id mapping and size."""
    cf_model, dataset_name = config["cf_model"], config["dataset"]
    fix = f"pass a {cf_model} checkpoint trained on {dataset_name}, or drop cf_checkpoint to train one"
    if not isinstance(checkpoint, dict) or "config" not in checkpoint or "state_dict" not in checkpoint:
        raise RecBoleLLMError(f"cf_checkpoint {path} is not a RecBole checkpoint (no config and state_dict): {fix}")
    saved_config, weights = checkpoint["config"], checkpoint["state_dict"]
    saved_model = saved_config["model"]
    if saved_model not in CF_MODELS:
        raise RecBoleLLMError(f"cf_checkpoint {path} holds a {saved_model} model, not SASRec or BERT4Rec: {fix}")
    if saved_model != cf_model:
        raise RecBoleLLMError(
            f"cf_checkpoint {path} holds a {saved_model} model but cf_model is {cf_model}: set cf_model={saved_model}"
        )
    n_rows, hidden_size = weights["item_embedding.weight"].shape
    saved_items = n_rows - (saved_model == "BERT4Rec")  # BERT4Rec's table has one more row, for its mask token
    if saved_config["dataset"] != dataset_name or saved_items != dataset.item_num:
        raise RecBoleLLMError(
            f"cf_checkpoint {path} was trained on {saved_config['dataset']} ({saved_items} items) but this run uses "
            f"{dataset_name} ({dataset.item_num} items): {fix}"
        )
    saved_fingerprint = checkpoint.get("item_id_fingerprint")
    if saved_fingerprint is not None and saved_fingerprint != item_id_fingerprint(dataset):
        raise RecBoleLLMError(
            f"cf_checkpoint {path} was trained on {dataset_name} with another item-id mapping (other data files or "
            f"filters) than this run: {fix}"
        )
    if config["cf_hidden_size"] and hidden_size != config["cf_hidden_size"]:
        raise RecBoleLLMError(
            f"cf_checkpoint {path} has hidden size {hidden_size} but cf_hidden_size is {config['cf_hidden_size']}: "
            f"set cf_hidden_size={hidden_size}, or {fix}"
        )
    if saved_config["MAX_ITEM_LIST_LENGTH"] < config["MAX_ITEM_LIST_LENGTH"]:
        raise RecBoleLLMError(
            f"cf_checkpoint {path} was trained with MAX_ITEM_LIST_LENGTH={saved_config['MAX_ITEM_LIST_LENGTH']} but "
            f"this run uses {config['MAX_ITEM_LIST_LENGTH']}: set MAX_ITEM_LIST_LENGTH to at most "
            f"{saved_config['MAX_ITEM_LIST_LENGTH']}, or {fix}"
        )


class CFConfig(Config):
    """The CF model's Config: built from the LLM model's settings only; ``--key=value`` is meant for the LLM model."""

    def _load_cmd_line(self):
        return {}


def cf_training_config(config):
    """The Config to train ``cf_model`` with: the LLM model's data, split and budget settings, then cf_config."""
    carried = {key: config[key] for key in config.parameters["Dataset"] + CARRIED_KEYS if key in config}
    carried["data_path"] = os.path.dirname(config["data_path"])  # the final data_path already ends in the dataset
    if config["cf_hidden_size"]:
        carried["hidden_size"] = config["cf_hidden_size"]
    config_dict = {**carried, **(config["cf_config"] or {})}
    return CFConfig(model=config["cf_model"], dataset=config["dataset"], config_dict=config_dict)


def trained_checkpoint(config, dataset):
    """The cached CF checkpoint for this dataset and these settings; trains and caches it first when missing (in a
    multi-process run, local rank 0 trains it in one process while the others wait, then all read the file)."""
    cf_config = cf_training_config(config)
    path = cached_checkpoint_path(cf_config, dataset)
    if os.path.isfile(path):
        getLogger().info(f"collaborative encoder: reusing the {cf_config['model']} trained earlier, {path}")
    elif writes_files(config):
        train_into_cache(cf_config, dataset, path)
    synchronize(config)
    return path


def train_into_cache(cf_config, dataset, path):
    """Train cf_model with RecBole's trainer on the dataset rebuilt from cf_config, and cache it at ``path``."""
    model_name = cf_config["model"]
    getLogger().info(f"collaborative encoder: no cf_checkpoint given; training {model_name} into {path}")
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
    trainer.fit(train_data, valid_data, saved=True, show_progress=cf_config["show_progress"])
    checkpoint = load_checkpoint(trainer.saved_model_file)
    checkpoint["item_id_fingerprint"] = item_id_fingerprint(dataset)
    save_checkpoint_atomically(checkpoint, path)
    os.remove(trainer.saved_model_file)
    os.remove(trainer.last_checkpoint_file)  # its resume point: the cache is written only by a finished training
    getLogger().info(f"collaborative encoder: trained {model_name}, saved to {path}")


def cached_checkpoint_path(cf_config, dataset):
    """``<checkpoint_dir>/cf-<model>-<dataset>-<hash>.pth``, the hash over all that changes the trained model."""
    settings = {key: value for key, value in cf_config.final_config_dict.items() if key not in NOT_IN_CACHE_KEY}
    settings.update(item_id_fingerprint=item_id_fingerprint(dataset), training_samples=dataset.inter_num)
    settings_hash = hashlib.sha1(json.dumps(settings, sort_keys=True, default=str).encode()).hexdigest()[:10]
    file_name = f"cf-{cf_config['model']}-{cf_config['dataset']}-{settings_hash}.pth"
    return os.path.join(cf_config["checkpoint_dir"], file_name)


@contextmanager
def preserved_random_state():
    """Restores the torch, NumPy and Python random states on exit."""
    python_state, numpy_state = random.getstate(), np.random.get_state()
    try:
        with torch.random.fork_rng():
            yield
    finally:
        random.setstate(python_state)
        np.random.set_state(numpy_state)
