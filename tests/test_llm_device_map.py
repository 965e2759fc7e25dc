"""llm_device_map: the frozen LLM placed by transformers/accelerate, for LLMs larger than one GPU. This machine has no
GPU: "auto" puts all of it on the CPU, and a module offloaded to disk stands in for a second device (accelerate's
hooks, hf_device_map, weights that a parent's .to() must leave where they are)."""

import pytest
import torch
from torch import nn

from conftest import tiny_run
from recbole_llm.errors import RecBoleLLMError
from recbole_llm.llm import load_llm
from recbole_llm.trainer import LLMTrainer

ON_CPU = {"model.embed_tokens": "cpu", "model.layers.0": "cpu", "model.layers.1": "cpu", "model.norm": "cpu",
          "model.rotary_emb": "cpu", "lm_head": "cpu"}
SECOND_LAYER_ON_DISK = {**ON_CPU, "model.layers.1": "disk"}
NORM_ON_DISK = {**ON_CPU, "model.norm": "disk"}


pytestmark = pytest.mark.usefixtures("workdir")


def build(model_name, device_map, workdir, cf_checkpoint, **settings):
    """A model built as a run builds it, its LLM placed by device_map, and its tiny run."""
    run = tiny_run(model_name, workdir, llm_device_map=device_map, cf_checkpoint=cf_checkpoint, **settings)
    return run.build(), run


def test_auto_without_gpus_puts_the_llm_on_the_cpu():
    backbone = load_llm("tiny-llama", device_map="auto")
    assert {weight.device.type for weight in backbone.model.parameters()} == {"cpu"}
    assert backbone is load_llm("tiny-llama", device_map="auto") and backbone is not load_llm("tiny-llama")


def test_a_dispatched_llm_computes_as_the_whole_one_and_stays_where_accelerate_put_it():
    mapped, whole = load_llm("tiny-llama", device_map=SECOND_LAYER_ON_DISK), load_llm("tiny-llama")
    assert mapped.model.hf_device_map["model.layers.1"] == "disk"
    inputs_embeds = torch.randn(2, 5, 64)
    assert torch.allclose(
        mapped.transformer()(inputs_embeds=inputs_embeds).last_hidden_state,
        whole.transformer()(inputs_embeds=inputs_embeds).last_hidden_state,
    )
    nn.Sequential(mapped.model).to("cpu")  # as RecBole moves a recommender: meta weights cannot move, nor need to
    assert mapped.model.model.layers[1].self_attn.q_proj.weight.is_meta


def test_input_embeddings_off_the_first_device_are_a_one_line_error():
    with pytest.raises(RecBoleLLMError, match="map the embeddings to the first GPU"):
        load_llm("tiny-llama", device_map={**ON_CPU, "model.embed_tokens": "disk", "lm_head": "disk"})


def test_laser_trains_through_a_dispatched_llm(workdir, cf_checkpoint):
    laser, run = build("Laser", SECOND_LAYER_ON_DISK, workdir, cf_checkpoint, stage2_epochs=0, deep_prefix=False)
    suffix_before = laser.suffix_tokens.detach().clone()
    LLMTrainer(run.config, laser).fit(run.train_data, run.valid_data, saved=False)
    assert not torch.equal(laser.suffix_tokens, suffix_before)  # its gradient came back through the disk layer


def test_deep_prefix_on_an_offloaded_layer_is_a_one_line_error(workdir, cf_checkpoint):
    laser, run = build("Laser", SECOND_LAYER_ON_DISK, workdir, cf_checkpoint, stage2_epochs=0)
    with pytest.raises(RecBoleLLMError, match="deep_prefix reads every layer's key/value maps"):
        laser.calculate_loss(next(iter(run.train_data)))


def test_rsllm_trains_lora_beside_the_layers_of_a_dispatched_llm(workdir, cf_checkpoint):
    rsllm, run = build("RSLLM", NORM_ON_DISK, workdir, cf_checkpoint)
    sum(rsllm.calculate_loss(next(iter(run.train_data)))).backward()
    adapter_grads = [weight.grad for name, weight in rsllm.llm.named_parameters() if "lora_B" in name]
    assert adapter_grads and all(grad is not None and grad.abs().sum() > 0 for grad in adapter_grads)


def test_lora_on_an_offloaded_layer_is_a_one_line_error(workdir, cf_checkpoint):
    with pytest.raises(RecBoleLLMError, match="offloads layers that get LoRA adapters"):
        build("RSLLM", SECOND_LAYER_ON_DISK, workdir, cf_checkpoint)
