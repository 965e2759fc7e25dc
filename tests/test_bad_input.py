"""Bad input, the catalogue of issue 7: each case gives one clear line and changes no file that existed before.

Every case runs the command line in-process (``run_recbole_llm.py``'s main, with RecBole's logging at ERROR so that
stderr holds only what the CLI says): exit status 2, one line ``recbole_llm: error: ...`` on stderr, and every file
of the working directory, its ``saved/`` and ``log/`` (pre-filled) and the data unchanged afterwards. Settings
errors come before the LLM loads and the CF model trains; the CF checkpoint here is given, never trained.
"""

import hashlib
import logging
import os
import shutil
import sys

import pytest
import torch
import yaml
from recbole.model.sequential_recommender.sasrec import SASRec
from transformers import BertConfig, GPT2Config

from conftest import SIZES, TESTS_DIR, TINY_DATASET, checkpoint_that_runs_code, tiny_config, tiny_run
from recbole_llm.cf_training import trained_checkpoint
from recbole_llm.checkpoint import load_checkpoint, save_checkpoint_atomically
from recbole_llm.errors import RecBoleLLMError
from recbole_llm.llm.backbone import RANDOM_CONFIGS, clear_llm_cache
from recbole_llm.model.sequential_recommender.laser import REFRESHED_ITEMS, Laser
from recbole_llm.trainer import LLMTrainer
from run_recbole_llm import main

pytestmark = pytest.mark.usefixtures("workdir")


@pytest.fixture
def cli(tmp_path, monkeypatch, capsys, cf_checkpoint):
    """Runs the CLI for a model with the tiny settings and `settings` on top; returns its one error line."""

    def run(model="Laser", dataset=TINY_DATASET, **settings):
        config = {**tiny_config(tmp_path, **SIZES.get(model, {})), "state": "ERROR", **settings}
        if model in ("Laser", "RSLLM"):
            config.setdefault("cf_checkpoint", cf_checkpoint)
        config_file = tmp_path / "run.yaml"
        config_file.write_text(yaml.safe_dump(config))
        before = snapshot(tmp_path)
        monkeypatch.setattr(sys, "argv", ["run_recbole_llm.py", f"--model={model}", f"--dataset={dataset}",
                                          f"--config_files={config_file}"])
        capsys.readouterr()
        with pytest.raises(SystemExit) as exit_status:
            main()
        stderr = capsys.readouterr().err
        assert exit_status.value.code == 2
        assert stderr.startswith("recbole_llm: error: ") and stderr.count("\n") == 1, stderr
        assert unchanged(before, snapshot(tmp_path))
        return stderr

    (tmp_path / "saved").mkdir()
    (tmp_path / "saved" / "Laser-earlier-run.pth").write_bytes(b"an earlier run's checkpoint")
    (tmp_path / "log" / "Laser").mkdir(parents=True)
    (tmp_path / "log" / "Laser" / "earlier-run.log").write_text("an earlier run's log\n")
    return run


@pytest.fixture
def no_llm(monkeypatch):
    """Fails the test if the LLM loads: a settings error must come before it."""

    def refuse(*args, **kwargs):
        raise AssertionError("the LLM was loaded before the error was found")

    monkeypatch.setattr("recbole_llm.llm.backbone.load_llm", refuse)


def snapshot(folder):
    """Every file under folder: its modification time and content hash."""
    files = {}
    for root, _, names in os.walk(folder):
        for name in names:
            path = os.path.join(root, name)
            with open(path, "rb") as f:
                files[path] = (os.stat(path).st_mtime_ns, hashlib.sha1(f.read()).hexdigest())
    return files


def unchanged(before, after):
    return all(after.get(path) == state for path, state in before.items())


# ---- Settings, data and files: each fails before the LLM loads or the CF model trains ----------------------------


def test_unknown_model(cli):
    error = cli(model="Lasr")
    assert "unknown model 'Lasr'" in error and "laser" in error


def test_unknown_dataset(cli, tmp_path):
    assert "dataset 'ml-1k' not found" in cli(dataset="ml-1k", data_path=str(tmp_path))


@pytest.mark.usefixtures("no_llm")
def test_dataset_without_the_item_text_field(cli):
    error = cli(item_text_fields=["brand"], item_text_template="{brand}")
    assert "item_text_fields ['brand'] are not item features" in error and "movie_title, release_year, class" in error


@pytest.mark.usefixtures("no_llm")
def test_items_with_empty_text(cli, tmp_path):
    data_path = tmp_path / "data"
    shutil.copytree(os.path.join(TESTS_DIR, "data", TINY_DATASET), data_path / TINY_DATASET)
    item_file = data_path / TINY_DATASET / f"{TINY_DATASET}.item"
    header, *rows = item_file.read_text().splitlines()
    blank = {rows[i].split("\t")[0] for i in (3, 7)}
    rows = [row.split("\t")[0] + "\t\t\t" if row.split("\t")[0] in blank else row for row in rows]
    item_file.write_text("\n".join([header, *rows]) + "\n")
    error = cli(data_path=str(data_path))
    assert f"2 of {len(rows)} items have no text in item_text_fields" in error
    assert all(item in error for item in blank) and "empty_item_text=id" in error


def cf_checkpoint_of(cf_checkpoint, path, **config_changes):
    checkpoint = load_checkpoint(cf_checkpoint)
    for key, value in config_changes.items():
        checkpoint["config"][key] = value
    save_checkpoint_atomically(checkpoint, path)
    return str(path)


@pytest.mark.usefixtures("no_llm")
def test_cf_checkpoint_of_another_dataset(cli, cf_checkpoint, tmp_path):
    other = cf_checkpoint_of(cf_checkpoint, tmp_path / "sasrec-ml-1m.pth", dataset="ml-1m")
    assert f"cf_checkpoint {other} was trained on ml-1m" in cli(cf_checkpoint=other)


@pytest.mark.usefixtures("no_llm")
def test_cf_checkpoint_with_another_hidden_size(cli):
    assert "has hidden size 32 but cf_hidden_size is 64: set cf_hidden_size=32" in cli(cf_hidden_size=64)


def test_mmap_threshold_that_is_not_a_size(cli):
    assert "mmap_threshold_mb is 'lots': use a size in MB (e.g. 1)" in cli(model="SASRec", mmap_threshold_mb="lots")


def test_gradient_checkpointing_that_is_not_a_switch_or_a_layer_count(cli):
    assert "gradient_checkpointing is 'some': use True (every layer), False, or a number N" in cli(
        gradient_checkpointing="some")


def test_train_batches_per_epoch_that_is_not_a_count(cli):
    assert "train_batches_per_epoch is 0: use a positive number of batches" in cli(model="SASRec",
                                                                                 train_batches_per_epoch=0)


def test_candidate_seed_that_is_not_an_integer(cli):
    assert "candidate_seed is 'first': use an integer" in cli(model="SASRec", candidate_seed="first")


def test_llm_path_that_does_not_exist(cli, tmp_path):
    assert f"llm_path '{tmp_path}/no-such-model' does not exist" in cli(llm_path=str(tmp_path / "no-such-model"))


def test_llm_path_that_is_not_a_causal_lm(cli, tmp_path):
    BertConfig(vocab_size=100, hidden_size=32, num_hidden_layers=1, num_attention_heads=2).save_pretrained(tmp_path / "bert")
    assert "holds a 'bert' model, which is not a decoder-only causal LM" in cli(llm_path=str(tmp_path / "bert"))


@pytest.mark.usefixtures("no_llm")
@pytest.mark.parametrize("model", ["Laser", "RSLLM"])
def test_a_mistyped_llm_path_fails_before_the_cf_model_trains(cli, tmp_path, model, monkeypatch):
    monkeypatch.setattr("recbole_llm.cf_training.train_into_cache", lambda *a: pytest.fail("the CF model trained"))
    assert "llm_path '/nonexistent/model' does not exist" in cli(model=model, cf_checkpoint=None,
                                                                 llm_path="/nonexistent/model")
    BertConfig(vocab_size=100, hidden_size=32, num_hidden_layers=1, num_attention_heads=2).save_pretrained(tmp_path / "bert")
    assert "not a decoder-only causal LM" in cli(model=model, cf_checkpoint=None, llm_path=str(tmp_path / "bert"))
    assert sorted(os.listdir(tmp_path / "saved")) == ["Laser-earlier-run.pth"]  # no cache, no .partial file


def test_a_failed_cf_training_leaves_no_partial_file(tmp_path, monkeypatch):
    run = tiny_run("Laser", tmp_path)

    def fail_after_an_epoch(self, train_data, *args, **kwargs):
        self._train_data = train_data
        self.last_checkpoint_file = f"{self.saved_model_file}-last.partial"
        self._save_checkpoint(0)
        self._save_last_checkpoint(0)
        raise KeyboardInterrupt

    monkeypatch.setattr("recbole_llm.trainer.Trainer.fit", fail_after_an_epoch)
    with pytest.raises(KeyboardInterrupt):
        trained_checkpoint(run.config, run.train_data._dataset)
    assert os.listdir(tmp_path / "saved") == []


@pytest.mark.usefixtures("no_llm")
@pytest.mark.parametrize(
    "model, setting, fragment",
    [
        ("Laser", {"n_query": 0}, "n_query is 0"),
        ("Laser", {"n_experts": -1}, "n_experts is -1"),
        ("RSLLM", {"lora_r": 0}, "lora_r is 0: it must be a positive integer"),
    ],
)
def test_sizes_that_must_be_positive(cli, model, setting, fragment):
    assert fragment in cli(model=model, **setting)


@pytest.mark.usefixtures("no_llm")
@pytest.mark.parametrize("model", ["Laser", "RSLLM"])
def test_a_bad_setting_fails_before_the_cf_model_trains(cli, tmp_path, model):
    assert "stage1_epochs is -1" in cli(model=model, cf_checkpoint=None, stage1_epochs=-1)
    assert not list((tmp_path / "saved").glob("cf-*"))


@pytest.mark.usefixtures("no_llm")
@pytest.mark.parametrize(
    "model, setting, fragment",
    [
        ("RSLLM", {"prompt_template": "This user has watched. Predict the next movie:"}, "must contain {history}"),
        ("RSLLM", {"candidate_template": " Pick one:"}, "must contain {candidates}"),
        ("Laser", {"prompt_item_marker": " >> item"}, "prompt_item_marker is ' >> item': it must hold {index} once"),
        ("Laser", {"item_text_template": "a movie"}, "item_text_template 'a movie' has no placeholder"),
        ("RSLLM", {"detect_anomaly": "yes"}, "detect_anomaly is 'yes': it must be True or False"),
        ("Laser", {"validate_every_stage": "no"}, "validate_every_stage is 'no': it must be True or False"),
        ("RSLLM", {"length_groups": 0}, "length_groups is 0: it must be a positive integer"),
    ],
)
def test_prompt_templates_missing_their_placeholder(cli, model, setting, fragment):
    assert fragment in cli(model=model, **setting)


@pytest.mark.usefixtures("no_llm")
@pytest.mark.parametrize("model", ["Laser", "SASRec"])
def test_resume_from_a_checkpoint_that_does_not_exist(cli, tmp_path, model):
    missing = tmp_path / "saved" / f"{model}-gone-last.pth"
    assert f"checkpoint '{missing}' does not exist" in cli(model=model, resume=str(missing))


@pytest.mark.usefixtures("no_llm")
@pytest.mark.parametrize("setting", ["resume", "cf_checkpoint"])
def test_a_checkpoint_that_would_run_code_is_refused_unread(cli, tmp_path, setting):
    target = tmp_path / "created-by-the-checkpoint"
    path = checkpoint_that_runs_code(tmp_path / "shared.pth", target)
    error = cli(**{setting: path})
    assert f"checkpoint '{path}' is not plain data" in error and "pass --trust_checkpoint=True" in error
    assert not target.exists()


@pytest.mark.usefixtures("no_llm")
def test_resume_from_a_checkpoint_of_another_model_or_dataset(cli, cf_checkpoint, tmp_path):
    # the cached CF model is a SASRec run of ml-100k-tiny written by the plugin's trainer: resumable, by SASRec
    assert "is a checkpoint of model SASRec, but this run's model is Laser" in cli(resume=cf_checkpoint)
    other = cf_checkpoint_of(cf_checkpoint, tmp_path / "SASRec-ml-1m-last.pth", dataset="ml-1m")
    assert "is a checkpoint of dataset ml-1m" in cli(model="SASRec", resume_checkpoint=other)


# ---- During training and evaluation ----------------------------------------------------------------------------


def test_detect_anomaly_names_the_operation_whose_backward_made_a_nan(tmp_path, cf_checkpoint, monkeypatch):
    calculate_loss = Laser.calculate_loss

    def nan_gradient(self, interaction):  # finite loss, nan gradient: 0 * d/dx sqrt(x) at 0 = 0 * inf
        losses = calculate_loss(self, interaction)
        return (losses[0] + 0 * (self.suffix_tokens.sum() * 0).sqrt(), losses[1])

    monkeypatch.setattr(Laser, "calculate_loss", nan_gradient)
    run = tiny_run("Laser", tmp_path, cf_checkpoint=cf_checkpoint, detect_anomaly=True)
    with pytest.raises(RuntimeError, match="Function 'SqrtBackward0' returned nan values"):
        LLMTrainer(run.config, run.build()).fit(run.train_data, saved=False)
    assert not torch.is_anomaly_enabled()  # on for the fit only


def test_nan_gradients_of_a_finite_loss_stop_the_run_at_their_batch(tmp_path, cf_checkpoint, monkeypatch):
    events, calculate_loss = [], Laser.calculate_loss

    def nan_gradient_at_the_second_batch(self, interaction):  # finite loss, nan gradient: 0 * d/dx sqrt(x) at 0
        events.append("batch")
        losses = calculate_loss(self, interaction)
        if len(events) == 2:
            losses = (losses[0] + 0 * (self.suffix_tokens.sum() * 0).sqrt(), losses[1])
        assert torch.isfinite(losses[0])  # the weights the nan gradient wrote are not read: the run stopped first
        return losses

    monkeypatch.setattr(Laser, "calculate_loss", nan_gradient_at_the_second_batch)
    run = tiny_run("Laser", tmp_path, cf_checkpoint=cf_checkpoint)  # 2 batches an epoch
    with pytest.raises(RecBoleLLMError, match=rf"the gradients became nan or inf at batch 1 of epoch 0 in stage "
                                              rf"'{REFRESHED_ITEMS}', under a finite loss, so training stopped"):
        LLMTrainer(run.config, run.build()).fit(run.train_data, saved=False)


def test_nan_loss_stops_the_run_and_keeps_the_last_good_checkpoints(cli, tmp_path, monkeypatch):
    events, written, calculate_loss = [], {}, Laser.calculate_loss

    def nan_from_the_fourth_batch(self, interaction):
        events.append("batch")
        losses = calculate_loss(self, interaction)
        return (losses[0] * float("nan"), losses[1]) if events.count("batch") >= 4 else losses

    def recorded_save(state, path):
        save_checkpoint_atomically(state, path)
        events.append("write")
        written[path] = snapshot_of(path)

    def snapshot_of(path):
        return snapshot(os.path.dirname(path))[path]

    monkeypatch.setattr(Laser, "calculate_loss", nan_from_the_fourth_batch)
    monkeypatch.setattr("recbole_llm.trainer.save_checkpoint_atomically", recorded_save)
    error = cli(stage1_epochs=2)  # 2 batches an epoch: the 4th batch is batch 1 of epoch 1
    assert "nan or inf at batch 1 of epoch 1 in stage 'refreshed_items' (train_loss1 of 2)" in error  # which term
    assert "lower learning_rate (now 0.001)" in error
    best, last = sorted(written, key=lambda path: path.endswith("-last.pth"))
    assert f"the last good checkpoints are kept: {best}, {last}" in error
    batches = [index for index, event in enumerate(events) if event == "batch"]
    assert all(index < batches[3] for index, event in enumerate(events) if event == "write")  # none after the nan
    for path in (best, last):
        assert snapshot_of(path) == written[path]
        checkpoint = load_checkpoint(path)
        assert checkpoint["stage"] == REFRESHED_ITEMS and checkpoint["epoch"] == 0
        assert all(torch.isfinite(weights).all() for weights in checkpoint["state_dict"].values())


def test_nan_loss_of_a_recbole_baseline(cli, monkeypatch):
    monkeypatch.setattr(SASRec, "calculate_loss", lambda self, interaction: torch.tensor(float("nan"), requires_grad=True))
    error = cli(model="SASRec")
    assert "training loss became nan or inf at epoch 0, so training stopped; no checkpoint was written before" in error


@pytest.mark.parametrize(
    "method, advice",
    [
        ("calculate_loss", "while training (train_batch_size=8): lower train_batch_size, e.g. to 4 with "
                           "--grad_accum_steps=2 to keep the effective batch of 8"),
        ("full_sort_predict", "while evaluating (eval_batch_size=300): lower eval_batch_size, e.g. to 150"),
        ("compute_item_matrix", "while computing item embeddings (item_batch_size=431): lower item_batch_size"),
    ],
)
def test_cuda_out_of_memory_names_the_batch_size_to_lower(cli, monkeypatch, method, advice):
    def out_of_memory(*args, **kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    monkeypatch.setattr(Laser, method, out_of_memory)
    assert f"recbole_llm: error: CUDA out of memory {advice}" in cli()


# ---- Histories longer than the LLM's context -------------------------------------------------------------------


@pytest.fixture
def gpt2_with_positions(monkeypatch):
    """tiny-gpt2 (learned positions: beyond them, an index error deep in torch) with n_positions of your choice."""

    def build(n_positions):
        clear_llm_cache()
        monkeypatch.setitem(RANDOM_CONFIGS, "tiny-gpt2", lambda: GPT2Config(n_embd=64, n_layer=2, n_head=4, n_positions=n_positions))

    yield build
    clear_llm_cache()  # no later test may get the short model


def laser_on_tiny_gpt2(cf_checkpoint, tmp_path):
    run = tiny_run("Laser", tmp_path, llm_path="tiny-gpt2", cf_checkpoint=cf_checkpoint)
    return run.build(), run.train_data


def test_histories_longer_than_the_context_lose_their_oldest_items_with_one_warning(
    gpt2_with_positions, cf_checkpoint, tmp_path, caplog
):
    gpt2_with_positions(2048)
    longest = laser_on_tiny_gpt2(cf_checkpoint, tmp_path)[0].user_prompt.longest_prompt_lengths().tolist()
    assert len(longest) == SIZES["Laser"]["max_prompt_items"] == 3
    gpt2_with_positions(longest[1])  # room for two items at their longest, not three
    with caplog.at_level(logging.WARNING):
        model, train_data = laser_on_tiny_gpt2(cf_checkpoint, tmp_path)
    warnings = [record.getMessage() for record in caplog.records if "history items can reach" in record.getMessage()]
    assert len(warnings) == 1 and "\n" not in warnings[0]
    assert f"can reach {longest[2]} tokens, beyond the {longest[1]} positions of tiny-gpt2" in warnings[0]
    assert "keeps the most recent 2 items" in warnings[0]

    batch = next(iter(train_data))
    item_seq, item_len = batch[model.ITEM_SEQ], batch[model.ITEM_SEQ_LEN]
    assert item_len.max() > 2
    prompt = model.user_prompt.assemble(item_seq, item_len, model.llm.input_embeddings())
    assert prompt.input_ids.shape[1] <= longest[1]
    model.eval()
    with torch.no_grad():  # runs: the longest prompt fits the learned positions
        assert torch.isfinite(model.user_embedding(item_seq, item_len)[0]).all()


def test_a_prompt_that_cannot_fit_one_item_is_an_error(cli, gpt2_with_positions):
    gpt2_with_positions(16)
    error = cli(llm_path="tiny-gpt2")
    assert "a prompt of one history item can reach" in error and "beyond the 16 positions of tiny-gpt2" in error
