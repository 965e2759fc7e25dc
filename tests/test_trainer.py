"""LLMTrainer: trainable-only optimizer and checkpoints, stages in order, hooks, accumulation, capped epochs; the
candidate protocol of a general model."""

import pytest
import torch
from recbole.data import create_dataset, data_preparation
from recbole.utils import InputType
from torch import nn

from conftest import TINY_DATASET, tiny_config
from recbole_llm import candidate_evaluation
from recbole_llm.checkpoint import load_checkpoint
from recbole_llm.config import Config
from recbole_llm.model.abstract_recommender import LLMSequentialRecommender, TrainingStage
from recbole_llm.quick_start import run_recbole_llm
from recbole_llm.trainer import LLMTrainer


class TwoTowerToy(LLMSequentialRecommender):
    """A frozen 'backbone' table with two trainable heads; the item head trains only in the second stage."""

    input_type = InputType.POINTWISE

    def __init__(self, config, dataset):
        super().__init__(config, dataset)
        self.backbone = nn.Embedding(self.n_items, 16)
        self.backbone.requires_grad_(False)
        self.user_head = nn.Linear(16, 16)
        self.item_head = nn.Linear(16, 16)
        self.stages_begun, self.epochs_begun, self.item_matrix_computations = [], 0, 0
        self.item_head_at_stage_start = {}

    def frozen_modules(self):
        return [self.backbone]

    def training_stages(self):
        return [TrainingStage("users", self.config["stage1_epochs"]), TrainingStage("items", self.config["stage2_epochs"])]

    def begin_stage(self, name):
        super().begin_stage(name)
        self.stages_begun.append(name)
        self.item_head.requires_grad_(name == "items")
        self.item_head_at_stage_start[name] = self.item_head.weight.detach().clone()

    def begin_epoch(self, epoch_idx):
        self.epochs_begun += 1

    def begin_evaluation(self):
        self.item_matrix_computations += 1
        self.item_matrix = self.item_head(self.backbone.weight)  # [n_items, 16]

    def _users(self, interaction):
        item_seq = interaction[self.ITEM_SEQ]
        mean = self.backbone(item_seq).sum(1) / interaction[self.ITEM_SEQ_LEN].unsqueeze(1)
        return self.user_head(mean)  # [B, 16]

    def calculate_loss(self, interaction):
        scores = self._users(interaction) @ self.item_head(self.backbone.weight).T
        return nn.functional.cross_entropy(scores, interaction[self.POS_ITEM_ID]), 0.0 * scores.sum()

    def full_sort_predict(self, interaction):
        return self._users(interaction) @ self.item_matrix.T

    def predict(self, interaction):
        return (self._users(interaction) * self.item_matrix[interaction[self.ITEM_ID]]).sum(-1)


@pytest.fixture
def toy(tmp_path):
    def build(**overrides):
        settings = tiny_config(tmp_path, **{"stage1_epochs": 1, "stage2_epochs": 2, "learning_rate": 0.01, **overrides})
        config = Config(model=TwoTowerToy, dataset=TINY_DATASET, config_dict=settings)
        train_data, valid_data, test_data = data_preparation(config, create_dataset(config))
        torch.manual_seed(0)
        model = TwoTowerToy(config, train_data._dataset)
        return config, model, LLMTrainer(config, model), (train_data, valid_data, test_data)

    return build


def test_stages_run_in_order_and_only_trainable_weights_move(toy):
    config, model, trainer, (train_data, valid_data, _) = toy(validate_every_stage=True)
    backbone_before = model.backbone.weight.detach().clone()
    trainer.fit(train_data, valid_data)
    assert model.stages_begun == ["users", "items"] and model.epochs_begun == 3
    assert torch.equal(model.backbone.weight, backbone_before)
    assert torch.equal(model.item_head_at_stage_start["items"], model.item_head_at_stage_start["users"])  # frozen in stage 1
    assert not torch.equal(model.item_head.weight, model.item_head_at_stage_start["items"])  # trained in stage 2
    assert model.item_matrix_computations == 3  # once per validation, not per user batch


def test_checkpoint_holds_only_trainable_weights_and_reloads_identically(toy, tmp_path):
    config, model, trainer, (train_data, valid_data, test_data) = toy()
    trainer.fit(train_data, valid_data)
    checkpoint = load_checkpoint(trainer.saved_model_file)
    assert set(checkpoint["state_dict"]) == {"user_head.weight", "user_head.bias", "item_head.weight", "item_head.bias"}
    assert checkpoint["stage"] in ("users", "items")
    test_result = trainer.evaluate(test_data, load_best_model=True)

    _, fresh_model, fresh_trainer, _ = toy()
    fresh_model.backbone.load_state_dict(model.backbone.state_dict())  # the frozen backbone comes from elsewhere
    assert fresh_trainer.evaluate(test_data, load_best_model=True, model_file=trainer.saved_model_file) == test_result
    assert fresh_model.stage == checkpoint["stage"]


def test_the_test_reads_the_last_stages_best_even_below_an_earlier_stage(toy, monkeypatch):
    config, model, trainer, (train_data, valid_data, test_data) = toy(stage2_epochs=3, stopping_step=1,
                                                                      validate_every_stage=True)
    scores = iter([0.5, 0.1, 0.2, 0.15])  # stage 1: 0.5; stage 2: 0.1, 0.2 (its best), 0.15
    monkeypatch.setattr(trainer, "_valid_epoch", lambda *args, **kwargs: (score := next(scores), {"ndcg@10": score}))
    best_score, best_result = trainer.fit(train_data, valid_data)

    checkpoint = load_checkpoint(trainer.saved_model_file)
    assert (checkpoint["stage"], checkpoint["epoch"], checkpoint["best_valid_score"]) == ("items", 1, 0.2)
    assert (best_score, best_result) == (0.2, {"ndcg@10": 0.2})  # stage 2's own best, not stage 1's 0.5
    trainer.evaluate(test_data, load_best_model=True)
    assert model.stage == "items"


def test_a_one_epoch_stage_before_another_is_not_validated_and_keeps_the_same_weights(toy):
    validated = {}
    for every_stage in (True, False):
        config, model, trainer, (train_data, valid_data, test_data) = toy(validate_every_stage=every_stage)
        validations = []
        trainer._valid_epoch = lambda data, show_progress=False, inner=trainer._valid_epoch: (
            validations.append(model.stage) or inner(data, show_progress))
        trainer.fit(train_data, valid_data)
        validated[every_stage] = validations, trainer.evaluate(test_data, load_best_model=True)
    assert validated[True][0] == ["users", "items", "items"]
    assert validated[False][0] == ["items", "items"]  # stage 1's one epoch is kept whatever it scores
    assert validated[False][1] == validated[True][1]  # stage 2 started from the same weights, and tests the same


def test_misfit_checkpoint_is_refused_in_one_line(toy):
    _, model, trainer, (train_data, valid_data, _) = toy()
    trainer.fit(train_data, valid_data)
    model.extra_head = nn.Linear(2, 2)
    with pytest.raises(Exception, match="does not fit this TwoTowerToy") as error:
        trainer.evaluate(valid_data, load_best_model=True)
    assert "\n" not in str(error.value)


def test_gradient_accumulation_and_capped_epochs_count_optimizer_steps(toy):
    _, model, trainer, (train_data, valid_data, _) = toy(grad_accum_steps=2, train_batches_per_epoch=3, stage2_epochs=0)
    trainer.fit(train_data, valid_data)
    assert len(train_data) > 3
    assert trainer.scheduler.last_epoch == 2  # 3 batches, an optimizer step every 2 and one for the remainder


def test_per_term_losses_are_returned(toy):
    _, model, trainer, (train_data, _, _) = toy(stage2_epochs=0)
    trainer._start_stage(model.training_stages()[0], len(train_data))
    losses = trainer._train_epoch(train_data, 0)
    assert isinstance(losses, tuple) and len(losses) == 2 and losses[0] > 0 and losses[1] == 0


def test_a_recbole_model_trains_capped_epochs_of_different_batches(workdir, monkeypatch):
    """train_batches_per_epoch holds for SASRec too: each epoch its first N batches, a new subset each epoch."""
    from recbole.model.sequential_recommender import SASRec

    seen = []  # the users of every training batch
    calculate_loss = SASRec.calculate_loss
    monkeypatch.setattr(SASRec, "calculate_loss",
                        lambda self, interaction: seen.append(interaction["user_id"]) or calculate_loss(self, interaction))
    config = tiny_config(workdir, epochs=2, train_batch_size=64, train_batches_per_epoch=3, stopping_step=5)
    full = run_recbole_llm(model="SASRec", dataset=TINY_DATASET, config_dict={**config, "train_batches_per_epoch": None})
    uncapped = len(seen)
    seen.clear()
    run_recbole_llm(model="SASRec", dataset=TINY_DATASET, config_dict=config)
    assert uncapped > 2 * 6 and len(seen) == 2 * 3  # 3 batches in each of 2 epochs
    assert all(len(users) == 64 for users in seen)
    assert not torch.equal(seen[0], seen[3])  # the second epoch starts from another shuffle
    assert full["best_valid_score"] > 0


# ---- The candidate protocol for a general model ------------------------------------------------------------------


def test_pop_picks_its_most_popular_candidate_among_the_sequential_models_candidates(workdir, monkeypatch):
    picks = {}  # model class -> (model, candidates [B, C], which one it picked [B, C])
    judge = candidate_evaluation.judged_candidates

    def recorded(model, interaction, candidates):
        rankings, named, answers = judge(model, interaction, candidates)
        picks[type(model).__name__] = model, candidates, named
        return rankings, named, answers

    monkeypatch.setattr(candidate_evaluation, "judged_candidates", recorded)
    runs = {
        name: run_recbole_llm(model=name, dataset=TINY_DATASET, config_dict=tiny_config(
            workdir, candidate_eval=True, n_candidates=5
        )) for name in ("Pop", "SASRec")
    }
    pop = runs["Pop"]["test_result"]
    assert pop["valid_ratio"] == 1 and pop["hr@1_candidates"] == pop["hr@1_x_valid_ratio"] > 0
    assert "hr@1_candidates" not in runs["Pop"]["best_valid_result"]
    model, candidates, named = picks["Pop"]
    assert torch.equal(candidates, picks["SASRec"][1])  # the same users and candidates as the sequential model's
    assert len(candidates) == 100  # n_candidate_users of the test users
    counts = model.item_cnt.squeeze(1).cpu()  # Pop's scores: training interactions per item
    assert torch.equal(named.int().argmax(1), counts[candidates].argmax(1))  # its most popular candidate
