"""Quality benchmark: RecBole's baselines, Laser and RSLLM on one dataset, split and seed, ranked over all items.

    python -m benchmarks.quality --profile=cpu [--out=benchmarks/results] [--key=value ...]

Runs the profile's `quality` models, once per seed of its `seeds`, as run_recbole_llms does (each LLM model's CF
model gets a row too), and writes quality-<profile>.md (stamp and table), .csv (every metric RecBole computed) and
.png (NDCG@10 and Recall@10). Any other --key=value goes to every run's config, as on run_recbole_llm.py.

Each run (model x seed) is kept as it ends under the checkpoint folder (`saved/quality-<profile>-<settings>-runs/`,
named by a hash of the profile's settings and the command line's: other settings, other runs), so a stopped benchmark
goes on where it stopped, and two processes started alike share the runs; the one that finds them all kept writes the
page. Delete the folder to run them again (e.g. at another commit).
"""

import hashlib
import json
import sys
from pathlib import Path

from benchmarks.kept_runs import claimed, keep, kept
from benchmarks.report import run_script, saved_figure, write_page
from benchmarks.settings import benchmark_settings
from recbole_llm.comparison import CSV_ONLY, comparison_table, markdown_table, shown_rows, table_note, with_companions, write_csv
from recbole_llm.quick_start import check_references, comparison_runs, run_recbole_llm

COLUMNS = {  # comparison-row key -> heading; HR@1 and ValidRatio: LLaRA's candidate protocol (candidate_eval)
    "model": "model",
    "test recall@10": "Recall@10",
    "test recall@20": "Recall@20",
    "test ndcg@10": "NDCG@10",
    "test ndcg@20": "NDCG@20",
    "test mrr@10": "MRR@10",
    "test hr@1_candidates": "HR@1 (candidates)",
    "test valid_ratio": "ValidRatio",
    "test hr@1_x_valid_ratio": "HR@1 x ValidRatio",
    "tested stage": "tested stage",
    "trainable params": "trainable params",
    "train time (s)": "train (s)",
    "eval time (s)": "test eval (s)",
}
PLOTTED = {"test ndcg@10": "test NDCG@10", "test recall@10": "test Recall@10"}


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    profile, out, stamp = benchmark_settings("quality", argv)
    results = shared_runs(profile)
    if results is None:
        print("quality: runs of this profile are still under way in another process, which writes the page")
        return None
    rows, shown = compared_rows(with_companions(results), profile)
    out.mkdir(parents=True, exist_ok=True)
    stem = str(out / f"quality-{profile.name}")
    write_csv(stem, rows)
    with saved_figure(stem, len(PLOTTED)) as axes:
        for axis, (key, label) in zip(axes, PLOTTED.items()):
            axis.barh([row["model"] for row in rows][::-1], [row[key] for row in rows][::-1], color="tab:blue")
            axis.set_xlabel(label)
    title = f"Quality: {profile.dataset}, full ranking over all items, profile {profile.name}"
    write_page(stem, title, stamp, [("Test split", markdown_table(shown, with_differences(COLUMNS, rows)) + "\n\n"
                                      + table_note(results, results[0]["comparison_settings"]))], gpu_name=gpu_name())
    print(f"written: {stem}.md, .csv, .png")
    return rows


def shared_runs(profile):
    """Every run of the profile (seed by seed, model by model), made here or by another process, or kept from an
    earlier call; None while another process still makes some."""
    seeds = profile.seeds or [profile.config.get("seed", 2020)]
    settings = json.dumps([profile.config, profile.quality, seeds], sort_keys=True, default=str)
    folder = Path(profile.config.get("checkpoint_dir", "saved")) / (
        f"quality-{profile.name}-{hashlib.sha1(settings.encode()).hexdigest()[:8]}-runs")
    check_references(list(profile.quality), profile.comparison_references())  # before any training
    paths = []
    for seed in seeds:
        for model, config_dict, cf_configs in comparison_runs(list(profile.quality), profile.dataset, None,
                                                              profile.config, profile.quality, seed):
            paths.append(folder / f"{model}-{seed}.pickle")
            with claimed(paths[-1]) as mine:
                if mine:
                    result = run_recbole_llm(model, profile.dataset, config_dict=config_dict, cf_configs=cf_configs)
                    keep(result, paths[-1])
    if not all(path.exists() for path in paths):
        return None
    return [kept(path) for path in paths]


def compared_rows(results, profile):
    """The rows of a benchmark's table (one per model, over its seeds, with the Δ columns against the profile's
    references; times as numbers), and the same rows as Markdown shows them (mean ± std over several seeds)."""
    rows, seed_rows = comparison_table(results, profile.comparison_references(), results[0]["comparison_settings"])
    for row in rows:  # comparison_rows writes times as text, for the comparison table
        row.update({key: float(row[key]) for key in ("train time (s)", "eval time (s)") if row.get(key) is not None})
    return rows, shown_rows(rows, seed_rows)


def with_differences(columns, rows):
    """columns with the rows' Δ columns after the model."""
    deltas = {key: key for key in rows[0] if key.startswith("Δ ") and not key.endswith(CSV_ONLY)}
    return {"model": columns["model"], **deltas, **{k: v for k, v in columns.items() if k != "model"}}


def gpu_name():
    """The GPU RecBole ran on (it uses the first visible one when CUDA is available), or None."""
    import torch

    return torch.cuda.get_device_name(0) if torch.cuda.is_available() else None


if __name__ == "__main__":
    run_script(main, "quality")
