"""Multi-process runs as RecBole drives them (``nproc``, ``world_size``, ``ip``, ``port``, ``offset``), with what the
plugin's trainers change in RecBole 1.2.1's DDP code.

RecBole wraps the model in DistributedDataParallel with ``device_ids=[local_rank]``, which DDP refuses for a CPU
model, and averages the processes' metrics weighted by their number of batches, over users that DistributedSampler
repeats to even the processes out. Here the model is wrapped for any device, and an evaluation gathers the per-user
rows of every process, keeps each evaluated sample once and computes the metrics once: exactly those of one process.
"""

import os
from contextlib import nullcontext
from datetime import timedelta

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from recbole_llm.errors import RecBoleLLMError
from recbole_llm.per_user import USER_ID_KEY, PerUserCollector

# The data RecBole's Collector gathers batch by batch: one row per evaluated sample (user) in full and sampled ranking.
PER_SAMPLE_KEYS = ("rec.topk", "rec.meanrank", "rec.score", "rec.items", "data.label", USER_ID_KEY)


def join_process_group(settings):
    """Sets up one process of a multi-process run (``local_rank`` set by quick_start.run) in its final settings, as
    RecBole's Config does, but with a backend that fits the device: the process runs on GPU ``local_rank`` of gpu_id
    with nccl, or on the CPU with gloo (RecBole hard-codes nccl, which has no CPU support)."""
    gpu_id = settings["gpu_id"]
    gpu_id = ",".join(map(str, gpu_id)) if isinstance(gpu_id, tuple) else str(gpu_id)
    settings["gpu_id"] = gpu_id
    os.environ["CUDA_VISIBLE_DEVICES"] = gpu_id
    on_gpus = len(gpu_id) > 0 and torch.cuda.is_available()  # RecBole's rule for one process
    nproc, local_rank = settings["nproc"], settings["local_rank"]
    if on_gpus and len(gpu_id.split(",")) < nproc:
        raise RecBoleLLMError(
            f"nproc={nproc} processes need one GPU each, but gpu_id is '{gpu_id}': pass as many ids, "
            f"e.g. --gpu_id={','.join(map(str, range(nproc)))}"
        )
    if settings.get("llm_device_map"):
        raise RecBoleLLMError(
            "llm_device_map spreads one LLM over every GPU of one process, but this run has several processes: "
            "use llm_device_map with nproc=1, or drop it to run one copy of the LLM per GPU"
        )
    if not dist.is_initialized():  # a comparison runs several models in one process group
        dist.init_process_group(
            backend="nccl" if on_gpus else "gloo",
            init_method=f"tcp://{settings['ip']}:{settings['port']}",
            rank=local_rank + settings["offset"],
            world_size=settings["world_size"],
            timeout=timedelta(minutes=settings["ddp_timeout"]),
        )
    settings["single_spec"] = False
    settings["device"] = torch.device("cuda", local_rank) if on_gpus else torch.device("cpu")
    if on_gpus:
        torch.cuda.set_device(local_rank)
    elif "OMP_NUM_THREADS" not in os.environ:  # as torchrun does: the processes share the CPU's cores
        torch.set_num_threads(max(1, torch.get_num_threads() // nproc))
    if local_rank != 0:  # as RecBole: the other processes only report errors
        settings.update(state="error", show_progress=False, verbose=False)


def is_distributed(config):
    return not config["single_spec"]


def writes_files(config):
    """Whether this process writes logs, checkpoints and tables: the only process, or local rank 0 (RecBole's rule,
    so that each machine of a multi-machine run has them on its own disk)."""
    return config["single_spec"] or config["local_rank"] == 0


def synchronize(config):
    """Wait until every process gets here (nothing to wait for in one process): e.g. until local rank 0 has written
    a file that the others read next."""
    if is_distributed(config):
        dist.barrier()


def from_rank_zero(value):
    """The value rank 0 holds, on every process."""
    values = [value]
    dist.broadcast_object_list(values, src=0)
    return values[0]


def process_share(n, config):
    """The indices 0..n-1 this process works on: every process a strided share, together each index once."""
    indices = torch.arange(n)
    return indices[dist.get_rank() :: dist.get_world_size()] if is_distributed(config) else indices


def evaluated_samples(eval_data):
    """The sample indices an evaluation loader gives this process, in the order it gives them: [n_here]."""
    return torch.tensor(list(eval_data.sampler))


def gather_in_sample_order(samples, columns):
    """Every process's rows of ``columns`` (tensors [n_here, ...] or lists, one row per entry of ``samples``) as one
    column each over all samples, in sample order, each sample once (DistributedSampler gives a few samples to two
    processes, so that each process gets as many)."""
    gathered = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, (samples.cpu(), [c.cpu() if torch.is_tensor(c) else c for c in columns]))
    all_samples = torch.cat([process_samples for process_samples, _ in gathered])  # [n_gathered]
    order = all_samples.argsort(stable=True)
    sorted_samples = all_samples[order]
    first = torch.ones_like(sorted_samples, dtype=torch.bool)
    first[1:] = sorted_samples[1:] != sorted_samples[:-1]
    kept = order[first]  # [n_samples] index into the gathered rows
    merged = []
    for index in range(len(columns)):
        parts = [process_columns[index] for _, process_columns in gathered]
        if torch.is_tensor(parts[0]):
            merged.append(torch.cat(parts)[kept])
        else:
            rows = [row for part in parts for row in part]
            merged.append([rows[i] for i in kept.tolist()])
    return merged


class SampleGatheringCollector(PerUserCollector):
    """RecBole's Collector (with user ids) whose data holds the rows of every process, each evaluated sample once and in sample
    order, so that the evaluator computes on every process the metrics of the whole evaluation set."""

    def __init__(self, config):
        super().__init__(config)
        self.samples = None  # set by the trainer before each evaluation: this process's sample indices

    def get_data_struct(self):
        struct = super().get_data_struct()
        keys = [key for key in PER_SAMPLE_KEYS if key in struct]
        for key in keys:
            if len(struct[key]) != len(self.samples):
                raise RecBoleLLMError(
                    f"multi-process evaluation gathers one row per evaluated user, but '{key}' has {len(struct[key])} "
                    f"rows for {len(self.samples)} users (value metrics over sampled negatives): evaluate with nproc=1"
                )
        for key, column in zip(keys, gather_in_sample_order(self.samples, [struct[key] for key in keys])):
            struct[key] = column
        return struct


class LossModule(nn.Module):
    """A model's calculate_loss as a forward: DDP synchronises the gradients of what its forward computed."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, interaction):
        return self.model.calculate_loss(interaction)


class DistributedTrainerMixin:
    """RecBole's Trainer in multi-process mode, fixed: a DDP wrapper that works on CPU (gloo) too, metrics gathered
    exactly, and one checkpoint file name for every process, written by local rank 0 before anyone reads it."""

    def __init__(self, config, model):
        distributed = is_distributed(config)
        config["single_spec"] = True  # RecBole's AbstractTrainer would build DDP with device_ids: refused on CPU
        # RecBole's ensure_dir checks, then creates: two processes that both see no folder race, one raises
        os.makedirs(config["checkpoint_dir"], exist_ok=True)
        try:
            super().__init__(config, model)
        finally:
            config["single_spec"] = not distributed
        self.distributed_model = self.build_distributed_model()
        if distributed:
            self.eval_collector = SampleGatheringCollector(config)
            # the name holds the time: processes that start a second apart would each look for their own file
            self.saved_model_file = from_rank_zero(self.saved_model_file)

    def build_distributed_model(self):
        """RecBole's DDP wrapper, which its _train_epoch runs beside the loss (set_reduce_hook, sync_grad_loss);
        None in one process, or when no weight trains (evaluation only, e.g. a frozen CF model)."""
        if not is_distributed(self.config) or not any(p.requires_grad for p in self.model.parameters()):
            return None
        if self.device.type == "cuda":
            self.model = nn.SyncBatchNorm.convert_sync_batchnorm(self.model)
        return DistributedDataParallel(self.model)

    def gradient_sync(self, sync):
        """A context without DDP's gradient all-reduce when ``sync`` is False (accumulation steps)."""
        return self.distributed_model.no_sync() if self.distributed_model is not None and not sync else nullcontext()

    def evaluate(self, eval_data, load_best_model=True, model_file=None, show_progress=False):
        if is_distributed(self.config) and eval_data:
            self.eval_collector.samples = evaluated_samples(eval_data)
        return super().evaluate(eval_data, load_best_model, model_file, show_progress)

    def _map_reduce(self, result, num_sample):
        return result  # computed from every process's rows already

    def _save_checkpoint(self, epoch, verbose=True, **kwargs):
        super()._save_checkpoint(epoch, verbose, **kwargs)  # local rank 0 writes
        synchronize(self.config)  # the others may load it next (the next stage starts from the best checkpoint)
