"""cpu_bf16: on a CPU with bf16 matrix units, the LLM models train, compute their item matrices and evaluate under
bf16 autocast, as on a GPU, while their scores, losses and item matrices stay fp32."""

import pytest
import torch

import recbole_llm.environment
from recbole_llm.llm.backbone import load_llm
from recbole_llm.trainer import LLMTrainer
from tests.conftest import tiny_run

pytestmark = pytest.mark.usefixtures("workdir")


def record_dtypes(model):
    """The dtypes the LLM's linear maps output (its residual stream adds in fp32) and those of the full-ranking
    scores, as they are computed."""
    seen = {"llm": set(), "scores": set()}
    llm = model.llm if isinstance(model.llm, torch.nn.Module) else model.llm.model  # Laser holds a frozen wrapper
    for module in llm.modules():
        if isinstance(module, torch.nn.Linear):
            module.register_forward_hook(lambda _, __, output: seen["llm"].add(output.dtype))
    full_sort_predict = model.full_sort_predict

    def recorded(interaction):
        scores = full_sort_predict(interaction)
        seen["scores"].add(scores.dtype)
        return scores

    model.full_sort_predict = recorded
    return seen


@pytest.mark.parametrize("model_name", ["Laser", "RSLLM"])
def test_cpu_bf16_runs_the_llm_in_bf16_and_keeps_scores_and_item_matrix_fp32(
    model_name, workdir, cf_checkpoint, monkeypatch
):
    monkeypatch.setattr(recbole_llm.environment, "cpu_computes_bf16", lambda: True)  # autocast runs on any CPU
    run = tiny_run(model_name, workdir / model_name, cf_checkpoint=cf_checkpoint, cpu_bf16=True, candidate_eval=False)
    model = run.build()
    trainer = LLMTrainer(run.config, model)
    assert trainer.amp_dtype == torch.bfloat16
    seen = record_dtypes(model)

    trainer.fit(run.train_data, run.valid_data, saved=False)
    result = trainer.evaluate(run.test_data, load_best_model=False)

    assert seen["llm"] == {torch.bfloat16} and seen["scores"] == {torch.float32}
    assert model.item_matrix.dtype == torch.float32 and model.item_matrix.norm(dim=-1)[1:].allclose(
        torch.ones(()), atol=1e-3
    )
    assert all(0.0 <= value <= 1.0 for value in result.values())


@pytest.mark.parametrize("setting, has_units, expected", [(False, True, None), (True, False, None)])
def test_without_cpu_bf16_or_without_bf16_units_the_cpu_computes_in_fp32(
    setting, has_units, expected, workdir, cf_checkpoint, monkeypatch
):
    monkeypatch.setattr(recbole_llm.environment, "cpu_computes_bf16", lambda: has_units)
    run = tiny_run("Laser", workdir / "fp32", cf_checkpoint=cf_checkpoint, cpu_bf16=setting)
    assert LLMTrainer(run.config, run.build()).amp_dtype is expected


@pytest.mark.parametrize("autocast", [True, False], ids=["autocast", "no-autocast"])
def test_laser_with_the_llm_held_in_bf16_makes_its_stage_matrix_and_deep_prefix_in_the_llm_s_dtype(
    autocast, workdir, cf_checkpoint, monkeypatch
):
    """As on a GPU (llm_dtype auto: bf16): without stage 1 the item matrix is made when stage 2 begins, outside a
    training step, and the deep prefix's fp32 vectors meet the bf16 key/value maps there."""
    monkeypatch.setattr(recbole_llm.environment, "cpu_computes_bf16", lambda: autocast)
    run = tiny_run("Laser", workdir / f"bf16-{autocast}", cf_checkpoint=cf_checkpoint, cpu_bf16=True,
                   llm_dtype="bfloat16", stage1_epochs=0, deep_prefix=True)
    model = run.build()
    trainer = LLMTrainer(run.config, model)

    trainer.fit(run.train_data, run.valid_data, saved=False)
    result = trainer.evaluate(run.test_data, load_best_model=False)

    assert model.item_matrix.dtype == torch.float32 and model.item_matrix[1:].isfinite().all()
    assert model.item_matrix.norm(dim=-1)[1:].allclose(torch.ones(()), atol=1e-3)
    assert all(0.0 <= value <= 1.0 for value in result.values())


def linear_output_dtypes(llm_module):
    """The dtypes the linear maps of an LLM output, as they are called (a list: how often each was seen)."""
    seen = []
    for module in llm_module.modules():
        if isinstance(module, torch.nn.Linear):
            module.register_forward_hook(lambda _, __, output: seen.append(output.dtype))
    return seen


def test_no_grad_bf16_makes_item_matrix_and_evaluation_with_a_bf16_copy_and_trains_in_fp32(
    workdir, cf_checkpoint, monkeypatch
):
    monkeypatch.setattr(recbole_llm.environment, "cpu_computes_bf16", lambda: True)
    run = tiny_run("Laser", workdir / "no-grad-bf16", cf_checkpoint=cf_checkpoint, no_grad_bf16=True, deep_prefix=True)
    model = run.build()
    trainer = LLMTrainer(run.config, model)
    assert trainer.amp_dtype is None  # training without autocast
    fp32_calls = linear_output_dtypes(model.llm.model)
    bf16_calls = linear_output_dtypes(load_llm(run.config["llm_path"], "cpu", "bfloat16").model)

    trainer.fit(run.train_data, run.valid_data, saved=False)
    assert set(fp32_calls) == {torch.float32} and set(bf16_calls) == {torch.bfloat16}  # training, item matrices
    seen = record_dtypes(model)
    n_training_calls, n_bf16_calls = len(fp32_calls), len(bf16_calls)
    result = trainer.evaluate(run.test_data, load_best_model=False)
    assert len(fp32_calls) == n_training_calls and len(bf16_calls) > n_bf16_calls  # evaluation: the bf16 copy only
    assert seen["scores"] == {torch.float32} and model.item_matrix.dtype == torch.float32
    assert all(0.0 <= value <= 1.0 for value in result.values())

    # the copy's item matrix is the fp32 LLM's to bf16's precision: one row each, unit norm, nearly the same direction
    bf16_matrix = model.compute_item_matrix()[1:]
    decoder, model.run_no_grad_decoder = model.run_no_grad_decoder, None
    fp32_matrix = model.compute_item_matrix()[1:]
    model.run_no_grad_decoder = decoder
    assert not torch.equal(bf16_matrix, fp32_matrix)
    assert (bf16_matrix * fp32_matrix).sum(-1).min() > 0.99


@pytest.mark.parametrize("setting, has_units", [(False, True), (True, False)])
def test_without_no_grad_bf16_or_without_bf16_units_no_bf16_copy_is_made(
    setting, has_units, workdir, cf_checkpoint, monkeypatch
):
    monkeypatch.setattr(recbole_llm.environment, "cpu_computes_bf16", lambda: has_units)
    run = tiny_run("Laser", workdir / "no-copy", cf_checkpoint=cf_checkpoint, no_grad_bf16=setting)
    assert run.build().run_no_grad_decoder is None
