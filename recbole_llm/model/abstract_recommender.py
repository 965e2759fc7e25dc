"""What an LLM-based sequential recommender is to the run and the LLMTrainer: its settings checks, its frozen
backbones, its training stages, its item matrix and the items its training losses leave out; and the two things
every model of a run shares with it: the parameter counts every log and table reports, and which items are cold."""

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from recbole.model.abstract_recommender import SequentialRecommender

from recbole_llm.errors import RecBoleLLMError, is_int, require
from recbole_llm.llm.backbone import check_llm_path
from recbole_llm.llm.item_text import check_item_text_settings, template_fields
from recbole_llm.model.collaborative import check_cf_model


def count_parameters(module):
    """(trainable, total) parameter counts of a module."""
    parameters = list(module.parameters())
    return sum(p.numel() for p in parameters if p.requires_grad), sum(p.numel() for p in parameters)


def cold_items(config, dataset):
    """The cold items' ids [n_cold], sorted: round(cold_item_ratio * items) of the items, drawn with the seed; none
    without the setting (or in a checkpoint written before it: None)."""
    n_items = dataset.item_num - 1  # id 0 is padding
    n_cold = round((config["cold_item_ratio"] or 0) * n_items)
    generator = torch.Generator().manual_seed(config["seed"])
    return (torch.randperm(n_items, generator=generator)[:n_cold] + 1).sort().values


@dataclass(frozen=True)
class TrainingStage:
    """One stage of training: the trainer runs stages in order, each with validation and early stopping."""

    name: str
    epochs: int


class LLMSequentialRecommender(SequentialRecommender):
    """A RecBole SequentialRecommender around frozen backbones (an LLM, a CF model), trained in stages.

    Subclasses say which settings they check, whether they read a CF model, which modules are frozen, which stages
    they train in, what happens at the start of a stage and an epoch, and how one item is embedded. Checkpoints hold
    everything but the frozen backbones' weights, so a checkpoint is megabytes, not the LLM.

    The item matrix: every item's unit-norm embedding [n_items, d] (row 0, padding, stays zero), computed once per
    evaluation (or per epoch, or frozen: the model says) and reused by every user batch. It is a buffer, so that a
    checkpoint holds the matrix it scores with and whether its weights made that matrix.

    Cold items (cold_item_ratio) are, in training, items that do not exist yet: no training loss has them among its
    candidates (`without_cold_items`), else every step teaches the model that they are wrong answers. Evaluation
    ranks them as every item.
    """

    def __init__(self, config, dataset):
        super().__init__(config, dataset)
        self.config = config
        self.item_batch_size = config["item_batch_size"]
        self.stage = None
        is_cold = torch.zeros(self.n_items, dtype=torch.bool).index_fill_(0, cold_items(config, dataset), True)
        self.register_buffer("is_cold_item", is_cold, persistent=False)  # [n_items]: drawn again from config

    # ---- Settings and backbones ----------------------------------------------------------------------------------

    @classmethod
    def check_settings(cls, config, dataset):
        """One-line errors for bad settings: quick_start.build_model calls this before anything costly (training
        the CF model, loading the LLM). Subclasses add their own checks."""
        for key in ("max_prompt_items", "item_batch_size", "grad_accum_steps"):
            require(config, key, is_int(config[key]) and config[key] > 0, "it must be a positive integer")
        for key in ("stage1_epochs", "stage2_epochs"):
            require(config, key, is_int(config[key]) and config[key] >= 0, "use 0 to skip the stage, or more")
        require(config, "detect_anomaly", isinstance(config["detect_anomaly"], bool), "it must be True or False")
        require(config, "validate_every_stage", isinstance(config["validate_every_stage"], bool),
                "it must be True or False")
        checkpointing = config["gradient_checkpointing"]
        require(config, "gradient_checkpointing",
                isinstance(checkpointing, bool) or is_int(checkpointing) and checkpointing >= 0,
                "use True (every layer), False, or a number N of the LLM's first layers")
        layers = config["llm_layers"]
        require(config, "llm_layers", layers is None or is_int(layers) and layers > 0,
                "it must be a positive number of layers, or None for all of them")
        marker = config["prompt_item_marker"]
        require(config, "prompt_item_marker", isinstance(marker, str) and template_fields(marker) == ["index"],
                "it must hold {index} once and no other placeholder, to number the items: e.g. ' >> {index}.'")
        check_item_text_settings(config, dataset)
        check_llm_path(config["llm_path"])  # a mistyped path fails here, not after the CF model trained
        if cls.reads_cf_model(config):
            check_cf_model(config)
            require(config, "cf_config", isinstance(config["cf_config"], dict), "it must be a dict of settings")

    @classmethod
    def reads_cf_model(cls, config):
        """Whether the model, with these settings, reads a frozen CF model (the run trains one when none is given)."""
        return False

    def frozen_modules(self):
        """Modules whose weights never train (their parameters have requires_grad False)."""
        return []

    def optimizer_groups(self):
        """The trainable weights as the optimizer's parameter groups (torch's dicts): one group at the run's
        learning_rate, unless the model gives some weights a learning rate of their own."""
        return [{"params": [weight for weight in self.parameters() if weight.requires_grad]}]

    # ---- Stages ------------------------------------------------------------------------------------------------

    def training_stages(self):
        return [TrainingStage("train", self.config["epochs"])]

    def set_stage(self, name):
        """Switch behaviour to a stage without computing anything (also used when a checkpoint is loaded)."""
        self.stage = name

    def begin_stage(self, name):
        """Called by the trainer when a stage starts training."""
        self.set_stage(name)

    def begin_epoch(self, epoch_idx):
        """Called by the trainer before each training epoch."""

    def begin_evaluation(self):
        """Called by the trainer once before each evaluation (valid or test), before any batch is scored: the item
        matrix, once, unless no weight changed since it was computed."""
        self.refresh_item_matrix()

    def end_evaluation(self):
        """Called by the trainer once after each evaluation, when every batch has been scored (e.g. to log it)."""

    # ---- The item matrix ---------------------------------------------------------------------------------------

    def register_item_matrix(self, width, item_text_lengths):
        """The item matrix [n_items, width] and whether the current weights made it; item_text_lengths [n_items]
        orders the items when it is computed."""
        self.register_buffer("item_matrix", torch.zeros(self.n_items, width))
        self.register_buffer("item_matrix_is_current", torch.tensor(False))
        self.register_buffer("item_text_lengths", item_text_lengths, persistent=False)

    def item_embedding(self, items):
        """The embedding of each item [N] -> [N, width]: a row of the item matrix before normalisation."""
        raise NotImplementedError

    @torch.no_grad()
    def compute_item_matrix(self):
        """Every item's unit-norm embedding with the current weights, without gradient or dropout: [n_items, d].
        Items of one text length are batched together, so that batches pad little."""
        was_training = self.training
        self.eval()  # the matrix is a fixed target: no dropout in it
        items = torch.arange(1, self.n_items, device=self.item_matrix.device)
        items = items[self.item_text_lengths[items].argsort(stable=True)]
        embeddings = torch.cat([self.item_embedding(batch) for batch in items.split(self.item_batch_size)])
        self.train(was_training)
        return torch.zeros_like(self.item_matrix).index_copy(0, items, F.normalize(embeddings.float(), dim=-1))

    def refresh_item_matrix(self):
        """Recompute the item matrix, unless no weight changed since it was computed (e.g. an epoch right after a
        validation, or a checkpoint reloaded with the matrix its weights made)."""
        if not self.item_matrix_is_current:
            self.item_matrix.copy_(self.compute_item_matrix())
            self.item_matrix_is_current.fill_(True)

    def item_matrix_outdated(self):
        """The weights the item matrix was computed with are changing (an optimizer step follows, or another stage)."""
        self.item_matrix_is_current.fill_(False)

    def without_cold_items(self, scores):
        """Training scores over all items [B, n_items] with the cold items' at -inf: no probability, no gradient."""
        return scores.masked_fill(self.is_cold_item, float("-inf"))

    # ---- Modes and checkpoints ---------------------------------------------------------------------------------

    def train(self, mode=True):
        super().train(mode)
        for module in self.frozen_modules():
            module.eval()  # frozen backbones keep dropout off
        return self

    def _frozen_tensor_ids(self):
        return {
            id(tensor)
            for module in self.frozen_modules()
            for tensor in (*module.parameters(), *module.buffers())
            if not tensor.requires_grad
        }

    def checkpoint_state_dict(self):
        """The state dict without the frozen backbones' weights."""
        frozen = self._frozen_tensor_ids()
        return {k: v.detach() for k, v in self.state_dict(keep_vars=True).items() if id(v) not in frozen}

    def load_checkpoint_state_dict(self, state_dict):
        frozen_keys = {k for k, v in self.state_dict(keep_vars=True).items() if id(v) in self._frozen_tensor_ids()}
        missing, unexpected = self.load_state_dict(state_dict, strict=False)
        wrong = [k for k in missing if k not in frozen_keys] + list(unexpected)
        if wrong:
            raise RecBoleLLMError(
                f"checkpoint does not fit this {type(self).__name__} ({len(wrong)} mismatched weights, e.g. "
                f"{wrong[0]}): it was trained with other model settings; use the settings it was trained with"
            )
