"""Learning curves: each LLM model's validation NDCG@10 against the training samples it has seen and the wall time,
with the other models of the run (Pop, SASRec) and the CF model it reads as horizontal lines, and the profile's
`equal_samples` rows (label -> settings, `model` among them: e.g. SASRec at the LLM models' batch size with capped
epochs) as curves of their own: which model gets further with the same samples.

    python -m benchmarks.curves --profile=cpu-long [--out=benchmarks/results] [--key=value ...]

Runs the profile's `quality` models one after the other, as the quality benchmark does. An LLM model validates
after every epoch of train_batches_per_epoch batches, so its curve has a point every train_batches_per_epoch *
train_batch_size samples. Writes curves-<profile>.md (stamp, the test table, the curves), .csv (a row per
validation) and .png (the curves against samples and against minutes).
"""

import sys
from time import time

from benchmarks.quality import COLUMNS, compared_rows, gpu_name, with_differences
from benchmarks.report import run_script, saved_figure, write_page
from benchmarks.settings import benchmark_settings, labelled_runs
from recbole_llm.comparison import markdown_table, table_note, with_companions, write_csv
from recbole_llm.config import Config
from recbole_llm.errors import RecBoleLLMError
from recbole_llm.model.abstract_recommender import LLMSequentialRecommender
from recbole_llm.quick_start import run_recbole_llm
from recbole_llm.utils import get_model

CURVE_COLUMNS = {"model": "model", "seed": "seed", "validation": "validation", "samples": "samples seen", "minutes": "minutes",
                 "valid ndcg@10": "valid NDCG@10"}


class Curve:
    """A callback_fn for Trainer.fit: one point per validation (samples seen, minutes since the run started)."""

    def __init__(self, model, samples_per_epoch, seed):
        self.model, self.samples_per_epoch, self.seed = model, samples_per_epoch, seed
        self.points = []
        self.start = time()

    def __call__(self, epoch_idx, valid_score):
        validation = len(self.points) + 1
        self.points.append({
            "model": self.model,
            "seed": self.seed,
            "validation": validation,
            "samples": validation * self.samples_per_epoch,
            "minutes": (time() - self.start) / 60,
            "valid ndcg@10": valid_score,
        })


def samples_per_epoch(model, dataset, config_dict):
    """Training samples per capped epoch: train_batches_per_epoch * train_batch_size."""
    config = Config(model=model, dataset=dataset, config_dict=config_dict)
    if config["train_batches_per_epoch"] is None:
        raise RecBoleLLMError(f"a curve of {model} needs train_batches_per_epoch: its samples per validation")
    return config["train_batches_per_epoch"] * config["train_batch_size"]


def equal_sample_curves(profile, seed):
    """The profile's equal_samples rows, each trained with a curve; returns their curves {(label, seed): Curve}."""
    curves = {}
    for label, settings in labelled_runs(profile.extra.get("equal_samples")).items():
        config_dict = {**profile.run_config(settings), "seed": seed}
        curve = curves[(label, seed)] = Curve(label, samples_per_epoch(settings["model"], profile.dataset, config_dict),
                                              seed)
        run_recbole_llm(settings["model"], profile.dataset, config_dict=config_dict, callback_fn=curve)
    return curves


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    profile, out, stamp = benchmark_settings("curves", argv)
    curves, results = {}, []
    for seed in profile.seeds or [profile.config.get("seed", 2020)]:
        for model, settings in profile.quality.items():  # one after the other: each curve's clock starts with its run
            config_dict = {**profile.run_config(settings), "seed": seed}
            callback = None
            if issubclass(get_model(model), LLMSequentialRecommender):
                config_dict["validate_every_stage"] = True  # a point after every epoch, each stage's too
                callback = curves[(model, seed)] = Curve(model, samples_per_epoch(model, profile.dataset, config_dict),
                                                         seed)
            results.append(run_recbole_llm(model, profile.dataset, config_dict=config_dict, callback_fn=callback))
        curves.update(equal_sample_curves(profile, seed))
    rows, shown = compared_rows(with_companions(results), profile)
    points = [point for curve in curves.values() for point in curve.points]
    best_valid = f"best valid {results[0]['valid_metric']}"  # NDCG@10 in every profile
    llm_models = {model for model, _ in curves}  # and the equal_samples rows
    lines = {row["model"]: row[best_valid] for row in rows if row["model"] not in llm_models}

    out.mkdir(parents=True, exist_ok=True)
    stem = str(out / f"curves-{profile.name}")
    write_csv(stem, points)
    with saved_figure(stem, 2) as axes:
        for axis, x, label in ((axes[0], "samples", "training samples seen"), (axes[1], "minutes", "minutes")):
            for curve in curves.values():
                axis.plot([p[x] for p in curve.points], [p["valid ndcg@10"] for p in curve.points], marker="o",
                          markersize=3, label=f"{curve.model} (seed {curve.seed})")
            for index, (model, score) in enumerate(lines.items()):
                axis.axhline(score, color=f"C{index + len(curves)}", linestyle="--", label=f"{model} (best)")
            axis.set_xlabel(label)
            axis.set_xscale("log")  # samples from hundreds (an LLM model's epoch) to the ID models' full epochs
            axis.set_ylabel("valid NDCG@10")
        axes[0].legend(fontsize=8)
    title = f"Learning curves: {profile.dataset}, validation NDCG@10, profile {profile.name}"
    write_page(stem, title, stamp, [
        ("Test split", markdown_table(shown, with_differences({**COLUMNS, best_valid: best_valid}, rows)) + "\n\n"
         + table_note(results, results[0]["comparison_settings"])),
        ("Validation after every epoch", markdown_table(points, CURVE_COLUMNS)),
    ], gpu_name=gpu_name())
    print(f"written: {stem}.md, .csv, .png")
    return rows, points


if __name__ == "__main__":
    run_script(main, "curves")
