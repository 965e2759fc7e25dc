"""Cold-start items (cold_item_ratio): a seeded share of the items has no training interaction at all, neither as a
next item nor in a training history, and stays a validation and test target; no training loss of an LLM model has
a cold item among its candidates; every model of the table gets its metrics on exactly the test users whose target
is cold, the CF model an LLM model reads included."""

import pytest
import torch
from recbole.data import create_dataset
from recbole.evaluator import Collector, Evaluator

from conftest import SIZES, TINY_DATASET, tiny_config, tiny_run
from recbole_llm.cf_training import cf_training_config
from recbole_llm.cold_items import cold_items, data_preparation
from recbole_llm.comparison import comparison_rows, with_companions
from recbole_llm.config import Config
from recbole_llm.errors import RecBoleLLMError
from recbole_llm.quick_start import load_data_and_model, run_recbole_llm


def split(workdir, **settings):
    config = Config(model="SASRec", dataset=TINY_DATASET, config_dict=tiny_config(workdir, **settings))
    dataset = create_dataset(config)
    return config, dataset, data_preparation(config, dataset)


def test_cold_items_have_no_training_interaction_and_stay_targets(workdir):
    config, dataset, (train_data, valid_data, test_data) = split(workdir, cold_item_ratio=0.1)
    cold = cold_items(config, dataset)
    assert len(cold) == round(0.1 * (dataset.item_num - 1)) and cold.min() > 0
    assert torch.equal(cold, cold_items(config, create_dataset(config)))  # seeded
    assert not torch.equal(cold, cold_items(Config(model="SASRec", dataset=TINY_DATASET, config_dict=tiny_config(
        workdir, cold_item_ratio=0.1, seed=7)), dataset))
    train = train_data._dataset.inter_feat
    assert not torch.isin(train["item_id"], cold).any() and not torch.isin(train["item_id_list"], cold).any()
    lengths = (train["item_id_list"] > 0).sum(1)
    assert torch.equal(lengths, train["item_length"]) and lengths.min() >= 1
    assert (train["item_id_list"][:, 0] > 0).all()  # the kept items moved up: histories start at position 0
    for data in (valid_data, test_data):
        assert torch.isin(data._dataset.inter_feat["item_id"], cold).sum() > 5
    # each training row is a row of the split without cold items: its next item warm, its history without them
    warm, cold_set = split(workdir)[2][0]._dataset.inter_feat, set(cold.tolist())
    expected = [(history, target) for target, row in zip(warm["item_id"].tolist(), warm["item_id_list"].tolist())
                for history in [[item for item in row if item and item not in cold_set]]
                if target not in cold_set and history]
    assert expected == [([item for item in row if item], target)
                        for target, row in zip(train["item_id"].tolist(), train["item_id_list"].tolist())]
    assert len(train) < len(warm)

    general = Config(model="Pop", dataset=TINY_DATASET, config_dict=tiny_config(workdir, cold_item_ratio=0.1))
    pop_train = data_preparation(general, create_dataset(general))[0]._dataset.inter_feat
    assert not torch.isin(pop_train["item_id"], cold).any()


def test_a_ratio_that_is_not_a_share_is_a_one_line_error(workdir):
    with pytest.raises(RecBoleLLMError, match="cold_item_ratio is 1.5: a share of the items from 0"):
        split(workdir, cold_item_ratio=1.5)


def test_the_cf_model_of_an_llm_model_loses_the_same_items(workdir):
    config = Config(model="Laser", dataset=TINY_DATASET,
                    config_dict=tiny_config(workdir, **SIZES["Laser"], cold_item_ratio=0.1, seed=7))
    cf_config = cf_training_config(config)
    assert cf_config["cold_item_ratio"] == 0.1 and cf_config["seed"] == 7
    dataset = create_dataset(config)
    assert torch.equal(cold_items(cf_config, dataset), cold_items(config, dataset))


@pytest.mark.parametrize("model", ["Laser", "RSLLM"])
def test_no_training_loss_of_an_llm_model_gives_a_cold_item_probability(workdir, cf_checkpoint, model):
    tiny = tiny_run(model, workdir, cf_checkpoint=cf_checkpoint, cold_item_ratio=0.1)
    network = tiny.build()
    cold = cold_items(tiny.config, tiny.train_data._dataset)
    assert torch.equal(network.is_cold_item.nonzero().squeeze(1), cold) and len(cold) > 5
    assert not tiny.build(cold_item_ratio=0).is_cold_item.any()
    batch = next(iter(tiny.train_data))
    network.train()
    if model == "Laser":  # cross-entropy over all items: the cold items' scores get no probability, no gradient
        scored, scores_of = [], network.scores
        network.scores = lambda user_embedding: scored.append(scores_of(user_embedding)) or scored[-1]
        for stage in network.training_stages():
            network.begin_stage(stage.name)
            network.begin_epoch(0)
            scored.clear()
            next_item_loss, _ = network.calculate_loss(batch)
            scored[0].retain_grad()
            next_item_loss.backward()
            warm = ~network.is_cold_item
            warm[0] = False  # padding
            assert (scored[0].grad[:, cold] == 0).all() and (scored[0].grad[:, warm] != 0).all()
    else:  # InfoNCE over the batch's next items and the prompts' candidate lists: every item a loss reads is warm
        read, states_of = [], network.item_states
        network.item_states = lambda items, stage: read.append(items) or states_of(items, stage)
        listed, list_of = [], network.candidate_list
        network.candidate_list = lambda candidates: listed.append(candidates) or list_of(candidates)
        for stage in network.training_stages():
            network.begin_stage(stage.name)
            sum(network.calculate_loss(batch)).backward()
        assert read and not torch.isin(torch.cat(read), cold).any()
        assert listed and not torch.isin(torch.cat(listed).cpu(), cold).any()  # candidate_train_share 1: every prompt


@pytest.mark.parametrize("deep_prefix", [True, False])
def test_laser_with_warm_items_writes_cold_items_without_the_prefix_and_the_others_with_it(
    workdir, cf_checkpoint, deep_prefix
):
    tiny = tiny_run("Laser", workdir, cf_checkpoint=cf_checkpoint, cold_item_ratio=0.1, deep_prefix=deep_prefix)
    laser = tiny.build(item_prefix="warm_items").eval()
    cold = cold_items(tiny.config, tiny.train_data._dataset)
    warm = torch.tensor([item for item in range(1, 40) if item not in cold])
    items = torch.cat([cold[:4], warm[:6], cold[4:6]])  # mixed and unsorted, as no item matrix batch is
    with torch.no_grad():
        rows = laser.item_embedding(items)
        without_prefix = laser.written_items(items, prefixed=False)
        with_prefix = laser.written_items(items, prefixed=True)
    is_cold = torch.isin(items, cold)
    assert torch.allclose(rows[is_cold], without_prefix[is_cold], atol=1e-5)
    assert torch.allclose(rows[~is_cold], with_prefix[~is_cold], atol=1e-5)
    assert not torch.allclose(without_prefix, with_prefix, atol=1e-3)  # the prefix changes an item's row
    assert torch.allclose(laser.item_embedding(cold[:3]), without_prefix[:3], atol=1e-5)  # batches of one kind
    assert torch.allclose(laser.item_embedding(warm[:3]), with_prefix[4:7], atol=1e-5)


@pytest.mark.parametrize("model", ["SASRec", "Laser"])
def test_cold_metrics_are_those_of_the_test_users_of_cold_targets(workdir, cf_checkpoint, model):
    settings = {**SIZES["Laser"], "cf_checkpoint": cf_checkpoint} if model == "Laser" else {}
    result = run_recbole_llm(model, TINY_DATASET, config_dict=tiny_config(workdir, cold_item_ratio=0.1, **settings))
    config, network, dataset, _, _, test_data = load_data_and_model(result["saved_model_file"])
    interaction = test_data._dataset.inter_feat
    is_cold = torch.isin(interaction["item_id"], cold_items(config, dataset))
    assert result["cold_test_result"]["users"] == int(is_cold.sum()) > 5

    # the metrics of the cold rows, computed here from the model's scores of every test user
    network.eval()
    with torch.no_grad():
        if hasattr(network, "begin_evaluation"):
            network.begin_evaluation()
        scores = network.full_sort_predict(interaction[is_cold.nonzero().squeeze(1)]).view(int(is_cold.sum()), -1)
    scores[:, 0] = float("-inf")
    collector, evaluator = Collector(config), Evaluator(config)
    targets = interaction["item_id"][is_cold]
    collector.eval_batch_collect(scores, None, torch.arange(len(targets)), targets)
    expected = evaluator.evaluate(collector.get_data_struct())
    for metric in ("ndcg@10", "recall@10"):
        assert result["cold_test_result"][metric] == pytest.approx(expected[metric], abs=1e-4)

    rows = comparison_rows(with_companions([result]))
    assert rows[0]["cold ndcg@10"] == result["cold_test_result"]["ndcg@10"]
    assert all("cold recall@10" in row for row in rows)  # the CF model's row too
    if model == "Laser":
        assert rows[1]["cold users"] == rows[0]["cold users"]
