"""Scale: how Laser's and RSLLM's costs grow with the catalog, on synthetic catalogs of growing size.

    python -m benchmarks.scale --profile=cpu [--sizes=1682,10000,50000] [--users=1000] [--out=benchmarks/results]

For each size N, benchmarks/synthetic.py writes a catalog of N items and `users` users (Zipf popularity, histories
that keep to a topic, titles of three words and a year; deterministic from the seed), and a fresh process per model
and size (its peak memory its own) measures, with the profile's `scale` settings on top of its config:

- the item pass: every item's embedding (Laser's item matrix, RSLLM's item tower) with the model's first weights:
  seconds, and the process's peak memory after it;
- full ranking: the validation users' scores over all N items, in the model's eval batches as RecBole's evaluator asks
  for them: seconds per 1,000 users, and the peak memory after it;
- a training step (loss and backward of one batch, the model's first stage), in seconds;
- the checkpoint's size.

The CF model each reads is trained once per size (one short epoch: its cost is RecBole's, not measured here). Each
cost is fitted as a power of N over the sizes (log-log least squares): a slope near 1 is linear growth. Writes
scale-<profile>.md, .csv and .png.
"""

import os
import resource
import sys
import time

import numpy as np
import torch
from recbole.data import create_dataset
from recbole.utils import init_seed

from benchmarks.cost import checkpoint_megabytes, in_fresh_process
from benchmarks.report import run_script, saved_figure, write_page
from benchmarks.settings import benchmark_settings, split_arguments
from benchmarks.synthetic import synthetic_dataset
from recbole_llm.cold_items import data_preparation
from recbole_llm.comparison import markdown_table, write_csv
from recbole_llm.config import Config
from recbole_llm.quick_start import build_model
from recbole_llm.run_log import init_run_logger
from recbole_llm.utils import get_trainer

MODELS = ("Laser", "RSLLM")
COSTS = {"item pass (s)": "item pass", "eval s / 1,000 users": "full ranking", "train step (s)": "training step",
         "peak memory (MB)": "peak memory", "checkpoint (MB)": "checkpoint"}
DATA_SETTINGS = {"item_text_fields": ["title", "year"], "item_text_template": "{title} ({year})",
                 "load_col": {"inter": ["user_id", "item_id", "timestamp"], "item": ["item_id", "title", "year"]}}


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    own, _ = split_arguments(argv, own_keys=("profile", "out", "sizes", "users"))
    profile, out, stamp = benchmark_settings("scale", [a for a in argv if not a.startswith(("--sizes=", "--users="))])
    settings = profile.extra.get("scale") or {}
    sizes = [int(n) for n in str(own.get("sizes", ",".join(map(str, settings.get("sizes", [1682, 10000, 50000]))))).split(",")]
    users = int(own.get("users", settings.get("users", 1000)))
    data_path = os.path.abspath(settings.get("data_path", "saved/synthetic"))
    rows = []
    for n_items in sizes:
        dataset = synthetic_dataset(data_path, n_items, users, seed=profile.config.get("seed", 2020))
        for model in MODELS:
            config_dict = {**profile.run_config(profile.quality.get(model, {})), **DATA_SETTINGS,
                           **settings.get("config", {}), "data_path": data_path}
            row = in_fresh_process(measure, model, dataset, config_dict, os.getcwd())
            rows.append({"model": model, "items": n_items, "users": users, **row})
            print(f"scale: {model}, {n_items:,} items: {row}", flush=True)
    slopes = fitted_slopes(rows)
    write_results(out, profile, stamp, rows, slopes)
    return rows, slopes


def measure(model_name, dataset, config_dict, workdir):
    """One model on one catalog, in this (fresh) process: the costs of the module's docstring."""
    os.chdir(workdir)
    config = Config(model=model_name, dataset=dataset, config_dict=config_dict)
    init_seed(config["seed"], config["reproducibility"])
    init_run_logger(config)
    train_data, valid_data, _ = data_preparation(config, create_dataset(config))
    model = build_model(config, train_data._dataset)
    trainer = get_trainer(config["MODEL_TYPE"], config["model"])(config, model)
    stage = next(stage for stage in model.training_stages() if stage.epochs > 0)  # the stage fit begins with
    model.set_stage(stage.name)
    row = {}
    with torch.no_grad():
        start = time.perf_counter()
        model.refresh_item_matrix()
        row["item pass (s)"] = time.perf_counter() - start
        row["peak memory after the item pass (MB)"] = peak_megabytes()
        model.eval()
        model.begin_evaluation()  # finds the item matrix current: the scores alone are timed
        start, n_users = time.perf_counter(), 0
        for interaction, *_ in valid_data:
            model.full_sort_predict(interaction.to(model.device))
            n_users += len(interaction)
        row["eval s / 1,000 users"] = (time.perf_counter() - start) / n_users * 1000
    row["peak memory after full ranking (MB)"] = peak_megabytes()
    trainer._start_stage(stage, 1)  # its optimizer: a checkpoint holds the optimizer's state
    batch = next(iter(train_data)).to(model.device)
    model.train()
    times = []
    for _ in range(2):
        start = time.perf_counter()
        losses = model.calculate_loss(batch)
        (sum(losses) if isinstance(losses, tuple) else losses).backward()
        times.append(time.perf_counter() - start)
        model.zero_grad(set_to_none=True)
    row["train step (s)"] = min(times)
    row["peak memory (MB)"] = peak_megabytes()
    row["checkpoint (MB)"] = checkpoint_megabytes(trainer)
    return row


def peak_megabytes():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # the process's peak RSS (KiB on Linux)


def fitted_slopes(rows):
    """Per model and cost: the exponent b of cost = a * N^b over the sizes (log-log least squares)."""
    slopes = []
    for model in MODELS:
        model_rows = [row for row in rows if row["model"] == model]
        if len(model_rows) < 2:
            continue
        n = np.log([row["items"] for row in model_rows])
        slopes.append({"model": model, **{
            f"{name} slope": float(np.polyfit(n, np.log([row[key] for row in model_rows]), 1)[0])
            for key, name in COSTS.items()
        }})
    return slopes


def write_results(out, profile, stamp, rows, slopes):
    out.mkdir(parents=True, exist_ok=True)
    stem = str(out / f"scale-{profile.name}")
    write_csv(stem, rows)
    with saved_figure(stem, 2) as (time_axis, memory_axis):
        for model, marker in zip(MODELS, "os"):
            model_rows = [row for row in rows if row["model"] == model]
            n = [row["items"] for row in model_rows]
            for key, style in (("item pass (s)", "-"), ("eval s / 1,000 users", "--"), ("train step (s)", ":")):
                time_axis.plot(n, [row[key] for row in model_rows], style, marker=marker, label=f"{model}: {key}")
            memory_axis.plot(n, [row["peak memory (MB)"] for row in model_rows], marker=marker, label=model)
        for axis, label in ((time_axis, "seconds"), (memory_axis, "peak memory (MB)")):
            axis.set_xscale("log")
            axis.set_yscale("log")
            axis.set_xlabel("items in the catalog (log scale)")
            axis.set_ylabel(f"{label} (log scale)")
            axis.legend(fontsize="x-small")
    slope_text = "Slopes: cost = a x N^slope fitted over the sizes (1: linear in the catalog)."
    write_page(stem, f"Scale: synthetic catalogs, profile {profile.name}", stamp, [
        ("Cost per catalog size", markdown_table(rows)),
        ("Growth with the catalog", markdown_table(slopes) + "\n\n" + slope_text),
    ])
    print(f"written: {stem}.md, .csv, .png")


if __name__ == "__main__":
    run_script(main, "scale")
