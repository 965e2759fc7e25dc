"""Checkpoints that are data, not code (issue 16): every checkpoint a run writes loads with torch's safe loader and
gives its Config back; a file that only the full unpickler reads (RecBole's own trainer's, or one that runs code)
loads only with trust_checkpoint, and without it is refused unread."""

import datetime
import os
import subprocess
import sys

import pytest
import torch
from recbole.data import create_dataset
from recbole.utils import ModelType

from conftest import SIZES, TINY_DATASET, checkpoint_that_runs_code, recbole_trainer_checkpoint, tiny_config
from recbole_llm.checkpoint import CONFIG_BUILDERS, load_checkpoint, save_checkpoint_atomically
from recbole_llm.config import Config
from recbole_llm.errors import RecBoleLLMError
from recbole_llm.quick_start import load_data_and_model, run_recbole_llm

pytestmark = pytest.mark.usefixtures("workdir")
# prints the dataset of each checkpoint named on the command line, read by torch's safe loader
READ_SAFELY = (
    "import sys, torch\n"
    "for path in sys.argv[1:]:\n"
    "    print(torch.load(path, weights_only=True)['config']['final_config_dict']['dataset'])"
)


def kind_of(file_name):
    if file_name.startswith("cf-"):
        return "CF model"
    return "last" if file_name.endswith("-last.pth") else "best"


@pytest.mark.parametrize(
    "model, kinds",
    [("SASRec", ["best", "last"]), ("Laser", ["best", "last", "CF model"]), ("RSLLM", ["best", "last", "CF model"])],
)
def test_every_checkpoint_a_run_writes_loads_with_torchs_safe_loader(tmp_path, model, kinds):
    # no cf_checkpoint: an LLM model's run trains its CF model and caches it beside its own checkpoints
    run_recbole_llm(model=model, dataset=TINY_DATASET, config_dict=tiny_config(tmp_path, **SIZES.get(model, {})))
    names = os.listdir(tmp_path / "saved")
    assert sorted(map(kind_of, names)) == sorted(kinds)
    # a process with torch alone, where nothing the plugin imports could have registered a class as safe
    paths = [str(tmp_path / "saved" / name) for name in names]
    read = subprocess.run([sys.executable, "-c", READ_SAFELY, *paths], capture_output=True, text=True)
    assert read.returncode == 0, read.stderr
    assert read.stdout.split() == [TINY_DATASET] * len(paths)


def test_a_config_comes_back_from_its_checkpoint(tmp_path):
    config = Config(model="Laser", dataset=TINY_DATASET, config_dict=tiny_config(tmp_path, **SIZES["Laser"]))
    path = str(tmp_path / "config.pth")
    save_checkpoint_atomically({"config": config}, path)
    stored = torch.load(path, weights_only=True)["config"]
    assert stored["final_config_dict"]["MODEL_TYPE"] == "SEQUENTIAL" and not set(CONFIG_BUILDERS) & set(stored)

    rebuilt = load_checkpoint(path)["config"]
    assert rebuilt["MODEL_TYPE"] is ModelType.SEQUENTIAL and rebuilt["device"] == config["device"]
    assert {name: value for name, value in vars(rebuilt).items() if name not in CONFIG_BUILDERS} == {
        name: value for name, value in vars(config).items() if name not in CONFIG_BUILDERS
    }
    assert str(rebuilt) == str(config)


def test_a_checkpoint_that_would_run_code_is_refused_unread(tmp_path):
    target = tmp_path / "created-by-the-checkpoint"
    path = checkpoint_that_runs_code(tmp_path / "shared.pth", target)
    for load in (load_checkpoint, load_data_and_model):
        with pytest.raises(RecBoleLLMError) as error:
            load(path)
        assert f"checkpoint '{path}' is not plain data" in str(error.value) and "\n" not in str(error.value)
        assert "could run any code" in str(error.value) and "--trust_checkpoint=True" in str(error.value)
    assert not target.exists()
    load_checkpoint(path, trust_checkpoint=True)  # consent reads it as torch.load always did: its code runs
    assert target.exists()


def test_a_checkpoint_of_recboles_own_trainer_loads_only_with_consent(tmp_path, monkeypatch):
    monkeypatch.setattr(sys, "argv", ["pytest"])
    dataset = create_dataset(Config(model="SASRec", dataset=TINY_DATASET, config_dict=tiny_config(tmp_path)))
    path, model = recbole_trainer_checkpoint(tmp_path, dataset)
    with pytest.raises(RecBoleLLMError, match="is not plain data"):
        load_data_and_model(path)
    config, reloaded, *_ = load_data_and_model(path, trust_checkpoint=True)
    assert config["trust_checkpoint"] and reloaded.state_dict().keys() == model.state_dict().keys()
    for name, weights in reloaded.state_dict().items():
        assert torch.equal(weights, model.state_dict()[name]), name


def test_a_state_that_is_not_data_is_never_written(tmp_path):
    path = tmp_path / "best.pth"
    save_checkpoint_atomically({"weights": torch.ones(3)}, str(path))
    with pytest.raises(RecBoleLLMError, match="would not be plain data: it holds datetime.date"):
        save_checkpoint_atomically({"weights": torch.zeros(3), "day": datetime.date(2026, 1, 1)}, str(path))
    assert os.listdir(tmp_path) == ["best.pth"] and torch.equal(load_checkpoint(str(path))["weights"], torch.ones(3))
