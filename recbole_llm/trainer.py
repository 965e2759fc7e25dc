"""Trainers: RecBole's, made to write checkpoints as data (atomically) and read them with torch's safe loader, and to
resume interrupted runs, and the LLMTrainer that trains every LLM-based model stage by stage; and how a checkpoint's
weights go into a model, for the trainers and load_data_and_model alike."""

import functools
import itertools
import math
import os
from contextlib import contextmanager
from logging import getLogger

import numpy as np
import torch
from recbole.trainer import Trainer as RecBoleTrainer
from recbole.utils import set_color
from torch.nn.parallel import DistributedDataParallel
from torch.nn.utils import clip_grad_norm_, get_total_norm
from tqdm import tqdm
from transformers import get_cosine_schedule_with_warmup

import recbole_llm.environment as environment
from recbole_llm.candidate_evaluation import evaluate_candidates
from recbole_llm.checkpoint import load_checkpoint, save_checkpoint_atomically
from recbole_llm.distributed import DistributedTrainerMixin, LossModule, is_distributed
from recbole_llm.errors import RecBoleLLMError
from recbole_llm.model.abstract_recommender import LLMSequentialRecommender, count_parameters
from recbole_llm.per_user import PerUserMetricsMixin
from recbole_llm.resume import last_checkpoint_path, random_state, read_resume_checkpoint, restore_random_state


# the setting that sizes the batches of each phase that may run out of memory
BATCH_SIZE_KEYS = {
    "train": ("train_batch_size", "training"),
    "eval": ("eval_batch_size", "evaluating"),
    "items": ("item_batch_size", "computing item embeddings"),
}


def load_model_state(model, checkpoint):
    """A checkpoint's weights into its model: an LLM model's stage and trainable weights, a RecBole model's state."""
    if isinstance(model, LLMSequentialRecommender):
        model.set_stage(checkpoint["stage"])
        model.load_checkpoint_state_dict(checkpoint["state_dict"])
    else:
        model.load_state_dict(checkpoint["state_dict"])
        model.load_other_parameter(checkpoint.get("other_parameter"))


def autocast_dtype(config, device):
    """What an LLM model's passes compute in under autocast: bf16 on a GPU, and on a CPU with bf16 matrix units where
    cpu_bf16 is on; None (fp32) otherwise."""
    on_bf16_cpu = device.type == "cpu" and config["cpu_bf16"] and environment.cpu_computes_bf16()
    return torch.bfloat16 if device.type == "cuda" or on_bf16_cpu else None


def model_state(model):
    """What a checkpoint holds of its model: load_model_state's inverse."""
    if isinstance(model, LLMSequentialRecommender):
        return {"stage": model.stage, "state_dict": model.checkpoint_state_dict()}
    # RecBole's other parameters that are tensors; the others (a submodule, whose weights state_dict holds, or SciPy
    # matrices a model computes from the dataset when it is built) would be pickled as code
    other = {name: value for name, value in model.other_parameter().items() if value is None or torch.is_tensor(value)}
    return {"state_dict": model.state_dict(), "other_parameter": other}


def as_floats(result):
    """RecBole's metrics (NumPy floats, which only the full unpickler reads) as Python floats; None stays None."""
    return None if result is None else type(result)((metric, float(value)) for metric, value in result.items())


def advises_on_out_of_memory(phase):
    """A trainer method whose CUDA out-of-memory error becomes one line naming the batch size of `phase` to lower."""

    def decorate(method):
        @functools.wraps(method)
        def advised(self, *args, **kwargs):
            with self._out_of_memory_advice(phase):
                return method(self, *args, **kwargs)

        return advised

    return decorate


class SafeCheckpointMixin:
    """Replaces the two ``torch.load`` calls of RecBole's Trainer (evaluate and resume), writes checkpoints as data
    and atomically, keeps a resume point after every epoch (recbole_llm.resume), and turns a non-finite loss and CUDA's
    out-of-memory error into one line that says what to change."""

    last_checkpoint_file = None  # <best>-last.pth while a fit that saves checkpoints runs
    _train_data = None  # the running fit's training dataloader: its shuffle generator is part of a resume point
    _pending_random_state = None  # a resumed checkpoint's random state, restored when fit starts
    _epoch = None  # the epoch being trained

    def evaluate(self, eval_data, load_best_model=True, model_file=None, show_progress=False):
        if load_best_model and eval_data:
            checkpoint_file = model_file or self.saved_model_file
            load_model_state(self.model, self.read_checkpoint(checkpoint_file))
            getLogger().info(f"Loading model structure and parameters from {checkpoint_file}")
        with self._out_of_memory_advice("eval"):
            return super().evaluate(eval_data, load_best_model=False, show_progress=show_progress)

    def read_checkpoint(self, checkpoint_file):
        """A checkpoint, on this trainer's device; one the safe loader refuses only with trust_checkpoint."""
        return load_checkpoint(checkpoint_file, self.device, trust_checkpoint=self.config["trust_checkpoint"])

    def resume_checkpoint(self, resume_file):
        checkpoint = read_resume_checkpoint(resume_file, self.config)
        self._restore_training_state(checkpoint)
        self._pending_random_state = checkpoint["random_state"]
        getLogger().info(f"Checkpoint loaded. Resume training from epoch {self.start_epoch}")

    def _restore_training_state(self, checkpoint):
        """Weights, optimizer, early-stopping counter and best so far; fit goes on after the checkpoint's epoch."""
        load_model_state(self.model, checkpoint)
        self.optimizer.load_state_dict(checkpoint["optimizer"])
        self.start_epoch = self.epochs if checkpoint["finished"] else checkpoint["epoch"] + 1
        self.cur_step = checkpoint["cur_step"]
        self.best_valid_score = checkpoint["best_valid_score"]
        self.best_valid_result = checkpoint["best_valid_result"]
        self.saved_model_file = checkpoint["best_model_file"]  # improvements of the resumed run go on replacing it

    def fit(self, train_data, valid_data=None, verbose=True, saved=True, show_progress=False, callback_fn=None):
        self._train_data = train_data
        self.last_checkpoint_file = last_checkpoint_path(self.saved_model_file) if saved else None
        if self._pending_random_state is not None:
            restore_random_state(self._pending_random_state, train_data)
            self._pending_random_state = None
            if self.start_epoch >= self.epochs:  # resumed after its last epoch (RecBole would overwrite the best)
                return self.best_valid_score, self.best_valid_result
        if saved:
            self.logger.info(f"state after every epoch: {self.last_checkpoint_file} (--resume=FILE continues from it)")
        with torch.autograd.set_detect_anomaly(bool(self.config["detect_anomaly"])):
            result = super().fit(train_data, valid_data, verbose, saved, show_progress, callback_fn)
        self._save_last_checkpoint(self._epoch, finished=True)
        return result

    @advises_on_out_of_memory("train")
    def _train_epoch(self, train_data, epoch_idx, loss_func=None, show_progress=False):
        self._begin_epoch(epoch_idx)
        return super()._train_epoch(train_data, epoch_idx, loss_func, show_progress)

    def _begin_epoch(self, epoch_idx):
        """Saves the resume point that the epochs finished so far left (the previous one, validated)."""
        if epoch_idx > self.start_epoch:
            self._save_last_checkpoint(epoch_idx - 1)
        self._epoch = epoch_idx

    def _save_last_checkpoint(self, epoch, finished=False):
        if self.last_checkpoint_file is None or epoch is None:
            return
        if not self.config["single_spec"] and self.config["local_rank"] != 0:
            return
        save_checkpoint_atomically(self.checkpoint_state(epoch, finished), self.last_checkpoint_file)

    def _save_checkpoint(self, epoch, verbose=True, **kwargs):
        if not self.config["single_spec"] and self.config["local_rank"] != 0:
            return
        saved_model_file = kwargs.pop("saved_model_file", self.saved_model_file)
        save_checkpoint_atomically(self.checkpoint_state(epoch), saved_model_file)
        if verbose:
            self.logger.info(set_color("Saving current", "blue") + f": {saved_model_file}")

    def checkpoint_state(self, epoch, finished=False):
        return {
            "config": self.config,
            "epoch": epoch,
            "finished": finished,  # no epoch of its fit is left to train
            "cur_step": self.cur_step,
            "best_valid_score": float(self.best_valid_score),
            "best_valid_result": as_floats(self.best_valid_result),
            "best_model_file": self.saved_model_file,
            **model_state(self.model),
            "optimizer": self.optimizer.state_dict(),
            "random_state": random_state(self._train_data),
        }

    def _check_nan(self, loss):
        if not torch.isfinite(loss):
            raise self._non_finite_loss_error(f"epoch {self._epoch}")

    def _non_finite_loss_error(self, where, what="training loss"):
        kept = [path for path in (self.saved_model_file, self.last_checkpoint_file) if path and os.path.isfile(path)]
        kept = f"the last good checkpoints are kept: {', '.join(kept)}" if kept else "no checkpoint was written before"
        return RecBoleLLMError(
            f"the {what} became nan or inf at {where}, so training stopped; {kept}; "
            f"lower learning_rate (now {self.learning_rate}) or set clip_grad_norm (e.g. {{'max_norm': 1.0}}); "
            f"--detect_anomaly=True names the operation that made it"
        )

    @contextmanager
    def _out_of_memory_advice(self, phase):
        """CUDA's out-of-memory error in `phase` (train, eval or items) as one line naming the batch size to lower."""
        try:
            yield
        except torch.OutOfMemoryError:
            raise RecBoleLLMError(f"CUDA out of memory {self._batch_size_advice(phase)}") from None

    def _batch_size_advice(self, phase):
        """Which batch size to lower when `phase` (train, eval or items) ran out of CUDA memory, and to what."""
        key, doing = BATCH_SIZE_KEYS[phase]
        size = self.config[key]
        return f"while {doing} ({key}={size}): lower {key}" + (f", e.g. to {size // 2}" if size > 1 else "")


class CappedEpochMixin:
    """train_batches_per_epoch for every model: an epoch is the first N batches of the shuffled loader (a different
    subset each epoch), so that an ID model can be validated after as many samples as an LLM model."""

    def __init__(self, config, model):
        self.train_batches_per_epoch = config["train_batches_per_epoch"]  # None: the whole training set
        super().__init__(config, model)

    def _batches_per_epoch(self, train_data):
        return min(len(train_data), self.train_batches_per_epoch or len(train_data))

    def _train_epoch(self, train_data, epoch_idx, loss_func=None, show_progress=False):
        n_batches = self._batches_per_epoch(train_data)
        if n_batches < len(train_data):
            train_data = FirstBatches(train_data, n_batches)
        return super()._train_epoch(train_data, epoch_idx, loss_func, show_progress)


class FirstBatches:
    """The first n batches of a RecBole loader, which RecBole's epoch loop reads as the loader itself."""

    def __init__(self, loader, n_batches):
        self.loader, self.n_batches = loader, n_batches

    def __len__(self):
        return self.n_batches

    def __iter__(self):
        return itertools.islice(iter(self.loader), self.n_batches)

    def __getattr__(self, name):  # shuffle, sampler, ...
        return getattr(self.loader, name)


class CandidateEvaluationMixin:
    """With ``candidate_eval``, a test adds LLaRA's candidate protocol (HR@1 and ValidRatio on the same seeded
    candidates for every model, recbole_llm.candidate_evaluation) to RecBole's metrics; validations read RecBole's
    metrics only."""

    validating = False
    last_candidate_per_user = None  # the last candidate protocol's outcome per user

    def evaluate(self, eval_data, load_best_model=True, model_file=None, show_progress=False):
        result = self.ranking_result(eval_data, load_best_model, model_file, show_progress)
        if eval_data and self.config["candidate_eval"] and not self.validating and self.reads_histories():
            result.update(self.candidate_result(eval_data))
        return result

    def candidate_result(self, eval_data):
        """The candidate protocol on eval_data, a sequential model's loader (a general model's: quick_start gives
        it ``sequential_test_data``); each user's outcomes in ``last_candidate_per_user``."""
        self.model.eval()
        with self._out_of_memory_advice("eval"):
            metrics, self.last_candidate_per_user = evaluate_candidates(self.model, eval_data, self.config)
        return metrics

    def reads_histories(self):
        """Whether the model is sequential: the candidates lie outside each user's history, as its batches hold it
        (general models such as Pop are evaluated on other batches: their test is followed by ``candidate_result``
        on the sequential models' test batches)."""
        return hasattr(self.model, "ITEM_SEQ")

    def ranking_result(self, eval_data, load_best_model, model_file, show_progress):
        """RecBole's metrics of eval_data."""
        return super().evaluate(eval_data, load_best_model, model_file, show_progress)

    def _valid_epoch(self, valid_data, show_progress=False):
        self.validating = True
        try:
            return super()._valid_epoch(valid_data, show_progress)
        finally:
            self.validating = False


class Trainer(CandidateEvaluationMixin, DistributedTrainerMixin, PerUserMetricsMixin, SafeCheckpointMixin,
              CappedEpochMixin, RecBoleTrainer):
    """RecBole's Trainer with safe loading, working multi-process runs, per-user metrics, the candidate protocol and
    capped epochs: the trainer of RecBole's sequential baselines in this plugin."""


class LLMTrainer(Trainer):
    """Trains an LLMSequentialRecommender: only its trainable weights, stage by stage.

    Adds to RecBole's Trainer: an optimizer over ``requires_grad`` parameters, gradient accumulation, warmup + cosine
    schedule, bf16 autocast on CUDA (and with ``cpu_bf16`` on a CPU that computes in bf16), checkpoints without the
    frozen backbones, and the model's stages, each with validation and early stopping. Each stage starts from the
    previous stage's best weights and keeps its own best: early stopping compares a stage's validations with each
    other, and the test reads the last stage's best. (``candidate_eval``: LLaRA's candidate protocol on the test split,
    CandidateEvaluationMixin.)
    """

    def __init__(self, config, model):
        self.grad_accum_steps = config["grad_accum_steps"]
        self.warmup_ratio = config["warmup_ratio"]
        self.stage = None
        self.validating = False
        super().__init__(config, model)
        self.amp_dtype = autocast_dtype(config, self.device)
        self.scheduler = None
        self._resume_from = None  # a checkpoint given to resume_checkpoint, applied by fit

    def _build_optimizer(self, **kwargs):
        groups = [group for group in self.model.optimizer_groups() if group["params"]]
        if not groups:
            return None  # a stage sets what trains; the optimizer is rebuilt when it starts
        return super()._build_optimizer(params=groups, **kwargs)

    def build_distributed_model(self):
        """DDP over the weights the current stage trains (None before a stage, or in one process). calculate_loss
        runs as its forward, so DDP synchronises exactly the gradients it computed. Buffers are copied from rank 0
        once, not before every step: the models' buffers (item matrices) are computed alike on every process."""
        if self.stage is None or not is_distributed(self.config):
            return None
        return DistributedDataParallel(LossModule(self.model), forward_sync_buffers=False)

    def _start_stage(self, stage, steps_per_epoch):
        self.stage = stage
        self.model.set_stage(stage.name)  # which weights train: DDP synchronises those ...
        self.distributed_model = self.build_distributed_model()  # ... from rank 0's values, before the stage computes
        with self.autocast():  # an item matrix made here is computed as training and evaluation compute theirs
            self.model.begin_stage(stage.name)
        self.optimizer = self._build_optimizer()
        if self.optimizer is None:
            raise RecBoleLLMError(f"stage '{stage.name}' of {self.config['model']} has no trainable parameters")
        total_steps = max(1, stage.epochs * math.ceil(steps_per_epoch / self.grad_accum_steps))
        self.scheduler = get_cosine_schedule_with_warmup(
            self.optimizer, int(self.warmup_ratio * total_steps), total_steps
        )
        self.epochs = stage.epochs
        self.eval_step = min(self.config["eval_step"], self.epochs)
        self.start_epoch, self.cur_step = 0, 0
        # the stage's own best: a later stage is kept even where it scores below an earlier one
        self.best_valid_score = -np.inf if self.valid_metric_bigger else np.inf
        self.best_valid_result = None
        trainable, _ = count_parameters(self.model)
        self.logger.info(set_color(f"stage '{stage.name}'", "green") + f": {stage.epochs} epochs, {trainable:,} trainable parameters")

    def fit(self, train_data, valid_data=None, verbose=True, saved=True, show_progress=False, callback_fn=None):
        stages = [stage for stage in self.model.training_stages() if stage.epochs > 0]
        if not stages:
            raise RecBoleLLMError(f"{self.config['model']} has no training stage with epochs > 0: set the stage epochs")
        resume, self._resume_from = self._resume_from, None
        first = self._resume_stage_index(stages, resume)
        for index, stage in enumerate(stages[first:], start=first):
            resuming = resume is not None and index == first
            if index > 0 and saved and not resuming and os.path.isfile(self.saved_model_file):
                self._load_best(self.saved_model_file)  # each stage starts from the best weights so far
            self._start_stage(stage, self._batches_per_epoch(train_data))
            if resuming:  # after the stage's setup, which the checkpoint's state then overwrites
                self._restore_training_state(resume)
                self._pending_random_state = resume["random_state"]
            validated = valid_data if self._validates(stage, last=index == len(stages) - 1) else None
            super().fit(train_data, validated, verbose, saved, show_progress, callback_fn)
        return self.best_valid_score, self.best_valid_result

    def _validates(self, stage, last):
        """Whether the stage is validated. A stage of one epoch that another follows keeps that epoch whatever it
        scores, so its validation (a full pass over the validation users) decides nothing; validate_every_stage
        runs it anyway, e.g. for a learning curve."""
        if last or stage.epochs > 1 or self.config["validate_every_stage"]:
            return True
        self.logger.info(f"stage '{stage.name}' is not validated: its one epoch is kept (validate_every_stage=True "
                         f"validates it)")
        return False

    def resume_checkpoint(self, resume_file):
        """Remembers where to go on: fit skips the stages before the checkpoint's and restores it in its stage."""
        checkpoint = read_resume_checkpoint(resume_file, self.config)
        self._resume_stage_index([stage for stage in self.model.training_stages() if stage.epochs > 0], checkpoint)
        self._resume_from = checkpoint
        done = "at its end" if checkpoint["finished"] else f"after epoch {checkpoint['epoch']}"
        self.logger.info(f"Checkpoint loaded. Resume training in stage '{checkpoint['stage']}' {done}")

    def _resume_stage_index(self, stages, checkpoint):
        if checkpoint is None:
            return 0
        names = [stage.name for stage in stages]
        if checkpoint["stage"] not in names:
            raise RecBoleLLMError(
                f"the checkpoint to resume stopped in stage '{checkpoint['stage']}', which this run does not train "
                f"(stages with epochs > 0: {', '.join(names)}): use the stage epochs of the interrupted run"
            )
        return names.index(checkpoint["stage"])

    def _restore_training_state(self, checkpoint):
        super()._restore_training_state(checkpoint)
        self.scheduler.load_state_dict(checkpoint["scheduler"])

    @advises_on_out_of_memory("train")
    def _train_epoch(self, train_data, epoch_idx, loss_func=None, show_progress=False):
        self._begin_epoch(epoch_idx)
        self.model.train()
        with self._out_of_memory_advice("items"), self.autocast():
            self.model.begin_epoch(epoch_idx)
        loss_func = loss_func or self.distributed_model or self.model.calculate_loss  # DDP's forward: calculate_loss
        if not self.config["single_spec"] and train_data.shuffle:
            train_data.sampler.set_epoch(epoch_idx)
        n_batches = self._batches_per_epoch(train_data)
        batches = tqdm(
            train_data, total=n_batches, ncols=100, disable=not show_progress,
            desc=set_color(f"Train {self.stage.name} {epoch_idx:>3}", "pink"),
        )
        parameters = [p for p in self.model.parameters() if p.requires_grad]
        total_loss = None  # summed on the device: no host sync per step
        first_non_finite = torch.tensor(n_batches, device=self.device)  # index of the first nan/inf loss, if any
        first_non_finite_gradient = first_non_finite.clone()  # ... and of nan/inf gradients of a finite loss
        self.optimizer.zero_grad()
        for batch_idx, interaction in enumerate(batches):
            interaction = interaction.to(self.device)
            last_batch = batch_idx + 1 == n_batches
            optimizer_step = (batch_idx + 1) % self.grad_accum_steps == 0 or last_batch
            with self.gradient_sync(optimizer_step):
                with self.autocast():
                    losses = loss_func(interaction)
                loss_terms = torch.stack(list(losses)) if isinstance(losses, tuple) else losses.reshape(1)
                loss = loss_terms.sum()
                (loss / self.grad_accum_steps).backward()
            total_loss = loss_terms.detach() if total_loss is None else total_loss + loss_terms.detach()
            first_non_finite = first_non_finite.minimum(torch.where(loss.isfinite(), n_batches, batch_idx))
            if optimizer_step:
                norm = clip_grad_norm_(parameters, **self.clip_grad_norm) if self.clip_grad_norm \
                    else get_total_norm([weights.grad for weights in parameters if weights.grad is not None])
                first_non_finite_gradient = first_non_finite_gradient.minimum(
                    torch.where(norm.isfinite(), n_batches, batch_idx))
                self.optimizer.step()
                self.scheduler.step()
                self.optimizer.zero_grad()
            if show_progress and batch_idx % 10 == 0:
                batches.set_postfix(loss=f"{loss.item():.4f}")
                # the host waits here anyway
                self._stop_on_non_finite(first_non_finite, first_non_finite_gradient, n_batches, total_loss)
            if last_batch:
                break  # a capped epoch: the shuffled loader gives a different subset each epoch
        self._stop_on_non_finite(first_non_finite, first_non_finite_gradient, n_batches, total_loss)
        epoch_losses = total_loss.tolist()
        return tuple(epoch_losses) if len(epoch_losses) > 1 else epoch_losses[0]

    def _stop_on_non_finite(self, first_non_finite, first_non_finite_gradient, n_batches, summed_terms):
        """summed_terms: the epoch's running sum of each loss term, which stays nan/inf once a term was. Gradients
        that became nan/inf under a finite loss come first: the step wrote them into the weights, so every later loss
        is nan, but the fault was in a backward pass."""
        loss_batch, gradient_batch = int(first_non_finite), int(first_non_finite_gradient)
        where = f"of epoch {self._epoch} in stage '{self.stage.name}'"
        if gradient_batch < min(loss_batch, n_batches):
            raise self._non_finite_loss_error(f"batch {gradient_batch} {where}, under a finite loss", "gradients")
        if loss_batch < n_batches:
            non_finite_terms = ~summed_terms.isfinite()
            terms = [f"train_loss{index + 1}" for index in non_finite_terms.nonzero().flatten().tolist()]
            of_terms = f" ({', '.join(terms)} of {len(non_finite_terms)})" if len(non_finite_terms) > 1 else ""
            raise self._non_finite_loss_error(f"batch {loss_batch} {where}{of_terms}")

    def _batch_size_advice(self, phase):
        size = self.config["train_batch_size"]
        if phase != "train":
            return super()._batch_size_advice(phase)
        if size == 1:
            return "while training with train_batch_size=1: set gradient_checkpointing=True or use a smaller LLM"
        return (
            f"{super()._batch_size_advice(phase)} with --grad_accum_steps={2 * self.grad_accum_steps} to keep the "
            f"effective batch of {size * self.grad_accum_steps}, or set gradient_checkpointing=True"
        )

    def autocast(self):
        """bf16 autocast on a GPU, or on a CPU with cpu_bf16; none otherwise (the models keep scores and losses fp32)."""
        return torch.autocast(self.device.type, dtype=self.amp_dtype, enabled=self.amp_dtype is not None)

    def evaluate(self, eval_data, load_best_model=True, model_file=None, show_progress=False):
        with self.autocast():  # item matrices and scores (the candidates' too) computed as training computes them
            return super().evaluate(eval_data, load_best_model, model_file, show_progress)

    @torch.no_grad()
    def ranking_result(self, eval_data, load_best_model, model_file, show_progress):
        if load_best_model and eval_data:
            self._load_best(model_file or self.saved_model_file)
        if eval_data:
            self.model.eval()  # the hook computes item matrices: without dropout
            with self._out_of_memory_advice("items"):
                self.model.begin_evaluation()
        result = super().ranking_result(eval_data, False, None, show_progress)
        if eval_data:
            self.model.end_evaluation()
        return result

    def _load_best(self, checkpoint_file):
        load_model_state(self.model, self.read_checkpoint(checkpoint_file))
        self.logger.info(f"Loading trainable parameters of stage '{self.model.stage}' from {checkpoint_file}")

    def checkpoint_state(self, epoch, finished=False):
        return {**super().checkpoint_state(epoch, finished), "scheduler": self.scheduler.state_dict()}
