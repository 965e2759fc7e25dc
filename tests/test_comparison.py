"""Comparisons a reader can trust: per-user metrics whose means are RecBole's, paired intervals and tests checked by
hand, Holm's correction, seeds (each a trained model of its own, the CF model included) and the table they make."""

import csv
import logging
import os
import re
import sys

import numpy as np
import pytest
import torch

import recbole_llm.cf_training as cf_training
from conftest import SIZES, TINY_CF, TINY_DATASET, tiny_config, tiny_run
from recbole_llm.checkpoint import load_checkpoint
from recbole_llm.config import Config
from recbole_llm.quick_start import run_recbole_llms
from recbole_llm.statistics import holm, paired_difference, paired_p_value
from run_recbole_llm import main

INTERVAL = r"[+-]\d\.\d{4} \[[+-]\d\.\d{4}, [+-]\d\.\d{4}\]( \*)?"


def read_csv(path):
    with open(path) as file:
        return list(csv.DictReader(file))


def comparison_files(folder):
    stems = {name.removesuffix(".md") for name in os.listdir(folder) if name.startswith("comparison-")
             and name.endswith(".md")}
    assert len(stems) == 1, stems
    return os.path.join(folder, stems.pop())


# ---- the statistics, on cases computed by hand ---------------------------------------------------------------------


def test_a_known_gain_for_every_user_is_its_own_interval_and_significant():
    reference = np.random.default_rng(0).integers(0, 8, 200) / 8  # eighths: + 0.125 is exact
    difference = paired_difference(reference + 0.125, reference, test="ttest")
    assert difference.mean == difference.low == difference.high == 0.125
    assert difference.p_value == 0.0 and difference.users == 200


def test_the_bootstrap_interval_matches_the_normal_one_for_a_large_sample():
    rng = np.random.default_rng(1)
    reference = rng.random(4000)
    values = reference + rng.normal(0.02, 0.3, 4000)  # per-user gains with noise
    difference = paired_difference(values, reference, resamples=4000)
    gains = values - reference
    half_width = 1.96 * gains.std(ddof=1) / np.sqrt(len(gains))
    assert difference.mean == pytest.approx(gains.mean())
    assert difference.low == pytest.approx(gains.mean() - half_width, abs=0.15 * half_width)
    assert difference.high == pytest.approx(gains.mean() + half_width, abs=0.15 * half_width)
    # the same seed, the same interval
    assert paired_difference(values, reference, resamples=4000).low == difference.low


def test_no_difference_has_p_one_and_an_interval_around_zero():
    reference = np.random.default_rng(2).random(50)
    difference = paired_difference(reference.copy(), reference)
    assert difference.p_value == 1.0 and difference.low == difference.high == 0.0
    noise = np.random.default_rng(3).normal(0, 0.1, 500)
    difference = paired_difference(noise, np.zeros(500))
    assert difference.low < 0 < difference.high


def test_wilcoxon_and_paired_t_against_hand_computed_p_values():
    # |d| ranks 1..5, W- = 3: exactly 5 of the 32 sign patterns have a rank sum <= 3, two-sided 10/32
    assert paired_p_value(np.array([1.0, 2.0, -3.0, 4.0, 5.0]), "wilcoxon") == pytest.approx(10 / 32)
    # d = 1, 2, 3: t = 2 / (1 / sqrt 3), two degrees of freedom: p = 1 - t / sqrt(t^2 + 2)
    t = 2 * np.sqrt(3)
    assert paired_p_value(np.array([1.0, 2.0, 3.0]), "ttest") == pytest.approx(1 - t / np.sqrt(t**2 + 2))


def test_holm_step_down_by_hand():
    # sorted 0.005, 0.01, 0.03, 0.04 times 4, 3, 2, 1: 0.02, 0.03, 0.06, 0.04 -> monotone 0.02, 0.03, 0.06, 0.06
    assert holm([0.01, 0.04, 0.03, 0.005]) == pytest.approx([0.03, 0.06, 0.06, 0.02])
    assert holm([0.2, 0.9]) == pytest.approx([0.4, 0.9])
    assert holm([0.6, 0.9]) == pytest.approx([1.0, 1.0])  # capped at 1, and never below a smaller p's


# ---- a comparison over two seeds, with its table and its users' CSV ------------------------------------------------


@pytest.fixture(scope="module")
def two_seeds(workdir):
    """Pop and SASRec on the tiny data, seeds 2020 and 2021, compared with both; the candidate protocol on 50 users."""
    folder = workdir / "two-seeds"
    config = tiny_config(folder, candidate_eval=True, n_candidate_users=50)
    results = run_recbole_llms(["Pop", "SASRec"], TINY_DATASET, config_dict=config, seeds=[2020, 2021],
                               references=["Pop", "SASRec"])
    return results, comparison_files(folder / "saved")


def test_each_users_metrics_average_to_the_metric_recbole_reports(two_seeds):
    results, _ = two_seeds
    assert [(r["model"], r["seed"]) for r in results] == [("Pop", 2020), ("SASRec", 2020), ("Pop", 2021),
                                                          ("SASRec", 2021)]
    for result in results:
        per_user = result["test_per_user"]
        assert len(per_user["user_id"]) == len(set(per_user["user_id"])) == 300  # every test user once
        for metric, value in result["test_result"].items():  # Pop's many ties broken as RecBole breaks them
            users = result["test_per_user" if metric in per_user else "candidate_per_user"]
            if metric in ("hr@1_candidates", "valid_ratio"):  # kept per user as their product, hr@1_x_valid_ratio
                continue
            assert users[metric].mean() == pytest.approx(value, abs=1e-6), metric
            assert np.all((users[metric] >= 0) & (users[metric] <= 1))


def test_the_users_csv_holds_every_user_run_and_metric(two_seeds):
    results, stem = two_seeds
    rows = read_csv(stem + "-users.csv")
    assert list(rows[0]) == ["user_id", "model", "seed", "metric", "value"]
    # runs x (every test user x ndcg@10, recall@10 + the candidate protocol's users x its two hit metrics)
    assert len(rows) == 4 * (300 * 2 + 50 * 2)
    sasrec_2021 = {row["user_id"]: float(row["value"]) for row in rows
                   if row["model"] == "SASRec" and row["seed"] == "2021" and row["metric"] == "ndcg@10"}
    per_user = results[3]["test_per_user"]
    assert sasrec_2021 == pytest.approx(dict(zip(per_user["user_id"], per_user["ndcg@10"])))


def test_every_seed_asks_the_candidate_protocol_of_the_same_users_and_candidates(two_seeds):
    results, stem = two_seeds
    users = [list(r["candidate_per_user"]["user_id"]) for r in results]
    assert len(users[0]) == 50 and all(u == users[0] for u in users)  # candidate_seed's draw, not the run's seed
    sasrec = next(row for row in read_csv(stem + ".csv") if row["model"] == "SASRec")
    assert re.fullmatch(INTERVAL, sasrec["Δ hr@1_x_valid_ratio vs Pop"])


def test_the_table_shows_mean_and_std_over_seeds_and_the_csv_every_seed(two_seeds):
    results, stem = two_seeds
    rows = read_csv(stem + ".csv")
    assert [(row["model"], row["seed"]) for row in rows] == [
        ("Pop", "2020,2021"), ("SASRec", "2020,2021"), ("Pop", "2020"), ("SASRec", "2020"), ("Pop", "2021"),
        ("SASRec", "2021")]
    for summary, seeds in ((rows[0], results[0::2]), (rows[1], results[1::2])):
        values = [r["test_result"]["ndcg@10"] for r in seeds]
        assert float(summary["test ndcg@10"]) == pytest.approx(np.mean(values))  # the mean is the mean
        assert float(summary["test ndcg@10 std"]) == pytest.approx(np.std(values, ddof=1))
    markdown = open(stem + ".md").read()
    header = markdown.splitlines()[0]
    assert header.startswith("| model | Δ ndcg@10 vs Pop | Δ ndcg@10 vs SASRec | Δ recall@10 vs Pop |")
    sasrec = next(line for line in markdown.splitlines() if line.startswith("| SASRec |")).split(" | ")
    assert re.fullmatch(INTERVAL, sasrec[1]) and sasrec[2] == "reference"
    assert re.search(r"\| \d\.\d{4} ± \d\.\d{4} \|", markdown)  # mean ± std
    assert "Holm" in markdown and "Seeds: 2020, 2021" in markdown and "threads" in markdown


def test_the_difference_columns_are_the_paired_statistics_of_the_users_averaged_over_seeds(two_seeds):
    results, stem = two_seeds
    summary = read_csv(stem + ".csv")[1]  # SASRec
    users = ndcg_over_seeds(results)
    expected = paired_difference(users["SASRec"], users["Pop"])
    assert float(summary["Δ ndcg@10 vs Pop low"]) == pytest.approx(expected.low)
    assert float(summary["Δ ndcg@10 vs Pop high"]) == pytest.approx(expected.high)
    assert float(summary["Δ ndcg@10 vs Pop p"]) == pytest.approx(expected.p_value)
    assert summary["Δ ndcg@10 vs Pop"].startswith(f"{expected.mean:+.4f} [")


def ndcg_over_seeds(results):
    """{model: each test user's NDCG@10 averaged over its seeds, users in id order}, computed here by hand."""
    users = {}
    for result in results:
        order = np.argsort(result["test_per_user"]["user_id"])
        users.setdefault(result["model"], []).append(result["test_per_user"]["ndcg@10"][order])
    return {model: np.mean(seeds, axis=0) for model, seeds in users.items()}


# ---- seeds of an LLM model: a trained model, and a CF model, per seed ---------------------------------------------


def test_two_seeds_train_two_models_each_on_a_cf_model_of_its_own(workdir):
    folder = workdir / "laser-seeds"
    results = run_recbole_llms(["Laser"], TINY_DATASET, config_dict=tiny_config(folder, **SIZES["Laser"]),
                               seeds=[2020, 2021])
    first, second = (load_checkpoint(r["saved_model_file"])["state_dict"] for r in results)
    assert first.keys() == second.keys()
    assert any(not torch.equal(first[key], second[key]) for key in first)
    cf_models = sorted(name for name in os.listdir(folder / "saved") if name.startswith("cf-SASRec"))
    assert len(cf_models) == 2  # the CF model trained once per seed, cached per seed
    rows = read_csv(comparison_files(folder / "saved") + ".csv")
    assert [(row["model"], row["seed"]) for row in rows[:2]] == [("Laser", "2020,2021"),
                                                               ("SASRec (CF model of Laser)", "2020,2021")]
    assert float(rows[0]["test ndcg@10"]) == pytest.approx(np.mean([r["test_result"]["ndcg@10"] for r in results]))
    # Laser against the CF model it reads, each user's NDCG@10 averaged over the seeds first
    users = ndcg_over_seeds(results + [companion for r in results for companion in r["companions"]])
    expected = paired_difference(users["Laser"], users["SASRec (CF model of Laser)"])
    assert re.fullmatch(INTERVAL, rows[0]["Δ ndcg@10 vs its CF model"])
    assert float(rows[0]["Δ ndcg@10 vs its CF model low"]) == pytest.approx(expected.low)
    assert float(rows[0]["Δ ndcg@10 vs its CF model p"]) == pytest.approx(expected.p_value)
    assert rows[1]["Δ ndcg@10 vs its CF model"] == ""  # the CF model's own row has no CF model


def test_the_cf_models_own_row_caches_its_first_epochs_as_the_cf_model_a_later_row_reads(workdir, monkeypatch):
    """--model=SASRec,Laser trains SASRec once: the row's best of its first cf_config epochs is the CF model, the same
    weights a CF training of its own gives; a row that trains otherwise caches nothing."""
    folder, alone = workdir / "cf-from-row", workdir / "cf-alone"
    laser = {**SIZES["Laser"], "cf_config": {**TINY_CF, "epochs": 2}}
    row = {key: TINY_CF[key] for key in ("hidden_size", "inner_size", "n_layers", "train_batch_size")}
    trained = []
    monkeypatch.setattr(cf_training, "train_into_cache", lambda *args: trained.append(args))
    results = run_recbole_llms(["SASRec", "Laser"], TINY_DATASET, config_dict=tiny_config(folder),
                               model_config_dicts={"SASRec": {**row, "epochs": 3}, "Laser": laser})
    assert trained == []  # Laser read the row's SASRec: no CF model was trained for it
    monkeypatch.undo()
    run = tiny_run("Laser", alone, cf_config=laser["cf_config"])
    own = load_checkpoint(cf_training.trained_checkpoint(run.config, run.train_data._dataset))
    [name] = [name for name in os.listdir(folder / "saved") if name.startswith("cf-SASRec")]
    assert os.listdir(alone / "saved").count(name) == 1  # the same cache key
    cached = load_checkpoint(folder / "saved" / name)
    assert cached["state_dict"].keys() == own["state_dict"].keys()
    assert all(torch.equal(cached["state_dict"][key], own["state_dict"][key]) for key in own["state_dict"])
    assert cached["config"]["epochs"] == 2 and cached["item_id_fingerprint"] == own["item_id_fingerprint"]

    cf_config = cf_training.cf_training_config(run.config)

    def sasrec(**settings):
        return Config(model="SASRec", dataset=TINY_DATASET, config_dict=tiny_config(folder, **{**row, **settings}))
    assert cf_training.trains_alike(sasrec(epochs=3), cf_config)
    assert not cf_training.trains_alike(sasrec(epochs=1), cf_config)  # fewer epochs than the CF model's
    assert not cf_training.trains_alike(sasrec(epochs=3, hidden_size=64), cf_config)
    assert not cf_training.trains_alike(sasrec(epochs=3, learning_rate=0.01), cf_config)


# ---- the command line ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "arguments, fragment",
    [
        (["--model=Pop,SASRec", "--reference=BPR"], "reference BPR is not among the compared models"),
        (["--model=Pop", "--seeds=2020,x"], "--seeds=2020,x: give whole numbers"),
        (["--model=Pop", "--seeds=2020,2021", "--seed=1"], "--seed with --seeds or --repeats"),
        (["--model=Pop", "--seeds=2020", "--repeats=2"], "give one of them"),
    ],
)
def test_bad_comparison_arguments_fail_before_any_training(tmp_path, monkeypatch, capsys, arguments, fragment):
    monkeypatch.setattr(sys, "argv", ["run_recbole_llm.py", f"--dataset={TINY_DATASET}", *arguments])
    monkeypatch.setattr("recbole_llm.quick_start.run_recbole_llm", lambda *a, **k: pytest.fail("a run started"))
    with pytest.raises(SystemExit) as exit_status:
        main()
    error = capsys.readouterr().err
    assert exit_status.value.code == 2 and error.count("\n") == 1 and fragment in error, error
    assert not (tmp_path / "saved").exists()


def test_the_candidate_protocol_is_compared_per_user_too(workdir):
    folder = workdir / "candidates"
    results = run_recbole_llms(["Pop", "SASRec"], TINY_DATASET, config_dict=tiny_config(
        folder, candidate_eval=True, n_candidates=5, n_candidate_users=50))
    pop, sasrec = (result["candidate_per_user"] for result in results)
    assert list(pop["user_id"]) == list(sasrec["user_id"]) and len(pop["user_id"]) == 50  # the same users, in order
    assert sasrec["hr@1_ranked"].mean() == pytest.approx(results[1]["test_result"]["hr@1_ranked"])
    stem = comparison_files(folder / "saved")
    row = read_csv(stem + ".csv")[1]
    expected = paired_difference(sasrec["hr@1_x_valid_ratio"], pop["hr@1_x_valid_ratio"])
    assert float(row["Δ hr@1_x_valid_ratio vs Pop low"]) == pytest.approx(expected.low)
    assert "the candidate protocol's: 50" in open(stem + ".md").read()
    metrics = {row["metric"] for row in read_csv(stem + "-users.csv")}
    assert metrics == {"ndcg@10", "recall@10", "hr@1_x_valid_ratio", "hr@1_ranked"}


def test_each_model_of_a_comparison_logs_into_its_own_file(tmp_path, monkeypatch):
    """RecBole's init_logger adds no handler to a root logger that has one: every model logged into the first's file."""
    monkeypatch.setattr(logging.getLogger(), "handlers", [])  # as in a fresh process, without pytest's capture
    run_recbole_llms(["Pop", "SASRec"], TINY_DATASET, config_dict=tiny_config(tmp_path, state="INFO"))
    logs = {model: (tmp_path / "log" / model).glob("*.log") for model in ("Pop", "SASRec")}
    logs = {model: [path.read_text() for path in paths] for model, paths in logs.items()}
    assert [len(texts) for texts in logs.values()] == [1, 1]
    pop_log, sasrec_log = logs["Pop"][0], logs["SASRec"][0]
    assert "INFO  SASRec(" in sasrec_log and "epoch 0 training" in sasrec_log and "Pop(" not in sasrec_log
    assert "INFO  Pop(" in pop_log and "SASRec(" not in pop_log and pop_log.count("epoch 0 training") == 1
