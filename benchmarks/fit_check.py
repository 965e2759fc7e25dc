"""Fit check: can an LLM model memorise one fixed batch of training samples, and if not, why not?

    python -m benchmarks.fit_check --model=Laser [--steps=200] [--samples=32] [--refresh_every=10] [--key=value ...]

A model that cannot fit 32 samples has a broken or unsteerable gradient path; no learning curve shows that as
plainly. The batch is the first one of the seeded training loader; the model trains on it alone with its own loss,
optimizer and first stage, and begins a new epoch every `refresh_every` steps (Laser's stage 1 recomputes its item
matrix there). Printed first: the geometry of the item matrix (how alike its rows are, and the best CE any user
embedding could reach against it), how much the prefix steers the LLM, and the gradient norm of each trainable
module; then, every `report_every` steps, the batch's CE over all items as an evaluation would score it (eval mode,
the item matrix an evaluation uses); last one line ``fit check: CE <x> after <n> steps``. Any other --key=value goes
to the model's config, as on run_recbole_llm.py.
"""

import sys
from time import time

import torch
import torch.nn.functional as F
from recbole.data import create_dataset, data_preparation
from recbole.utils import init_seed

from benchmarks.settings import split_arguments
from recbole_llm.config import Config
from recbole_llm.quick_start import build_model
from recbole_llm.utils import get_trainer

OWN = {"model": "Laser", "dataset": "ml-100k", "steps": 200, "samples": 32, "refresh_every": 10, "report_every": 10}


def parse(argv):
    """The check's own settings (OWN, of their defaults' types) and the config's overrides."""
    own, overrides = split_arguments(argv, own_keys=tuple(OWN))
    return {key: type(OWN[key])(value) for key, value in own.items()}, overrides


def fixed_batch_model(model_name, dataset_name, samples, overrides):
    """The model (on its first stage, with its trainer's optimizer) and the first training batch of `samples`."""
    config_dict = {"show_progress": False, "state": "WARNING", **overrides, "train_batch_size": samples}
    config = Config(model=model_name, dataset=dataset_name, config_dict=config_dict)
    init_seed(config["seed"], config["reproducibility"])
    train_data, _, _ = data_preparation(config, create_dataset(config))
    batch = next(iter(train_data)).to(config["device"])
    model = build_model(config, train_data._dataset)
    trainer = get_trainer(config["MODEL_TYPE"], config["model"])(config, model)
    model.begin_stage(next(stage.name for stage in model.training_stages() if stage.epochs > 0))
    return model, trainer._build_optimizer(), batch


def mean_pairwise_cosine(rows):
    """The mean cosine between distinct rows [N, d]: near 1 when they all point one way."""
    unit = F.normalize(rows.float(), dim=-1)
    n = len(unit)
    return (((unit @ unit.T).sum() - n) / (n * (n - 1))).item()


def best_case_ce(item_matrix, targets, tau):
    """CE over all items when each user embedding is its target's own row, and that row minus the mean row."""
    items = F.normalize(item_matrix.float(), dim=-1)
    own = items[targets]
    centred = F.normalize(own - items[1:].mean(0), dim=-1)
    result = []
    for users in (own, centred):
        scores = users @ items.T / tau
        scores[:, 0] = float("-inf")
        result.append(F.cross_entropy(scores, targets).item())
    return result


def user_vectors(model, batch):
    """What the model compares with items, per user: Laser's suffix output, RSLLM's user state."""
    if hasattr(model, "user_embedding"):
        return model.user_embedding(batch[model.ITEM_SEQ], batch[model.ITEM_SEQ_LEN])[0]
    return model.user_states(batch)


def prefix_steering(model, batch):
    """cos(user embedding, the same with the prefix moved by 1x and 10x its std): how much the prefix steers."""
    item_seq, item_len = batch[model.ITEM_SEQ], batch[model.ITEM_SEQ_LEN]
    prefix, _ = model.history_prefix(item_seq, item_len)
    base = model.suffix_output(model.user_prompt, item_seq, item_len, prefix)
    moved = []
    for scale in (1.0, 10.0):
        noise = torch.randn_like(prefix) * prefix.std() * scale
        moved_output = model.suffix_output(model.user_prompt, item_seq, item_len, prefix + noise)
        moved.append(F.cosine_similarity(base, moved_output, dim=-1).mean().item())
    return moved


@torch.no_grad()
def evaluated_ce(model, batch):
    """The batch's CE over all items, scored as an evaluation scores them."""
    model.eval()
    model.begin_evaluation()
    scores = model.full_sort_predict(batch)
    model.train()
    return F.cross_entropy(scores.float(), batch[model.POS_ITEM_ID]).item()


def gradient_norms(model):
    squares = {}
    for name, parameter in model.named_parameters():
        if parameter.grad is not None:
            module = name.split(".")[0]
            squares[module] = squares.get(module, 0.0) + parameter.grad.float().pow(2).sum().item()
    return {module: square**0.5 for module, square in squares.items()}


@torch.no_grad()
def print_diagnostics(model, batch):
    targets = batch[model.POS_ITEM_ID]
    n_items = model.n_items - 1
    print(f"fixed batch: {len(targets)} samples, {len(set(targets.tolist()))} distinct targets; "
          f"chance CE ln({n_items}) = {torch.tensor(float(n_items)).log():.2f}")
    model.eval()
    model.begin_evaluation()
    items = model.item_matrix[1:]
    users = user_vectors(model, batch)
    scores = model.full_sort_predict(batch)[:, 1:]
    print(f"item rows: mean pairwise cosine {mean_pairwise_cosine(items):.3f}; users: "
          f"{mean_pairwise_cosine(users):.3f}; per-user std of the scores {scores.std(1).mean():.2f} logits")
    if "tau" in model.config:
        own, centred = best_case_ce(model.item_matrix, targets, model.config["tau"])
        print(f"best case CE, user = target's own row: {own:.2f}; = its row minus the mean row: {centred:.2f}")
    if getattr(model, "prefix_mode", "none") != "none":
        moved = prefix_steering(model, batch)
        print(f"prefix steering: cos(user embedding, with the prefix moved by 1x / 10x its std) "
              f"{moved[0]:.3f} / {moved[1]:.3f}")
    model.train()


def main(argv=None):
    if argv is None:
        argv, sys.argv = sys.argv[1:], sys.argv[:1]  # RecBole's Config would read the command line again
    return fit_check(*parse(argv))


def fit_check(own, overrides):
    """Prints the diagnostics and the CE along the way; returns the last CE."""
    own = {**OWN, **own}
    model, optimizer, batch = fixed_batch_model(own["model"], own["dataset"], own["samples"], overrides)
    print_diagnostics(model, batch)
    start, ce = time(), None
    for step in range(own["steps"]):
        if step % own["refresh_every"] == 0:
            model.begin_epoch(step // own["refresh_every"])
        optimizer.zero_grad()
        losses = model.calculate_loss(batch)
        losses = losses if isinstance(losses, tuple) else (losses,)
        sum(losses).backward()
        if step == 0:
            print("gradient norms at step 0: " + ", ".join(f"{k} {v:.3g}" for k, v in gradient_norms(model).items()))
        optimizer.step()
        if (step + 1) % own["report_every"] == 0 or step + 1 == own["steps"]:
            ce = evaluated_ce(model, batch)
            losses_text = " ".join(f"{loss.item():.3f}" for loss in losses)
            print(f"step {step + 1:4d}  CE {ce:.3f}  (training losses {losses_text}; {time() - start:.0f} s)", flush=True)
    print(f"fit check: CE {ce:.2f} after {own['steps']} steps")
    return ce


if __name__ == "__main__":
    main()
