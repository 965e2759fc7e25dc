"""The frozen CF model on the tiny ml-100k copy: the run's train-and-cache (recbole_llm.cf_training), and the encoder
that loads it (RecBole parity, freezing, refusals)."""

import logging
import os
import random
import sys

import numpy as np
import pandas as pd
import pytest
import recbole.trainer
import torch
from recbole.data import create_dataset, data_preparation
from recbole.model.sequential_recommender.bert4rec import BERT4Rec
from recbole.model.sequential_recommender.gru4rec import GRU4Rec
from recbole.model.sequential_recommender.sasrec import SASRec
from torch import nn

from conftest import TESTS_DIR, TINY_CF, TINY_DATASET, recbole_trainer_checkpoint, tiny_config
from recbole_llm.cf_training import cached_checkpoint_path, cf_training_config, trained_checkpoint
from recbole_llm.checkpoint import load_checkpoint, save_checkpoint_atomically
from recbole_llm.config import Config
from recbole_llm.errors import RecBoleLLMError
from recbole_llm.model.collaborative import CollaborativeEncoder, item_id_fingerprint

DATA_PATH = os.path.join(TESTS_DIR, "data")


def make_config(checkpoint_root, model="Laser", dataset=TINY_DATASET, data_path=DATA_PATH, **settings):
    """An LLM model's config on the tiny data with a tiny CF model (the llm_path is never loaded here)."""
    config_dict = tiny_config(checkpoint_root, MAX_ITEM_LIST_LENGTH=20, data_path=data_path, cf_config=TINY_CF)
    return Config(model=model, dataset=dataset, config_dict={**config_dict, **settings})


def cached_encoder(config, dataset):
    """The encoder of the cached CF model the run trains (on first use) for a config without a cf_checkpoint."""
    if not config["cf_checkpoint"]:
        config["cf_checkpoint"] = trained_checkpoint(config, dataset)
    return CollaborativeEncoder(config, dataset)


def save_recbole_checkpoint(config, model, path):
    """What RecBole's trainer writes: the pickled Config and the weights, pickle protocol 4 (read with consent)."""
    torch.save({"config": config, "state_dict": model.state_dict()}, path, pickle_protocol=4)


@pytest.fixture(scope="module")
def tiny(workdir):
    config = make_config(workdir)
    train_data, _, _ = data_preparation(config, create_dataset(config))
    return config, train_data._dataset, next(iter(train_data))


@pytest.fixture(scope="module")
def sasrec(tiny, workdir):
    _, dataset, _ = tiny
    return cached_encoder(make_config(workdir), dataset)


@pytest.fixture(scope="module")
def bert4rec(workdir, tiny):
    _, dataset, _ = tiny
    return cached_encoder(make_config(workdir, cf_model="BERT4Rec"), dataset)


def recbole_model(encoder, dataset):
    """RecBole's own model rebuilt from the encoder's checkpoint, to compare against."""
    checkpoint = load_checkpoint(encoder.checkpoint_path)
    model = {"SASRec": SASRec, "BERT4Rec": BERT4Rec}[checkpoint["config"]["model"]](checkpoint["config"], dataset)
    model.load_state_dict(checkpoint["state_dict"])
    return model.eval()


def assert_refused(config, dataset, *fragments):
    with pytest.raises(RecBoleLLMError) as error:
        CollaborativeEncoder(config, dataset)
    message = str(error.value)
    assert "\n" not in message
    for fragment in fragments:
        assert fragment in message


def test_trains_once_then_reuses_the_cached_checkpoint(workdir, tiny, sasrec, monkeypatch, caplog):
    _, dataset, _ = tiny
    assert os.path.dirname(sasrec.checkpoint_path) == str(workdir / "saved")
    assert os.path.basename(sasrec.checkpoint_path).startswith("cf-SASRec-ml-100k-tiny-")
    assert not [name for name in os.listdir(workdir / "saved") if name.endswith(".partial")]
    assert load_checkpoint(sasrec.checkpoint_path)["item_id_fingerprint"] == item_id_fingerprint(dataset)
    assert (sasrec.n_items, sasrec.hidden_size) == (dataset.item_num, 32)

    def no_training(*args, **kwargs):
        raise AssertionError("trained again instead of reusing the cached checkpoint")

    monkeypatch.setattr(recbole.trainer.Trainer, "fit", no_training)
    monkeypatch.setattr(sys, "argv", ["run_recbole_llm.py", "--learning_rate=0.5", "--hidden_size=8"])  # for the LLM
    caplog.set_level(logging.INFO)
    again = cached_encoder(make_config(workdir), dataset)
    assert again.checkpoint_path == sasrec.checkpoint_path
    assert "reusing" in caplog.text
    assert torch.equal(again.item_embeddings, sasrec.item_embeddings)


def test_cache_key_follows_the_cf_settings_not_the_llm_ones(workdir, tiny, sasrec):
    _, dataset, _ = tiny

    def cache_path(**settings):
        return cached_checkpoint_path(cf_training_config(make_config(workdir, **settings)), dataset)

    assert cache_path() == sasrec.checkpoint_path
    # the LLM model's own training settings
    assert cache_path(learning_rate=0.5, hidden_dropout_prob=0.1, stopping_step=10) == sasrec.checkpoint_path
    assert cache_path(model="RSLLM") == sasrec.checkpoint_path  # both models share one CF model
    assert cache_path(cf_config={**TINY_CF, "n_layers": 2}) != sasrec.checkpoint_path
    assert cache_path(cf_config={**TINY_CF, "seed": 7}) != sasrec.checkpoint_path
    # one CF model per seed of the run: a comparison over seeds has the CF model's spread in it
    assert cache_path(seed=7) != sasrec.checkpoint_path
    assert cf_training_config(make_config(workdir, seed=7))["seed"] == 7
    assert cache_path(MAX_ITEM_LIST_LENGTH=10) != sasrec.checkpoint_path  # the data


def test_the_cf_model_trains_with_its_own_defaults_and_cf_config(workdir):
    llm_config = make_config(workdir, stopping_step=10, learning_rate=0.5, cf_config={**TINY_CF, "stopping_step": 2})
    cf_config = cf_training_config(llm_config)
    sasrec_defaults = Config(model="SASRec", dataset=TINY_DATASET, config_dict={"data_path": DATA_PATH})
    assert cf_config["model"] == "SASRec" and cf_config["stopping_step"] == 2 and cf_config["epochs"] == 1
    assert cf_config["learning_rate"] == sasrec_defaults["learning_rate"] != 0.5
    assert cf_config["MAX_ITEM_LIST_LENGTH"] == 20 and cf_config["eval_args"] == llm_config["eval_args"]


def test_sasrec_states_match_recboles_forward(tiny, sasrec):
    _, dataset, batch = tiny
    item_seq, item_len = batch["item_id_list"], batch["item_length"]
    states, valid, last = sasrec.encode(item_seq, item_len)
    reference = recbole_model(sasrec, dataset)

    assert torch.equal(last, reference(item_seq, item_len))
    assert torch.allclose(last @ sasrec.item_embeddings.T, reference.full_sort_predict(batch), atol=1e-6)
    items = torch.randint(1, dataset.item_num, (len(item_seq), 5))  # any items of each row, as its ranking scores them
    assert torch.allclose(sasrec.item_scores(item_seq, item_len, items),
                          reference.full_sort_predict(batch).gather(1, items), atol=1e-6)
    assert states.shape == (len(item_seq), 20, 32) and torch.equal(valid, item_seq > 0)
    assert torch.equal(states[torch.arange(len(item_seq)), item_len - 1], last)
    assert not states[~valid].any()
    assert item_len.min() == 1  # the batch holds one-item histories too


def test_bert4rec_states_end_at_the_mask_token_after_the_last_item(tiny, bert4rec):
    _, dataset, batch = tiny
    item_seq, item_len = batch["item_id_list"], batch["item_length"]
    states, valid, last = bert4rec.encode(item_seq, item_len)
    reference = recbole_model(bert4rec, dataset)
    full = item_len == item_seq.shape[1]
    assert full.any() and (item_len == 1).any()  # the batch holds full and one-item histories

    masked_seq, mask_position = bert4rec.with_mask_token(item_seq, item_len)
    rows = torch.arange(len(item_seq))
    assert torch.equal(masked_seq[rows, mask_position], torch.full_like(item_len, reference.mask_token))
    assert torch.equal(masked_seq[~full][:, :-1].masked_fill(masked_seq[~full][:, :-1] == reference.mask_token, 0),
                       item_seq[~full][:, :-1])  # a history with room keeps every item, its oldest included
    assert torch.equal(masked_seq[full], reference.reconstruct_test_data(item_seq, item_len)[full])
    assert torch.equal(last, states[rows, mask_position])
    assert torch.equal(last, reference.gather_indexes(reference(masked_seq), mask_position))
    scores = last @ bert4rec.item_embeddings.T + reference.output_bias
    assert torch.allclose(scores[full], reference.full_sort_predict(batch)[full], atol=1e-5)  # RecBole's, when full
    items = torch.randint(1, dataset.item_num, (len(item_seq), 5))
    assert torch.allclose(bert4rec.item_scores(item_seq, item_len, items), scores.gather(1, items), atol=1e-5)
    assert bert4rec.item_embeddings.shape == (dataset.item_num, 32)  # the mask token's row left out
    assert states.shape == (len(item_seq), 20, 32)
    assert torch.equal(valid.sum(dim=1), torch.where(full, item_len, item_len + 1))  # the items and the mask token
    assert not states[~valid].any()


def test_encoder_is_frozen(tiny, sasrec):
    _, _, batch = tiny
    parent = nn.ModuleDict({"collaborative": sasrec, "head": nn.Linear(32, 1)})
    parent.train()
    assert not any(module.training for module in sasrec.modules())
    assert parent["head"].training
    assert not any(parameter.requires_grad for parameter in sasrec.parameters())
    outputs = sasrec.encode(batch["item_id_list"], batch["item_length"])
    assert all(output.grad_fn is None for output in outputs)
    assert not sasrec.item_embeddings.requires_grad


def test_construction_leaves_the_random_state_alone(workdir, tiny, sasrec):
    _, dataset, _ = tiny
    config = make_config(workdir, cf_checkpoint=sasrec.checkpoint_path)
    torch.manual_seed(0), np.random.seed(0), random.seed(0)
    expected = torch.rand(3), np.random.rand(3), random.random()
    torch.manual_seed(0), np.random.seed(0), random.seed(0)
    CollaborativeEncoder(config, dataset)
    assert torch.equal(torch.rand(3), expected[0])
    assert np.array_equal(np.random.rand(3), expected[1]) and random.random() == expected[2]


def test_refuses_a_checkpoint_of_another_dataset(workdir, tiny):
    _, dataset, _ = tiny
    folder = workdir / "data" / "ml-100k-small"
    folder.mkdir(parents=True)
    inter = pd.read_csv(os.path.join(DATA_PATH, "ml-100k-tiny", "ml-100k-tiny.inter"), sep="\t", dtype=str)
    inter[inter["user_id:token"].astype(int) <= 100].to_csv(folder / "ml-100k-small.inter", sep="\t", index=False)
    small_config = make_config(workdir, model="SASRec", dataset="ml-100k-small", data_path=str(workdir / "data"))
    small_dataset = create_dataset(small_config)
    path = str(workdir / "small.pth")
    save_recbole_checkpoint(small_config, SASRec(small_config, small_dataset), path)

    assert_refused(
        make_config(workdir, cf_checkpoint=path, trust_checkpoint=True), dataset,
        f"trained on ml-100k-small ({small_dataset.item_num} items)", f"uses ml-100k-tiny ({dataset.item_num} items)",
    )


def test_refuses_another_item_id_mapping(workdir, tiny, sasrec):
    _, dataset, _ = tiny
    checkpoint = load_checkpoint(sasrec.checkpoint_path)
    checkpoint["item_id_fingerprint"] = "0" * 40
    path = str(workdir / "remapped.pth")
    save_checkpoint_atomically(checkpoint, path)
    assert_refused(make_config(workdir, cf_checkpoint=path), dataset, path, "item-id mapping")


def test_refuses_a_model_that_is_not_sasrec_or_bert4rec(workdir, tiny):
    _, dataset, _ = tiny
    gru_config = make_config(workdir, model="GRU4Rec")
    path = str(workdir / "gru4rec.pth")
    save_recbole_checkpoint(gru_config, GRU4Rec(gru_config, dataset), path)
    assert_refused(make_config(workdir, cf_checkpoint=path, trust_checkpoint=True), dataset, "GRU4Rec", "not SASRec")


def test_refuses_a_missing_file_another_model_and_another_hidden_size(workdir, tiny, sasrec, bert4rec):
    _, dataset, _ = tiny
    missing = str(workdir / "missing.pth")
    assert_refused(make_config(workdir, cf_checkpoint=missing), dataset, missing, "does not exist")
    assert_refused(make_config(workdir, cf_checkpoint=bert4rec.checkpoint_path), dataset, "cf_model=BERT4Rec")
    wider = make_config(workdir, cf_checkpoint=sasrec.checkpoint_path, cf_hidden_size=64)
    assert_refused(wider, dataset, "hidden size 32", "cf_hidden_size is 64")
    assert_refused(make_config(workdir, cf_model="GRU4Rec"), dataset, "cf_model is 'GRU4Rec': use SASRec or BERT4Rec")
    assert_refused(make_config(workdir), dataset, "cf_checkpoint is not set", "build_model")


def test_loads_a_checkpoint_written_by_recboles_stock_trainer_only_with_consent(workdir, tiny, monkeypatch):
    _, dataset, batch = tiny
    monkeypatch.setattr(sys, "argv", ["pytest"])
    path, model = recbole_trainer_checkpoint(workdir / "stock", dataset, MAX_ITEM_LIST_LENGTH=20)
    assert_refused(make_config(workdir, cf_checkpoint=path), dataset, f"checkpoint '{path}' is not plain data",
                   "could run any code", "--trust_checkpoint=True")

    encoder = CollaborativeEncoder(make_config(workdir, cf_checkpoint=path, trust_checkpoint=True), dataset)
    assert torch.equal(encoder.item_embeddings, model.item_embedding.weight.detach())
    item_seq, item_len = batch["item_id_list"], batch["item_length"]
    assert torch.equal(encoder.encode(item_seq, item_len)[2], model.eval()(item_seq, item_len))


def test_bert4rec_reads_an_item_written_as_a_one_item_history(bert4rec):
    """Laser's item prefix: each item alone ([N, 1]) is the item, then the mask token, not the mask token alone."""
    items = torch.tensor([1, 2, 3])
    masked_seq, mask_position = bert4rec.with_mask_token(items[:, None], torch.ones_like(items))
    assert masked_seq.tolist() == [[1, bert4rec.recommender.mask_token], [2, bert4rec.recommender.mask_token],
                                   [3, bert4rec.recommender.mask_token]]
    _, valid, last = bert4rec.encode(items[:, None], torch.ones_like(items))
    assert valid.sum(1).tolist() == [2, 2, 2]
    assert not torch.allclose(last[0], last[1]) and not torch.allclose(last[1], last[2])  # each item its own state
