"""Limits: how close the LLM passes come to what this machine's matrix units can do, measured in one process.

    python -m benchmarks.limits --profile=cpu [--out=benchmarks/results] [--key=value ...]

First the matrix-product rate at the LLM's own shapes (a batch of tokens through its attention and MLP maps:
[tokens, d] x [d, d] and [tokens, d] x [d, d_ff]), in fp32 and in bf16, the best of a few repeats. Then, with the
profile's Laser and RSLLM (its `quality` settings), the passes that cost a run its time:

- the item matrix (Laser): the item prompts of `items` items, taken evenly over the length-sorted catalog, in
  item_batch_size batches as compute_item_matrix runs them; on a CPU with bf16 matrix units, again through the
  copy of the LLM held in bf16 (no_grad_bf16);
- a Laser training step and an RSLLM training step (its unified stage): loss and backward of one training batch;
- RSLLM's reading of candidates: the candidate prompts of `users` users, their greedy answers and each listed
  title's likelihood as the answer, as the candidate protocol asks them.

Each pass runs in the LLM's weight dtype and, where a run would (cpu_bf16 on a CPU with bf16 matrix units), again
under bf16 autocast, its share then taken of the bf16 matmul rate.

For each: tokens through the LLM per second (the decoder's unpadded inputs, every call), the FLOPs torch counts
(FlopCounterMode, a separate run of the same pass) per second of the timed run, and that rate as a share of the
matrix-product rate of the dtype the pass computes in. The profile's `limits` section sets items, users and steps
(timed repeats). Writes limits-<profile>.md and .csv.
"""

import sys
import time

import torch
from recbole.data import create_dataset
from recbole.utils import init_seed
from torch.utils.flop_counter import FlopCounterMode

import recbole_llm.environment as environment
from benchmarks.cost import llm_parts
from benchmarks.report import run_script, write_page
from benchmarks.settings import benchmark_settings
from recbole_llm.cold_items import data_preparation
from recbole_llm.comparison import markdown_table, write_csv
from recbole_llm.config import Config
from recbole_llm.model.candidates import sample_candidates
from recbole_llm.quick_start import build_model

DEFAULTS = {"items": 256, "users": 8, "steps": 2, "matmul_tokens": 2048}
COLUMNS = {
    "pass": "pass", "dtype": "computes in", "tokens": "tokens", "seconds": "seconds", "tokens/s": "tokens/s",
    "GFLOP": "GFLOP", "GFLOP/s": "GFLOP/s", "matmul GFLOP/s": "matmul GFLOP/s (same dtype)", "share": "share of it",
}
MATMUL_COLUMNS = {"shape": "shape", "dtype": "dtype", "GFLOP/s": "GFLOP/s"}


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    profile, out, stamp = benchmark_settings("limits", argv)
    settings = {**DEFAULTS, **(profile.extra.get("limits") or {})}
    laser, laser_data, laser_config = built("Laser", profile, no_grad_bf16=True)  # a bf16 copy where the CPU has units
    bf16_decoder, laser.run_no_grad_decoder = laser.run_no_grad_decoder, None  # the fp32 passes first
    hidden, ffn = llm_widths(laser)
    matmuls = matmul_rates(hidden, ffn, settings["matmul_tokens"], settings["steps"])
    rate = {row["dtype"]: row["GFLOP/s"] for row in matmuls if row["shape"] == "all"}
    steps = settings["steps"]
    laser_passes = {"item matrix (Laser)": item_pass(laser, settings["items"]),
                    "training step (Laser)": training_step(laser, laser_data)}
    rows = passes_as_run(laser_passes, laser, laser_config, steps)
    if bf16_decoder is not None:
        laser.run_no_grad_decoder = bf16_decoder
        rows.append(measured("item matrix (Laser, no_grad_bf16)", laser, item_pass(laser, settings["items"]), steps,
                             decoder=bf16_decoder.__self__))
    del laser, laser_data
    rsllm, rsllm_data, rsllm_config = built("RSLLM", profile)
    rsllm.set_stage("unified")
    rsllm_passes = {"training step (RSLLM, unified)": training_step(rsllm, rsllm_data),
                    "candidate reading (RSLLM)": candidate_reading(rsllm, rsllm_data, settings["users"])}
    rows += passes_as_run(rsllm_passes, rsllm, rsllm_config, steps)
    for row in rows:
        row["matmul GFLOP/s"] = rate[row["dtype"].split()[0]]
        row["share"] = f"{row['GFLOP/s'] / row['matmul GFLOP/s']:.0%}"
    write_results(out, profile, stamp, matmuls, rows)
    return matmuls, rows


def passes_as_run(passes, model, config, steps):
    """Each pass ({label: run}) in its LLM's weight dtype, and again under bf16 autocast where a run computes so
    (LLMTrainer: cpu_bf16 on a CPU with bf16 units), whose share is then of the bf16 matmul rate."""
    rows = [measured(label, model, run, steps) for label, run in passes.items()]
    if config["cpu_bf16"] and environment.cpu_computes_bf16():
        autocast = torch.autocast("cpu", dtype=torch.bfloat16)  # as LLMTrainer.autocast; a decorator too
        rows += [measured(f"{label}, bf16 autocast", model, autocast(run), steps, dtype="bfloat16 autocast")
                 for label, run in passes.items()]
    return rows


def built(model_name, profile, **settings):
    """The profile's model (its quality settings, then `settings`), a training batch and the config, as a run builds
    them."""
    config = Config(model=model_name, dataset=profile.dataset,
                    config_dict=profile.run_config({**profile.quality.get(model_name, {}), **settings}))
    init_seed(config["seed"], config["reproducibility"])
    train_data, _, _ = data_preparation(config, create_dataset(config))
    model = build_model(config, train_data._dataset)
    batch = next(iter(train_data)).to(config["device"])
    return model, batch, config


def llm_widths(model):
    """The LLM's hidden and MLP widths."""
    llm_config = llm_parts(model)[0].config
    return llm_config.hidden_size, llm_config.intermediate_size


def matmul_rates(hidden, ffn, tokens, repeats):
    """GFLOP/s of [tokens, hidden] x [hidden, n] products at the LLM's shapes, per dtype; `all` sums the shapes as a
    decoder layer runs them (q/k/v/o: four hidden x hidden, the MLP: three hidden x ffn)."""
    rows = []
    for dtype in (torch.float32, torch.bfloat16):
        per_shape = {}
        for name, width in (("d x d", hidden), ("d x d_ff", ffn)):
            inputs, weight = torch.randn(tokens, hidden, dtype=dtype), torch.randn(hidden, width, dtype=dtype)
            seconds = best_of(lambda: inputs @ weight, repeats + 1)
            per_shape[name] = (2 * tokens * hidden * width, seconds)
            rows.append({"shape": f"{tokens} x {hidden} x {width}", "dtype": dtype_name(dtype),
                         "GFLOP/s": per_shape[name][0] / seconds / 1e9})
        flops = 4 * per_shape["d x d"][0] + 3 * per_shape["d x d_ff"][0]
        seconds = 4 * per_shape["d x d"][1] + 3 * per_shape["d x d_ff"][1]
        rows.append({"shape": "all", "dtype": dtype_name(dtype), "GFLOP/s": flops / seconds / 1e9})
    return rows


def best_of(run, repeats):
    run()  # warm-up: threads and kernels chosen
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        run()
        times.append(time.perf_counter() - start)
    return min(times)


def item_pass(model, n_items):
    """Laser's item prompts of n_items items, evenly over the length-sorted catalog, batched as
    compute_item_matrix batches them."""
    items = torch.arange(1, model.n_items, device=model.item_matrix.device)
    items = items[model.item_text_lengths[items].argsort(stable=True)]
    items = items[torch.linspace(0, len(items) - 1, min(n_items, len(items))).long()]

    @torch.no_grad()
    def run():
        model.eval()
        for batch in items.split(model.item_batch_size):
            model.item_embedding(batch)

    return run


def training_step(model, batch):
    """One training step's loss and backward (no optimizer step: the weights stay as they are)."""

    def run():
        model.train()
        losses = model.calculate_loss(batch)
        sum(losses).backward() if isinstance(losses, tuple) else losses.backward()
        model.zero_grad(set_to_none=True)

    return run


def candidate_reading(model, batch, n_users):
    """RSLLM's reading of n_users users' candidate prompts (answers, titles' likelihoods), as the candidate protocol
    asks it."""
    item_seq, item_len = batch[model.ITEM_SEQ][:n_users], batch[model.ITEM_SEQ_LEN][:n_users]
    generator = torch.Generator(device=item_seq.device).manual_seed(0)
    candidates, _ = sample_candidates(item_seq, batch[model.POS_ITEM_ID][:n_users], model.n_items,
                                      model.n_candidates, generator=generator)

    @torch.no_grad()
    def run():
        model.eval()
        model.read_candidates(item_seq, item_len, candidates)

    return run


def measured(label, model, run, repeats, decoder=None, dtype=None):
    """A pass's row: its tokens through the LLM (its `decoder`: the model's own by default), FLOPs and time (best of
    `repeats` after a counted run); it computes in `dtype`, by default its decoder's weight dtype."""
    decoder = decoder or llm_parts(model)[0]
    tokens = []
    handle = decoder.register_forward_pre_hook(lambda _, args, kwargs: tokens.append(unpadded(kwargs)),
                                               with_kwargs=True)
    with FlopCounterMode(display=False) as counter:
        run()
    flops, n_tokens = counter.get_total_flops(), sum(tokens)
    handle.remove()
    seconds = best_of(run, repeats)
    dtype = dtype or dtype_name(next(decoder.parameters()).dtype)
    return {"pass": label, "dtype": dtype, "tokens": n_tokens, "seconds": seconds,
            "tokens/s": n_tokens / seconds, "GFLOP": flops / 1e9, "GFLOP/s": flops / seconds / 1e9}


def unpadded(kwargs):
    """The tokens a decoder call computes: its attention mask's ones (a generation step: its new tokens)."""
    inputs = kwargs.get("inputs_embeds")
    if inputs is None:
        inputs = kwargs["input_ids"]
    mask = kwargs.get("attention_mask")
    if mask is None or mask.dim() != 2:
        return inputs.shape[0] * inputs.shape[1]
    return int(mask[:, -inputs.shape[1]:].sum())


def dtype_name(dtype):
    return str(dtype).removeprefix("torch.")


def write_results(out, profile, stamp, matmuls, rows):
    out.mkdir(parents=True, exist_ok=True)
    stem = str(out / f"limits-{profile.name}")
    write_csv(stem, [{**row, "kind": "pass"} for row in rows] + [{**row, "kind": "matmul"} for row in matmuls])
    units = "yes" if environment.cpu_computes_bf16() else "no"
    note = (f"Runs on: {environment.run_environment()}; bf16 matrix units: {units}. A pass "
            f"computes in its LLM's weight dtype (llm_dtype), or under bf16 autocast as a run with cpu_bf16 does on "
            f"such a CPU; its share is of that dtype's matmul rate at the LLM's shapes.")
    write_page(stem, f"Limits: {profile.dataset}, profile {profile.name}", stamp, [
        ("Matrix products at the LLM's shapes", markdown_table(matmuls, MATMUL_COLUMNS)),
        ("The LLM passes against them", markdown_table(rows, COLUMNS) + "\n\n" + note),
    ], figure=False)
    print(f"written: {stem}.md, .csv")


if __name__ == "__main__":
    run_script(main, "limits")
