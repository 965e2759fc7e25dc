"""The frozen ID-based recommender (a RecBole SASRec or BERT4Rec checkpoint) that Laser and RSLLM build on.

It only loads the checkpoint ``cf_checkpoint`` names: when the user names none, the run trains one before the model
is built (recbole_llm.cf_training) and names it.
"""

import hashlib
import os
import random
from contextlib import contextmanager
from logging import getLogger

import numpy as np
import torch
import torch.nn.functional as F
from recbole.model.sequential_recommender.bert4rec import BERT4Rec
from recbole.model.sequential_recommender.sasrec import SASRec
from torch import nn

from recbole_llm.checkpoint import load_checkpoint
from recbole_llm.errors import RecBoleLLMError, require

CF_MODELS = {"SASRec": SASRec, "BERT4Rec": BERT4Rec}


class CollaborativeEncoder(nn.Module):
    """A frozen RecBole SASRec/BERT4Rec: its item embedding table and its hidden states of item sequences.

    Reads ``cf_model`` (SASRec or BERT4Rec), ``cf_checkpoint`` (the checkpoint to load, read once; one that is not
    plain data only with ``trust_checkpoint``) and ``cf_hidden_size`` (checked when set).
    """

    def __init__(self, config, dataset):
        super().__init__()
        check_cf_model(config)
        cf_model, path = config["cf_model"], config["cf_checkpoint"]
        if not path:
            raise RecBoleLLMError(
                "cf_checkpoint is not set: name the RecBole checkpoint of the CF model, or build the model with "
                "recbole_llm.quick_start.build_model, which trains and caches one first"
            )
        if not os.path.isfile(path):
            raise RecBoleLLMError(
                f"cf_checkpoint {path} does not exist: pass the .pth file RecBole's trainer wrote for {cf_model} on "
                f"{config['dataset']}, or drop cf_checkpoint to train one"
            )
        checkpoint = load_checkpoint(path, trust_checkpoint=config["trust_checkpoint"])
        check_checkpoint_fits(checkpoint, path, config, dataset)
        self.checkpoint_path = path
        self.n_items = dataset.item_num
        with preserved_random_state():  # building the CF model must not shift the LLM model's init
            self.recommender = CF_MODELS[cf_model](checkpoint["config"], dataset)
            self.recommender.load_state_dict(checkpoint["state_dict"])
        self.recommender.requires_grad_(False)
        self.recommender.eval()
        self.hidden_size = self.recommender.hidden_size
        getLogger().info(f"collaborative encoder: frozen {cf_model} from {path}")

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

    @torch.no_grad()
    def item_scores(self, item_seq, item_len, items):
        """The CF model's scores [B, K] of items [B, K] after each history [B, L], as its full ranking scores them
        (BERT4Rec's output bias included)."""
        _, _, user = self.encode(item_seq, item_len)
        scores = (self.item_embeddings[items] @ user.unsqueeze(-1)).squeeze(-1)
        bias = getattr(self.recommender, "output_bias", None)
        return scores if bias is None else scores + bias[items]

    def with_mask_token(self, item_seq, item_len):
        """BERT4Rec's input for predicting the next item: the mask token right after the last item [B, L], and its
        position [B]. Only a full history loses its oldest item to make room; RecBole's reconstruct_test_data
        drops it from every history, which turns a one-item history into the mask token alone. Sequences narrower
        than the model's length (an item written as a one-item history: [N, 1]) get a column for the mask token."""
        if item_seq.shape[1] < self.recommender.max_seq_length:
            item_seq = F.pad(item_seq, (0, 1))
        max_len = item_seq.shape[1]
        full = (item_len >= max_len)[:, None]  # [B, 1]
        shifted = torch.where(full, item_seq.roll(-1, dims=1), item_seq)
        mask_position = item_len.clamp(max=max_len - 1)  # [B]
        return shifted.scatter(1, mask_position[:, None], self.recommender.mask_token), mask_position


def check_cf_model(config):
    require(config, "cf_model", config["cf_model"] in CF_MODELS, "use SASRec or BERT4Rec, e.g. cf_model=SASRec")


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
