"""Cost benchmark: what training, evaluation and a checkpoint of each model cost, and for the LLM models where a
training step's time goes, against the floor of the bare frozen LLM on the same batches.

    python -m benchmarks.cost --profile=cpu [--out=benchmarks/results] [--key=value ...]

Each row of the profile's `cost` section runs in a fresh process (forked from a server that has only imported the
libraries), so that its peak memory and time to first batch are its own. In it, the model trains with its trainer's
own fit() (its first stage with epochs > 0, no validation), watched at every optimizer step:

- time to first batch: from the Config to the end of the first step (data, model, LLM load, CF model, the item
  matrix a stage or epoch starts with, the step);
- step time and train samples/s: the next `train` steps (data loading included);
- bare LLM fwd+bwd: the same decoder (RSLLM: its LoRA adapters off) on the inputs it got in each of those steps,
  run right after the step (the same load on the machine), into a leaf inputs_embeds, so that the backward reaches
  the input as the model's does: the floor a step can reach (RSLLM's step runs the LLM more than once: its item and
  title passes are above the floor);
- LLM share: the share of `profiled` further steps that torch.profiler finds inside the frozen LLM (the forward of
  its decoder and LM head, and the backward of the ops they ran, matched by autograd sequence number);
- LLM TFLOP/s: the FLOPs of the bare LLM on the steps' inputs (torch's FlopCounterMode) per second of step, and
  against the GPU's dense bf16 peak;
- evaluation: the item matrix (the model's begin_evaluation), then `eval` user batches of the validation split
  through full_sort_predict, as RecBole's evaluator calls it, each followed by the bare LLM forward on its inputs;
- peak memory: the process's peak RSS on CPU (imported libraries included), torch.cuda.max_memory_allocated on GPU;
- checkpoint: the size of the trainer's checkpoint after the steps.

Ratios are of sums over the same batches, by wall-clock time and, on CPU, by the process's CPU time. Torch uses
OMP_NUM_THREADS threads on CPU (default: one per core); on a machine shared with other processes, OMP_NUM_THREADS=1
gives steadier figures, as busy cores stall every parallel region of a multi-threaded run. Writes
cost-<profile>.md (stamp and tables), .csv (every figure) and .png. Any other --key=value goes to every run's
config.
"""

import contextlib
import itertools
import multiprocessing
import os
import resource
import sys
import tempfile
import time
import traceback
from dataclasses import dataclass

import numpy as np
import torch
from recbole.data import create_dataset, data_preparation
from recbole.utils import init_seed
from torch.optim.optimizer import register_optimizer_step_post_hook
from torch.profiler import ProfilerActivity, profile, record_function
from torch.utils.flop_counter import FlopCounterMode
from transformers import DynamicCache

from benchmarks.report import run_script, saved_figure, write_page
from benchmarks.settings import benchmark_settings
from recbole_llm.comparison import markdown_table, write_csv
from recbole_llm.config import Config
from recbole_llm.errors import RecBoleLLMError
from recbole_llm.model.abstract_recommender import LLMSequentialRecommender
from recbole_llm.model.sequential_recommender.laser import Laser
from recbole_llm.model.sequential_recommender.rsllm import RSLLM
from recbole_llm.quick_start import build_model
from recbole_llm.run_log import init_run_logger
from recbole_llm.utils import get_trainer

LLM_RANGE = "frozen LLM"  # the profiler range around each forward of the LLM's modules
# dense bf16 peak TFLOP/s by a part of the GPU's name (SXM boards; H200 has H100's compute)
PEAK_BF16_TFLOPS = {"H100 PCIe": 756, "H100": 989, "H200": 989, "A100": 312}

THROUGHPUT_COLUMNS = {
    "run": "run", "llm": "LLM", "device": "device", "train batch": "batch", "train samples/s": "train samples/s",
    "eval users/s": "eval users/s", "item matrix (s)": "item matrix (s)", "first batch (s)": "first batch (s)",
    "peak memory (MB)": "peak memory (MB)", "checkpoint (MB)": "checkpoint (MB)", "llm TFLOP/s": "LLM TFLOP/s",
    "% of peak": "% of GPU peak",
}
LLM_COLUMNS = {
    "run": "run", "step (s)": "step (s)", "llm share": "in the LLM (profiler)",
    "bare fwd+bwd (s)": "bare LLM fwd+bwd (s)", "step / bare": "step / bare", "step / bare, CPU time": "(CPU time)",
    "eval batch (s)": "eval batch (s)", "bare fwd (s)": "bare LLM fwd (s)", "eval / bare": "eval / bare",
    "eval / bare, CPU time": "(CPU time)", "bare TFLOP/s": "bare fwd+bwd TFLOP/s",
}


class StepsDone(BaseException):
    """Ends trainer.fit when the measured steps are done (not an Exception: no handler in a trainer swallows it)."""


def llm_parts(model):
    """The frozen LLM modules a model runs, its decoder first: Laser's decoder (cut to llm_layers; Laser reads hidden
    states, not logits), RSLLM's LoRA-wrapped decoder and LM head. Empty for a model without an LLM."""
    if isinstance(model, Laser):
        return [model.run_decoder.__self__]  # run_decoder is the decoder's __call__, held so it is no submodule
    if isinstance(model, RSLLM):
        return [model.llm.get_base_model().get_decoder(), model.llm.get_output_embeddings()]
    return []


class LLMWatch:
    """Hooks on the frozen LLM: every forward of its modules is a profiler range, and the decoder's inputs of its
    first call after `expect_call()` are kept (detached) until `take_call()`, to replay as the bare LLM."""

    def __init__(self, modules):
        self.call, self.expecting, self.open_ranges, self.handles = None, False, [], []
        for module in modules:
            self.handles += [module.register_forward_pre_hook(self._enter), module.register_forward_hook(self._exit)]
        if modules:
            self.handles.append(modules[0].register_forward_pre_hook(self._keep, with_kwargs=True))

    def _enter(self, module, args):
        self.open_ranges.append(record_function(LLM_RANGE))
        self.open_ranges[-1].__enter__()

    def _exit(self, module, args, output):
        self.open_ranges.pop().__exit__(None, None, None)

    def _keep(self, module, args, kwargs):
        if self.expecting:
            self.call = args, {key: kept_value(v) for key, v in kwargs.items()}
            self.expecting = False

    def expect_call(self):
        self.call, self.expecting = None, True

    def take_call(self):
        call, self.call = self.call, None
        return call

    def remove(self):
        for handle in self.handles:
            handle.remove()


def kept_value(value):
    """A decoder input as a replay needs it: tensors detached; a cache (Laser's deep prefix), which the forward
    appends to, as a detached copy of its layers now, made into a fresh cache by `replayed`."""
    if torch.is_tensor(value):
        return value.detach()
    if isinstance(value, DynamicCache):
        return KeptCache([(layer.keys.detach(), layer.values.detach()) for layer in value.layers])
    return value


@dataclass
class KeptCache:
    layers: list

    def replayed(self):
        return DynamicCache(ddp_cache_data=self.layers)


class StepClock:
    """Watches the trainer's optimizer steps (a global optimizer hook): step 0 is the first batch; each of the next
    `n_timed` steps is timed, and its LLM call replayed right after it by `bare` (so that both meet the same load on
    the machine); then `n_profiled` steps run under torch.profiler, and StepsDone ends training."""

    def __init__(self, n_timed, n_profiled, device, watch, bare=None):
        self.n_timed, self.n_profiled, self.device, self.watch, self.bare = n_timed, n_profiled, device, watch, bare
        self.n_done, self.first_end, self.resumed = 0, None, None
        self.steps, self.bare_runs = [], []  # (wall, CPU) seconds of each timed step; bare()'s result for each
        self.profiler, self.profile_start, self.profile_end = None, None, None

    def __enter__(self):
        self.handle = register_optimizer_step_post_hook(self._after_step)
        self.watch.expect_call()
        return self

    def __exit__(self, *error):
        self.handle.remove()

    def _after_step(self, optimizer, args, kwargs):
        end = clock(self.device)
        self.n_done += 1
        if self.n_done == 1:
            self.first_end = end[0]
        elif self.n_done <= 1 + self.n_timed:
            self.steps.append((end[0] - self.resumed[0], end[1] - self.resumed[1]))
            if self.bare:
                self.bare_runs.append(self.bare(self.watch.take_call()))
        if self.n_done == 1 + self.n_timed and self.n_profiled:
            activities = [ProfilerActivity.CPU] + [ProfilerActivity.CUDA] * (self.device.type == "cuda")
            self.profiler = profile(activities=activities)
            self.profiler.start()
            self.profile_start = clock(self.device)[0]
        if self.n_done == 1 + self.n_timed + self.n_profiled:
            if self.profiler:
                self.profiler.stop()
                self.profile_end = end[0]
            raise StepsDone
        self.watch.expect_call()
        self.resumed = clock(self.device)


def clock(device):
    """Wall and process CPU time (all threads), once the device has finished its queued work."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter(), time.process_time()


def llm_seconds(events, on_gpu):
    """Time inside the LLM in profiled events: its forward ranges and the backward of the ops run in them."""
    def spent(event):
        return (event.device_time_total if on_gpu else event.cpu_time_total) / 1e6

    def with_descendants(event):
        return [event] + [e for child in event.cpu_children for e in with_descendants(child)]

    forwards = [event for event in events if event.name == LLM_RANGE]
    forward_ops = {e.sequence_nr for event in forwards for e in with_descendants(event) if e.sequence_nr >= 0}
    backwards = [
        event for event in events
        if event.name.startswith("autograd::engine::evaluate_function") and event.sequence_nr in forward_ops
    ]
    return sum(spent(event) for event in forwards + backwards)


def bare_llm(model, call, backward, amp_dtype):
    """The model's frozen decoder alone (RSLLM: LoRA off) on a kept call's inputs: once under FlopCounterMode (a
    warm-up too), then once timed. Returns wall and CPU seconds and FLOPs."""
    decoder = llm_parts(model)[0]
    args, kwargs = call
    device = kwargs["inputs_embeds"].device

    def run():
        inputs_embeds = kwargs["inputs_embeds"].clone().requires_grad_(backward)
        with torch.set_grad_enabled(backward), torch.autocast(device.type, amp_dtype, enabled=amp_dtype is not None):
            inputs = {key: v.replayed() if isinstance(v, KeptCache) else v for key, v in kwargs.items()}
            hidden = decoder(*args, **{**inputs, "inputs_embeds": inputs_embeds}).last_hidden_state
            if backward:
                hidden[:, -1].float().pow(2).mean().backward()

    with getattr(model.llm, "disable_adapter", contextlib.nullcontext)():  # a PeftModel's adapters off
        with FlopCounterMode(display=False) as flop_counter:
            run()
        start = clock(device)
        run()
        end = clock(device)
    return end[0] - start[0], end[1] - start[1], flop_counter.get_total_flops()


def sums(runs):
    """Column sums of (wall, CPU, ...) tuples."""
    return [sum(column) for column in zip(*runs)]


def measure(label, model_name, dataset, config_dict, steps, workdir, threads):
    """One row of the cost table, measured in this process (see the module's docstring)."""
    os.chdir(workdir)  # the caller's: relative paths (data, saved/, log/) as in the caller
    torch.set_num_threads(threads)
    start = time.perf_counter()
    # an epoch is never finished: training stops after the measured steps
    config = Config(model=model_name, dataset=dataset, config_dict={**config_dict, "train_batches_per_epoch": None})
    init_seed(config["seed"], config["reproducibility"])
    init_run_logger(config)
    train_data, valid_data, _ = data_preparation(config, create_dataset(config))
    model = build_model(config, train_data._dataset)
    trainer = get_trainer(config["MODEL_TYPE"], config["model"])(config, model)
    device, parts = config["device"], llm_parts(model)
    on_cpu = device.type == "cpu"
    amp_dtype = getattr(trainer, "amp_dtype", None)
    watch = LLMWatch(parts)
    n_timed, n_profiled = steps["train"], steps["profiled"] if parts else 0
    bare_step = (lambda call: bare_llm(model, call, True, amp_dtype)) if parts else None
    with StepClock(n_timed, n_profiled, device, watch, bare_step) as step_clock:
        try:
            trainer.fit(train_data, valid_data=None, saved=False, show_progress=False)
        except StepsDone:
            pass
        else:
            raise RecBoleLLMError(
                f"cost run '{label}' ran out of training batches after {step_clock.n_done} steps; it needs "
                f"{n_timed + n_profiled + 1}: lower cost_steps or the batch size, or raise epochs"
            )
    step_wall, step_cpu = sums(step_clock.steps)
    row = {
        "run": label,
        "model": config["model"],
        "llm": llm_name(config, model, parts),
        "device": f"CPU, {threads} thread{'s' * (threads > 1)}" if on_cpu else torch.cuda.get_device_name(device),
        "train batch": config["train_batch_size"],
        "first batch (s)": step_clock.first_end - start,
        "step (s)": step_wall / n_timed,
        "train samples/s": config["train_batch_size"] * n_timed / step_wall,
        "checkpoint (MB)": checkpoint_megabytes(trainer),
    }
    if parts:
        profiled_seconds = step_clock.profile_end - step_clock.profile_start
        row["llm share"] = min(1.0, llm_seconds(step_clock.profiler.events(), not on_cpu) / profiled_seconds)
        bare_wall, bare_cpu, bare_flops = sums(step_clock.bare_runs)
        row["bare fwd+bwd (s)"] = bare_wall / n_timed
        row["step / bare"] = step_wall / bare_wall
        row["step / bare, CPU time"] = step_cpu / bare_cpu if on_cpu else None
        row["llm TFLOP/s"] = bare_flops / step_wall / 1e12
        row["bare TFLOP/s"] = bare_flops / bare_wall / 1e12
        row["% of peak"] = percent_of_peak(row["llm TFLOP/s"], row["device"])

    model.eval()
    with torch.no_grad():
        evaluation_start = clock(device)[0]
        if isinstance(model, LLMSequentialRecommender):
            model.begin_evaluation()  # e.g. the item matrix, once per evaluation
        row["item matrix (s)"] = clock(device)[0] - evaluation_start if parts else None
        batches, bare_runs, users = [], [], 0
        for interaction, *_ in itertools.islice(valid_data, steps["eval"]):
            interaction = interaction.to(device)
            watch.expect_call()
            start = clock(device)
            model.full_sort_predict(interaction)
            end = clock(device)
            batches.append((end[0] - start[0], end[1] - start[1]))
            users += len(interaction)
            if parts:
                bare_runs.append(bare_llm(model, watch.take_call(), False, amp_dtype))  # right after, same load
    watch.remove()
    eval_wall, eval_cpu = sums(batches)
    row["eval users/s"] = users / eval_wall
    if parts:
        bare_wall, bare_cpu, _ = sums(bare_runs)
        row["eval batch (s)"] = eval_wall / len(batches)
        row["bare fwd (s)"] = bare_wall / len(batches)
        row["eval / bare"] = eval_wall / bare_wall
        row["eval / bare, CPU time"] = eval_cpu / bare_cpu if on_cpu else None
    row["peak memory (MB)"] = peak_memory_megabytes(device)
    return row


def llm_name(config, model, parts):
    """llm_path, dtype and how many of its layers run (llm_layers); None for a model without an LLM."""
    if not parts:
        return None
    dtype = str(next(parts[0].parameters()).dtype).removeprefix("torch.")
    layers = config["llm_layers"]
    return f"{config['llm_path']}, {dtype}" + (f", first {layers} layers" if layers else "")


def percent_of_peak(tflops, device_name):
    peak = next((peak for name, peak in PEAK_BF16_TFLOPS.items() if name in device_name), None)
    return 100 * tflops / peak if peak else None


def checkpoint_megabytes(trainer):
    with tempfile.TemporaryDirectory() as directory:
        path = os.path.join(directory, "checkpoint.pth")
        trainer._save_checkpoint(0, verbose=False, saved_model_file=path)  # RecBole's own, with its file argument
        return os.path.getsize(path) / 2**20


def peak_memory_megabytes(device):
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def in_fresh_process(function, *args):
    """function(*args) in a process forked from a server that has only imported the libraries: no LLM, CUDA context
    or thread pool of this process leaks into the measurement (forking a process whose OpenMP pool ran hangs)."""
    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload([__name__])
    receiver, sender = context.Pipe(duplex=False)
    child = context.Process(target=_send_result, args=(sender, function, args))
    child.start()
    sender.close()
    try:
        succeeded, value = receiver.recv()
    except EOFError:
        child.join()
        raise RuntimeError(f"the measuring process died (exit code {child.exitcode})") from None
    child.join()
    if not succeeded:
        raise value
    return value


def _send_result(sender, function, args):
    try:
        sender.send((True, function(*args)))
    except BaseException as error:
        traceback.print_exc()
        sender.send((False, error))


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    profile, out, stamp = benchmark_settings("cost", argv)
    rows = [measure_row(profile, label) for label in profile.cost]
    write_results(out, profile, stamp, rows)
    return rows


def measure_row(profile, label):
    """The profile's cost row `label`, measured in a fresh process (in_fresh_process) from this working directory."""
    settings = profile.cost[label]
    return in_fresh_process(measure, label, settings["model"], profile.dataset, profile.run_config(settings),
                            profile.cost_steps, os.getcwd(), torch.get_num_threads())


def write_results(out, profile, stamp, rows, notes=()):
    """cost-<profile>.md, .csv and .png under `out`; `notes` (lines) say which rows are missing and why."""
    out.mkdir(parents=True, exist_ok=True)
    stem = str(out / f"cost-{profile.name}")
    write_csv(stem, rows)
    llm_rows = [row for row in rows if row.get("llm")]
    with saved_figure(stem, 2) as (throughput, breakdown):
        labels = [row["run"] for row in rows][::-1]
        throughput.barh(labels, [row["train samples/s"] for row in rows][::-1], color="tab:blue")
        throughput.set_xscale("log")
        throughput.set_xlabel("train samples/s (log scale)")
        plot_step_breakdown(breakdown, llm_rows)
    gpus = sorted({row["device"] for row in rows if not row["device"].startswith("CPU")})
    write_page(stem, f"Cost: {profile.dataset}, profile {profile.name}", stamp, [
        ("Throughput, start-up, memory and checkpoint per model", markdown_table(rows, THROUGHPUT_COLUMNS)),
        ("Where an LLM model's time goes, against the bare frozen LLM on the same batch", markdown_table(
            llm_rows, LLM_COLUMNS)),
        *([("Not measured", "\n".join(f"- {note}" for note in notes))] if notes else []),
    ], gpu_name=", ".join(gpus) or None)
    print(f"written: {stem}.md, .csv, .png")


def plot_step_breakdown(axis, llm_rows):
    """Per LLM model: its step split into time inside the LLM and outside, beside the bare LLM's forward+backward."""
    labels = [row["run"] for row in llm_rows]
    positions = np.arange(len(labels))[::-1]  # the first row on top, as in the throughput panel
    inside = [row["step (s)"] * row["llm share"] for row in llm_rows]
    outside = [row["step (s)"] - seconds for row, seconds in zip(llm_rows, inside)]
    axis.barh(positions + 0.2, inside, height=0.4, color="tab:orange", label="step: inside the LLM")
    axis.barh(positions + 0.2, outside, left=inside, height=0.4, color="tab:gray", label="step: outside")
    axis.barh(positions - 0.2, [row["bare fwd+bwd (s)"] for row in llm_rows], height=0.4, color="tab:green",
              label="bare LLM fwd+bwd")
    axis.set_yticks(positions, labels)
    axis.set_xlabel("seconds per training step")
    axis.legend(loc="lower right", fontsize="small")


if __name__ == "__main__":
    run_script(main, "cost")
