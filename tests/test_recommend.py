"""Recommendations for a person from a saved model (recbole_llm.recommend, run_recbole_llm.py --recommend): by the
dataset's user ids or by a history of item ids or titles, the history's items left out, scored as the full-ranking
evaluation scores; one-line errors for a title that names no item or several, and for an unknown user id."""

import json
import os
import sys

import pytest
import torch

from conftest import SIZES, TESTS_DIR, TINY_DATASET, tiny_config
from recbole_llm.errors import RecBoleLLMError
from recbole_llm.model.abstract_recommender import LLMSequentialRecommender
from recbole_llm.quick_start import load_data_and_model, run_recbole_llm
import recbole_llm.recommend
from recbole_llm.recommend import recommend, user_history
from run_recbole_llm import main

with open(f"{TESTS_DIR}/data/{TINY_DATASET}/{TINY_DATASET}.item") as item_file:  # item id -> "title (year)"
    ITEM_TEXT = {line.split("\t")[0]: "{1} ({2})".format(*line.split("\t")) for line in list(item_file)[1:]}


@pytest.fixture(scope="module")
def saved(workdir, cf_checkpoint):
    """A checkpoint of each model, trained for one short epoch on the tiny data."""
    files = {}
    for model in ("Pop", "SASRec", "Laser"):
        settings = {**SIZES.get(model, {}), "cf_checkpoint": cf_checkpoint} if model == "Laser" else {}
        config_dict = tiny_config(workdir, **settings)
        files[model] = run_recbole_llm(model, TINY_DATASET, config_dict=config_dict)["saved_model_file"]
    return files


@pytest.fixture
def cli(monkeypatch, capsys):
    """Runs `run_recbole_llm.py --recommend=...`; returns (exit status, stdout, stderr)."""

    def run(*arguments):
        monkeypatch.setattr(sys, "argv", ["run_recbole_llm.py", *arguments])
        capsys.readouterr()
        try:
            main()
            status = 0
        except SystemExit as exit_status:
            status = exit_status.code
        out, err = capsys.readouterr()
        return status, out, err

    return run


@pytest.mark.parametrize("model", ["Pop", "SASRec", "Laser"])
def test_the_top_items_of_users_leave_out_their_history(saved, model):
    _, _, dataset, _, _, _ = load_data_and_model(saved[model])
    rows = recommend(saved[model], user_ids=["196", "186"], topk=5)
    assert [(row["user"], row["rank"]) for row in rows] == [(user, rank) for user in ("196", "186") for rank in range(1, 6)]
    for user in ("196", "186"):
        user_rows = [row for row in rows if row["user"] == user]
        scores = [row["score"] for row in user_rows]
        assert scores == sorted(scores, reverse=True)
        user_items = user_history(dataset, int(dataset.token2id(dataset.uid_field, user)))
        seen = {str(token) for token in dataset.id2token(dataset.iid_field, user_items)}
        assert seen and not seen & {row["item_id"] for row in user_rows}
    assert all(row["title"] == ITEM_TEXT[row["item_id"]] for row in rows)


@pytest.mark.parametrize("model", ["SASRec", "Laser"])
def test_a_history_is_scored_as_the_evaluation_scores_it(saved, model, monkeypatch):
    config, network, dataset, _, _, test_data = load_data_and_model(saved[model])
    interaction = next(iter(test_data))[0][:1]
    history = interaction["item_id_list"][0, : interaction["item_length"][0]]
    network.eval()
    with torch.no_grad():
        if isinstance(network, LLMSequentialRecommender):
            network.begin_evaluation()
        expected = network.full_sort_predict(interaction).view(-1)
    expected[0], expected[history] = float("-inf"), float("-inf")
    expected_scores, expected_items = expected.topk(10)

    if isinstance(network, LLMSequentialRecommender):  # the checkpoint's item matrix is reused, not computed
        monkeypatch.setattr(LLMSequentialRecommender, "compute_item_matrix", pytest.fail)
    tokens = [str(token) for token in dataset.id2token(dataset.iid_field, history)]
    rows = recommend(saved[model], history=tokens, topk=10)
    assert [row["item_id"] for row in rows] == [str(token) for token in dataset.id2token(dataset.iid_field, expected_items)]
    assert [row["score"] for row in rows] == pytest.approx(expected_scores.tolist(), rel=1e-4)
    assert {row["user"] for row in rows} == {None}



def test_titles_and_ids_name_the_same_items(saved):
    by_title = recommend(saved["SASRec"], history=["toy story (1995)", "Heat (1995)"], topk=3)
    by_id = recommend(saved["SASRec"], history=["1", "273"], topk=3)
    assert by_title == by_id and "Toy Story (1995)" not in {row["title"] for row in by_title}


def test_the_command_line_writes_a_table_or_json(saved, cli):
    status, out, _ = cli(f"--recommend={saved['SASRec']}", "--user_id=196", "--topk=3")
    assert status == 0 and out.splitlines()[0] == "| user | rank | item id | title | score |" and len(out.splitlines()) == 5
    status, out, _ = cli(f"--recommend={saved['Laser']}", "--history=Toy Story (1995);Heat (1995)", "--format=json")
    rows = json.loads(out)
    assert status == 0 and [row["rank"] for row in rows] == list(range(1, 11))
    assert set(rows[0]) == {"user", "rank", "item_id", "title", "score"}


@pytest.mark.parametrize("arguments, fragments", [
    (["--history=Toy Stori (1995)"], ["no item has the id or title 'Toy Stori (1995)'", "Toy Story (1995)"]),
    (["--history=Chasing Amy (1997)"], ["'Chasing Amy (1997)' is the title of 2 items (item ids 246, 268)"]),
    (["--user_id=196,nobody"], ["user id 'nobody' is not in dataset ml-100k-tiny"]),
    (["--user_id=196", "--history=1"], ["give exactly one of them"]),
])
def test_bad_input_is_one_line(saved, cli, arguments, fragments):
    status, out, err = cli(f"--recommend={saved['SASRec']}", *arguments)
    assert status == 2 and not out and err.startswith("recbole_llm: error: ") and err.count("\n") == 1, err
    assert all(fragment in err for fragment in fragments), err


def test_a_model_of_user_ids_refuses_a_history(saved):
    with pytest.raises(RecBoleLLMError, match="Pop scores the dataset's users by their id"):
        recommend(saved["Pop"], history=["1"])


def test_a_process_loads_a_checkpoint_once_and_again_when_the_file_changes(saved, tmp_path, monkeypatch):
    model_file = tmp_path / "Laser.pth"
    model_file.write_bytes(open(saved["Laser"], "rb").read())
    loads = []
    load = recbole_llm.recommend.load_data_and_model
    monkeypatch.setattr(recbole_llm.recommend, "load_data_and_model", lambda *a, **k: loads.append(a) or load(*a, **k))

    first = recommend(str(model_file), user_ids=["196"], topk=3)
    assert recommend(str(model_file), user_ids=["186"], topk=3) != first and len(loads) == 1
    model_file.write_bytes(model_file.read_bytes())  # the same weights, written again: another version of the file
    os.utime(model_file, ns=(0, 0))
    assert recommend(str(model_file), user_ids=["196"], topk=3) == first and len(loads) == 2
