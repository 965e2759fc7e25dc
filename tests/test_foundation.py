"""The plugin frame: RecBole baselines through run_recbole_llm, the comparison table, lookups, data, CLI errors."""

import csv
import os
import shutil
import subprocess
import sys
import warnings

import numpy as np
import pytest
import torch
from recbole.data import create_dataset, data_preparation

from recbole.utils import ModelType

from conftest import TINY_DATASET, tiny_config
from recbole_llm.config import Config, cpu_budget
from recbole_llm.errors import RecBoleLLMError
from recbole_llm.quick_start import load_data_and_model, run_recbole_llm, run_recbole_llms
from recbole_llm.trainer import LLMTrainer
from recbole_llm.utils import get_model, get_trainer

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
METRICS = [f"{m}@{k}" for m in ("recall", "ndcg", "mrr", "hit") for k in (5, 10, 20)]


@pytest.mark.parametrize("model", ["SASRec", "GRU4Rec"])
def test_baseline_trains_and_evaluates_with_full_ranking(tmp_path, model):
    result = run_recbole_llm(model=model, dataset=TINY_DATASET, config_dict=tiny_config(tmp_path))
    assert sorted(result["test_result"]) == sorted(METRICS)
    assert all(0.0 <= v <= 1.0 for v in result["test_result"].values())
    assert result["test_result"]["hit@20"] >= result["test_result"]["hit@5"]
    assert result["test_result"]["hit@10"] > 0  # a trained model ranks some held-out item into the top 10 of ~860
    assert result["trainable_parameters"] > 0 and os.path.isfile(result["saved_model_file"])

    # The best checkpoint reloads (its Config stored as data: tests/test_checkpoint.py) and scores the same.
    config, reloaded, _, _, _, test_data = load_data_and_model(result["saved_model_file"])
    trainer = get_trainer(config["MODEL_TYPE"], model)(config, reloaded)
    assert trainer.evaluate(test_data, load_best_model=True, model_file=result["saved_model_file"]) == result["test_result"]


def test_comparison_table_for_two_models(tmp_path, capsys):
    results = run_recbole_llms(["SASRec", "GRU4Rec"], TINY_DATASET, config_dict=tiny_config(tmp_path))
    printed = capsys.readouterr().out
    tables = [f for f in os.listdir(tmp_path / "saved") if f.startswith("comparison-")]
    assert sorted(os.path.splitext(f)[1] for f in tables) == [".csv", ".csv", ".md"]  # the table, its users' metrics
    with open(tmp_path / "saved" / next(f for f in tables if f.endswith(".csv") and "-users" not in f)) as f:
        rows = list(csv.DictReader(f))
    assert [row["model"] for row in rows] == ["SASRec", "GRU4Rec"]
    for row, result in zip(rows, results):
        assert float(row["test ndcg@10"]) == pytest.approx(result["test_result"]["ndcg@10"])
        assert int(row["trainable params"]) == result["trainable_parameters"]
        assert float(row["best valid NDCG@10"]) == pytest.approx(result["best_valid_score"])
        assert float(row["train time (s)"]) > 0
    assert "| SASRec |" in printed and "| GRU4Rec |" in printed and "test ndcg@10" in printed


def test_plugin_defaults_and_overrides(tmp_path):
    config = Config(model="SASRec", dataset=TINY_DATASET, config_dict=tiny_config(tmp_path))
    assert config["eval_args"]["split"] == {"LS": "valid_and_test"} and config["eval_args"]["order"] == "TO"
    assert config["eval_args"]["mode"] == {"valid": "full", "test": "full"}
    assert config["valid_metric"] == "NDCG@10" and config["topk"] == [5, 10, 20]
    assert config["loss_type"] == "CE" and config["train_neg_sample_args"]["distribution"] == "none"
    yaml_file = tmp_path / "mine.yaml"
    yaml_file.write_text("valid_metric: MRR@10\nlearning_rate: 0.01\n")
    config = Config(model="SASRec", dataset=TINY_DATASET, config_file_list=[str(yaml_file)],
                    config_dict=tiny_config(tmp_path, learning_rate=0.02))
    assert config["valid_metric"] == "MRR@10"  # a user's file wins over the plugin's defaults
    assert config["learning_rate"] == 0.02  # a dict (or --key=value) wins over a file


def test_a_template_setting_stays_text_without_a_python_warning(tmp_path):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")  # RecBole evals it: "{a} ({b})" reads as calling a set
        config = Config(model="SASRec", dataset=TINY_DATASET, config_dict=tiny_config(tmp_path))
    assert not [warning for warning in caught if issubclass(warning.category, SyntaxWarning)]
    assert config["item_text_template"] == "{movie_title} ({release_year})"


def test_model_lookup_plugin_first_then_recbole():
    from recbole.model.sequential_recommender.sasrec import SASRec

    assert get_model("SASRec") is SASRec
    with pytest.raises(RecBoleLLMError, match="unknown model 'Nope'.*sasrec"):
        get_model("Nope")


def test_every_llm_model_trains_with_the_llm_trainer():
    assert get_trainer(ModelType.SEQUENTIAL, "Laser") is LLMTrainer is get_trainer(ModelType.SEQUENTIAL, "RSLLM")
    assert not issubclass(get_trainer(ModelType.SEQUENTIAL, "SASRec"), LLMTrainer)


@pytest.mark.parametrize(
    "settings, llm_layers",
    [
        ({}, 10),  # the default LLM on this CPU: its budget
        ({"llm_layers": None}, None),  # set by the user, even to the default
        ({"llm_path": "tiny-llama"}, None),  # an LLM the user names runs whole
    ],
)
def test_the_cpu_budget_applies_to_the_default_llm_only_where_the_user_set_nothing(tmp_path, settings, llm_layers):
    config = Config(model="Laser", dataset=TINY_DATASET, config_dict=tiny_config(tmp_path, **settings))
    assert config["llm_layers"] == llm_layers
    own_llm = "llm_path" in settings
    assert cpu_budget(config) == ({} if own_llm else {"llm_layers": 10, "cpu_bf16": True} if llm_layers else
                                  {"cpu_bf16": True})
    assert config["cpu_bf16"] is not own_llm  # bf16 autocast where the CPU has bf16 units: the default LLM only
    rsllm = Config(model="RSLLM", dataset=TINY_DATASET, config_dict=tiny_config(tmp_path, **settings))
    assert rsllm["llm_layers"] is None  # RSLLM writes titles: its LM head reads the last layer
    rsllm_budget = {"cpu_bf16": True, "gradient_checkpointing": True, "item_tower": "frozen", "center_states": True,
                    "slot_gate_init": 0.0}
    assert cpu_budget(rsllm) == ({} if "llm_path" in settings else rsllm_budget)
    assert [rsllm["item_tower"], rsllm["center_states"], rsllm["gradient_checkpointing"], rsllm["slot_gate_init"]] == (
        ["trained", False, False, 1.0] if "llm_path" in settings else ["frozen", True, True, 0.0]  # the paper's, budget off
    )


def test_numpy2_aliases_make_recbole_metrics_work(tmp_path):
    """RecBole's own compatibility_settings reads np.float_ (gone in NumPy 2); its metrics use np.float."""
    if np.__version__.startswith("1."):
        pytest.fail("this project pins NumPy 2 behaviour; the test environment has NumPy 1")
    Config(model="SASRec", dataset=TINY_DATASET, config_dict=tiny_config(tmp_path))
    from recbole.evaluator.metrics import NDCG

    ndcg = NDCG.__new__(NDCG)
    ndcg.topk = [2]
    value = ndcg.metric_info(np.array([[False, True]]), np.array([1]))
    assert value[0, 1] == pytest.approx(1 / np.log2(3))


def test_no_recbole_quick_start_import():
    """recbole.quick_start imports ray, which fails with NumPy 2 and setuptools >= 82."""
    code = (
        "import sys, recbole_llm, recbole_llm.quick_start, recbole_llm.trainer;"
        "assert 'recbole.quick_start' not in sys.modules and 'ray' not in sys.modules"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=REPO)
    for folder, _, files in os.walk(os.path.join(REPO, "recbole_llm")):
        for name in (f for f in files if f.endswith(".py")):
            with open(os.path.join(folder, name)) as f:
                assert "recbole.quick_start import" not in f.read(), name


def test_item_text_fields_load_with_titles(tmp_path):
    """pandas 3 turns RecBole's token_seq columns (movie_title) into garbage; the pin keeps them words."""
    config = Config(model="SASRec", dataset=TINY_DATASET, config_dict=tiny_config(tmp_path))
    dataset = data_preparation(config, create_dataset(config))[0]._dataset  # the dataset a model is given
    titles = dataset.field2id_token["movie_title"]
    toy_story = dataset.item_feat["movie_title"][dataset.token2id("item_id", "1")]
    assert " ".join(titles[t] for t in toy_story.tolist() if t) == "Toy Story"
    year_id = dataset.item_feat["release_year"][dataset.token2id("item_id", "1")].item()
    assert dataset.field2id_token["release_year"][year_id] == "1995"
    assert "class" in dataset.item_feat.columns


def test_ml_100k_comes_from_the_recbole_wheel(tmp_path):
    config = Config(model="SASRec", dataset="ml-100k", config_dict={"data_path": str(tmp_path / "empty"), "state": "WARNING"})
    assert config["data_path"].endswith(os.path.join("dataset_example", "ml-100k"))
    _, valid_data, _ = data_preparation(config, create_dataset(config))
    assert valid_data._dataset.user_num == 944 and valid_data._dataset.item_num == 1683


def test_missing_dataset_names_where_it_looked(tmp_path):
    with pytest.raises(RecBoleLLMError, match=r"dataset 'nope' not found.*looked in data_path"):
        Config(model="SASRec", dataset="nope", config_dict={"data_path": str(tmp_path)})


def test_bad_config_files_fail_in_one_line(tmp_path):
    with pytest.raises(RecBoleLLMError, match="does not exist"):
        Config(model="SASRec", dataset=TINY_DATASET, config_file_list=[str(tmp_path / "none.yaml")])
    broken = tmp_path / "broken.yaml"
    broken.write_text("epochs: [1, 2\nlearning_rate: 0.1\n")
    with pytest.raises(RecBoleLLMError, match="not valid YAML at line"):
        Config(model="SASRec", dataset=TINY_DATASET, config_file_list=[str(broken)])


def _cli(*args, cwd):
    return subprocess.run(
        [sys.executable, os.path.join(REPO, "run_recbole_llm.py"), *args],
        capture_output=True, text=True, cwd=cwd, env={**os.environ, "PYTHONPATH": REPO},
    )


def test_cli_unknown_model_exits_with_one_line(tmp_path):
    run = _cli("--model=Nope", "--dataset=ml-100k", cwd=tmp_path)
    assert run.returncode != 0
    assert run.stderr.strip().count("\n") == 0 and "unknown model 'Nope'" in run.stderr and "sasrec" in run.stderr


def test_cli_missing_dataset_exits_with_one_line(tmp_path):
    run = _cli("--model=SASRec", "--dataset=nope", f"--data_path={tmp_path}", cwd=tmp_path)
    assert run.returncode == 2 and run.stderr.strip().count("\n") == 0 and "dataset 'nope' not found" in run.stderr


def test_installed_package_finds_its_properties(tmp_path):
    source, target = tmp_path / "source", tmp_path / "site"  # setuptools builds in the source tree: use a copy
    shutil.copytree(REPO, source, ignore=shutil.ignore_patterns(".git", "saved", "log*", "build", "*.egg-info", "data"))
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation", "--target", str(target), str(source)],
        check=True, capture_output=True,
    )
    code = (
        "from recbole_llm.utils import properties_dir; from recbole_llm import Config;"
        f"c = Config(model='SASRec', dataset='{TINY_DATASET}', config_dict={{'data_path': r'{os.path.join(REPO, 'tests', 'data')}'}});"
        "print(properties_dir()); print(c['valid_metric'])"
    )
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path,
                         env={**os.environ, "PYTHONPATH": str(target)})
    assert run.returncode == 0, run.stderr
    where, valid_metric = run.stdout.split()[-2:]
    assert where.startswith(str(target)) and valid_metric == "NDCG@10"


def test_model_lookup_leaves_autograd_anomaly_detection_off():
    """RecBole's sine.py switches anomaly detection on at import; left on, every backward pass is ~3x slower."""
    get_model("SASRec")
    assert not torch.is_anomaly_enabled()


@pytest.mark.parametrize(
    "config_file, model, expected",
    [
        ("full.yaml", "SASRec", {"MAX_ITEM_LIST_LENGTH": 50, "train_batches_per_epoch": None}),
        ("laser_paper.yaml", "Laser", {"llm_layers": None, "cf_model": "BERT4Rec"}),
        ("rsllm_full.yaml", "RSLLM", {"llm_layers": None, "max_prompt_items": 10, "candidate_eval": True}),
        ("sharded.yaml", "Laser", {"llm_device_map": "auto", "llm_dtype": "bfloat16"}),
    ],
)
def test_shipped_gpu_settings_files_parse_on_top_of_the_model_defaults(tmp_path, config_file, model, expected):
    config = Config(
        model=model, dataset=TINY_DATASET, config_file_list=[os.path.join(REPO, "properties", config_file)],
        config_dict={"data_path": tiny_config(tmp_path)["data_path"]},
    )
    assert {key: config[key] for key in expected} == expected
