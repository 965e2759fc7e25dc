"""Quality benchmark: RecBole's baselines, Laser and RSLLM on one dataset, split and seed, ranked over all items.

    python -m benchmarks.quality --profile=cpu [--out=benchmarks/results] [--key=value ...]

Runs the profile's `quality` models with run_recbole_llms (each LLM model's CF model gets a row too) and writes
quality-<profile>.md (stamp and table), .csv (every metric RecBole computed) and .png (NDCG@10 and Recall@10).
Any other --key=value goes to every run's config, as on run_recbole_llm.py.
"""

import sys

from benchmarks.report import run_script, saved_figure, write_page
from benchmarks.settings import benchmark_settings
from recbole_llm.comparison import comparison_rows, markdown_table, with_companions, write_csv
from recbole_llm.quick_start import run_recbole_llms

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
    results = run_recbole_llms(
        list(profile.quality), profile.dataset, config_dict=profile.config, model_config_dicts=profile.quality
    )
    rows = comparison_rows(with_companions(results))
    for row in rows:  # comparison_rows writes times as text, for the comparison table
        row.update({key: float(row[key]) for key in ("train time (s)", "eval time (s)") if row[key] is not None})

    out.mkdir(parents=True, exist_ok=True)
    stem = str(out / f"quality-{profile.name}")
    write_csv(stem, rows)
    with saved_figure(stem, len(PLOTTED)) as axes:
        for axis, (key, label) in zip(axes, PLOTTED.items()):
            axis.barh([row["model"] for row in rows][::-1], [row[key] for row in rows][::-1], color="tab:blue")
            axis.set_xlabel(label)
    title = f"Quality: {profile.dataset}, full ranking over all items, profile {profile.name}"
    write_page(stem, title, stamp, [("Test split", markdown_table(rows, COLUMNS))], gpu_name=gpu_name())
    print(f"written: {stem}.md, .csv, .png")
    return rows


def gpu_name():
    """The GPU RecBole ran on (it uses the first visible one when CUDA is available), or None."""
    import torch

    return torch.cuda.get_device_name(0) if torch.cuda.is_available() else None


if __name__ == "__main__":
    run_script(main, "quality")
