"""Resuming interrupted runs: Laser, RSLLM and a RecBole baseline, stopped by Ctrl-C after an epoch and resumed
with --resume from the run's last checkpoint (one as recbole_llm wrote it before its checkpoints were data, with
--trust_checkpoint), end with exactly the metrics of the run that was never stopped; and checkpoint writes are
atomic."""

import hashlib
import os

import numpy as np
import pytest
import torch
from recbole.model.sequential_recommender.sasrec import SASRec

from conftest import LASER_SIZES, RSLLM_SIZES, TINY_DATASET, tiny_config
from recbole_llm.checkpoint import load_checkpoint, save_checkpoint_atomically
from recbole_llm.errors import RecBoleLLMError
from recbole_llm.model.sequential_recommender.laser import FROZEN_ITEMS, REFRESHED_ITEMS, Laser
from recbole_llm.model.sequential_recommender.rsllm import TEXT_ONLY, UNIFIED, RSLLM
from recbole_llm.quick_start import run_recbole_llm

SETTINGS = {
    "Laser": {**LASER_SIZES, "stage1_epochs": 2, "stage2_epochs": 2},
    "RSLLM": {**RSLLM_SIZES, "stage1_epochs": 1, "stage2_epochs": 2},
    "SASRec": {"epochs": 3},
    "Laser with item_grad_negatives": {**LASER_SIZES, "stage1_epochs": 2, "stage2_epochs": 2, "item_grad_negatives": 3},
}
MODEL_CLASSES = {"Laser": Laser, "RSLLM": RSLLM, "SASRec": SASRec}

pytestmark = pytest.mark.usefixtures("workdir")


def run(label, checkpoint_root, cf_checkpoint, **overrides):
    """The run of SETTINGS[label]: the model its label starts with."""
    model = label.split()[0]
    settings = {**SETTINGS[label], **({"cf_checkpoint": cf_checkpoint} if model != "SASRec" else {}), **overrides}
    return run_recbole_llm(model=model, dataset=TINY_DATASET, config_dict=tiny_config(checkpoint_root, **settings))


@pytest.fixture(scope="module")
def uninterrupted(workdir, cf_checkpoint):
    """The result of each model's run that nothing stopped, computed on first use."""
    results = {}

    def result(model):
        if model not in results:
            results[model] = run(model, workdir / f"uninterrupted-{model}", cf_checkpoint)
        return results[model]

    return result


def interrupt_at(monkeypatch, model_class, stage, epoch):
    """Ctrl-C at the first batch of `epoch` (counted from 0) of `stage`, as a user would press it."""
    current = {"epoch": -1}
    begin_epoch, calculate_loss = model_class.begin_epoch, model_class.calculate_loss

    def recording_begin_epoch(self, epoch_idx):
        current["epoch"] = epoch_idx
        return begin_epoch(self, epoch_idx)

    def interrupted_calculate_loss(self, interaction):
        if (self.stage, current["epoch"]) == (stage, epoch):
            raise KeyboardInterrupt
        return calculate_loss(self, interaction)

    monkeypatch.setattr(model_class, "begin_epoch", recording_begin_epoch)
    monkeypatch.setattr(model_class, "calculate_loss", interrupted_calculate_loss)


def sha1(path):
    with open(path, "rb") as f:
        return hashlib.sha1(f.read()).hexdigest()


def assert_resumed_run_matches(resumed, expected, checkpoint_dir, best_file):
    assert resumed["test_result"] == pytest.approx(expected["test_result"], abs=1e-6)
    assert resumed["best_valid_score"] == pytest.approx(expected["best_valid_score"], abs=1e-6)
    assert resumed["best_valid_result"] == pytest.approx(expected["best_valid_result"], abs=1e-6)
    assert resumed["saved_model_file"] == best_file  # the resumed run goes on with the interrupted run's best file
    assert sorted(os.listdir(checkpoint_dir)) == sorted([os.path.basename(best_file), os.path.basename(last_of(best_file))])
    # the weights at the very end, which the best checkpoint (an earlier epoch, maybe) would not show
    final, expected_final = (load_checkpoint(last_of(result["saved_model_file"])) for result in (resumed, expected))
    assert final["finished"] and final["state_dict"].keys() == expected_final["state_dict"].keys()
    for name, weights in final["state_dict"].items():
        assert torch.allclose(weights, expected_final["state_dict"][name], atol=1e-6), name


def pickle_as_before(path):
    """Rewrites the checkpoint at `path` as recbole_llm wrote it before its checkpoints were data: its Config and
    NumPy's random state pickled, pickle protocol 4."""
    checkpoint = load_checkpoint(path)
    name, keys, *position = checkpoint["random_state"]["numpy"]
    checkpoint["random_state"]["numpy"] = (name, np.array(keys, dtype=np.uint32), *position)
    torch.save(checkpoint, path, pickle_protocol=4)


def last_of(best_file):
    return str(best_file)[: -len(".pth")] + "-last.pth"


@pytest.mark.parametrize(
    "model, stage, epoch, written_before",
    [
        ("Laser", REFRESHED_ITEMS, 1, False),  # within stage 1: the item matrix of the last validation goes on
        ("Laser with item_grad_negatives", REFRESHED_ITEMS, 1, False),  # the same draws of items written with gradient
        ("Laser", FROZEN_ITEMS, 1, False),  # within stage 2: the frozen item matrix comes back from the checkpoint
        ("RSLLM", UNIFIED, 0, False),  # at the start of stage 2: stage 1 is over, stage 2 starts from the best weights
        ("Laser", FROZEN_ITEMS, 1, True),  # a resume point as recbole_llm wrote it before: resumed with consent
    ],
)
def test_interrupted_then_resumed_run_ends_as_the_uninterrupted_one(
    model, stage, epoch, written_before, tmp_path, cf_checkpoint, uninterrupted, monkeypatch, caplog
):
    expected = uninterrupted(model)
    with monkeypatch.context() as patch:
        interrupt_at(patch, MODEL_CLASSES[model.split()[0]], stage, epoch)
        with pytest.raises(KeyboardInterrupt):
            run(model, tmp_path, cf_checkpoint)
    checkpoint_dir = tmp_path / "saved"
    [last_file] = [name for name in os.listdir(checkpoint_dir) if name.endswith("-last.pth")]
    last = load_checkpoint(str(checkpoint_dir / last_file))
    stages = [TEXT_ONLY, UNIFIED] if model == "RSLLM" else [REFRESHED_ITEMS, FROZEN_ITEMS]
    if epoch > 0:  # the state after the epoch before
        assert (last["stage"], last["epoch"], last["finished"]) == (stage, epoch - 1, False)
    else:  # the state at the end of the stage before
        assert (last["stage"], last["finished"]) == (stages[stages.index(stage) - 1], True)
    assert {"optimizer", "scheduler", "random_state", "best_valid_score", "best_valid_result"} <= set(last)
    assert f"interrupted: --resume={checkpoint_dir / last_file} continues this run" in caplog.text

    resume = str(checkpoint_dir / last_file)
    if written_before:
        pickle_as_before(resume)
        with pytest.raises(RecBoleLLMError, match="is not plain data"):
            run(model, tmp_path, cf_checkpoint, resume=resume)
    resumed = run(model, tmp_path, cf_checkpoint, resume=resume, trust_checkpoint=written_before)
    assert_resumed_run_matches(resumed, expected, checkpoint_dir, last["best_model_file"])


def test_a_recbole_baseline_resumes_too(tmp_path, cf_checkpoint, uninterrupted, monkeypatch):
    calls = {"n": 0}
    calculate_loss = SASRec.calculate_loss

    def counted(self, interaction):
        calls["n"] += 1
        return calculate_loss(self, interaction)

    with monkeypatch.context() as patch:
        patch.setattr(SASRec, "calculate_loss", counted)
        expected = uninterrupted("SASRec")
    batches_per_epoch = calls["n"] // SETTINGS["SASRec"]["epochs"]

    def interrupted_in_epoch_2(self, interaction):
        calls["n"] += 1
        if calls["n"] > 2 * batches_per_epoch:
            raise KeyboardInterrupt
        return calculate_loss(self, interaction)

    calls["n"] = 0
    with monkeypatch.context() as patch:
        patch.setattr(SASRec, "calculate_loss", interrupted_in_epoch_2)
        with pytest.raises(KeyboardInterrupt):
            run("SASRec", tmp_path, cf_checkpoint)
    checkpoint_dir = tmp_path / "saved"
    [last_file] = [name for name in os.listdir(checkpoint_dir) if name.endswith("-last.pth")]
    assert load_checkpoint(str(checkpoint_dir / last_file))["epoch"] == 1

    resumed = run("SASRec", tmp_path, cf_checkpoint, resume_checkpoint=str(checkpoint_dir / last_file))
    best_file = str(checkpoint_dir / last_file)[: -len("-last.pth")] + ".pth"
    assert_resumed_run_matches(resumed, expected, checkpoint_dir, best_file)


def test_a_failed_write_leaves_the_previous_checkpoint_whole(tmp_path, monkeypatch):
    path = str(tmp_path / "best.pth")
    save_checkpoint_atomically({"weights": torch.ones(3)}, path)
    before = sha1(path)

    def crash_midway(state, file, **kwargs):
        with open(file, "wb") as f:
            f.write(b"half a checkpoint")
        raise OSError("No space left on device")

    monkeypatch.setattr(torch, "save", crash_midway)
    with pytest.raises(OSError, match="No space left"):
        save_checkpoint_atomically({"weights": torch.zeros(3)}, path)
    assert sha1(path) == before and os.listdir(tmp_path) == ["best.pth"]  # no temporary file left either
    monkeypatch.undo()
    assert torch.equal(load_checkpoint(path)["weights"], torch.ones(3))
