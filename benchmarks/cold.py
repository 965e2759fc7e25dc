"""Cold-start benchmark: the profile's `cold` runs on one dataset, split and seed, with a share of the items cold
(no training interaction at all: cold_item_ratio, 0.1 unless the profile or the command line sets it), ranked over
all items; beside the usual test metrics, each model's NDCG@10 and Recall@10 on the test users whose target is cold.

    python -m benchmarks.cold --profile=cpu [--out=benchmarks/results] [--key=value ...]

Writes cold-<profile>.md (stamp and table), .csv (every metric RecBole computed) and .png (NDCG@10 on all test users
and on those of cold targets). The CF model the LLM models read gets a row once (they read the same one).
"""

import sys

from benchmarks.quality import gpu_name
from benchmarks.report import run_script, saved_figure, write_page
from benchmarks.settings import benchmark_settings
from recbole_llm.comparison import comparison_rows, markdown_table, write_csv
from recbole_llm.quick_start import run_recbole_llm

COLD_ITEM_RATIO = 0.1
COLUMNS = {
    "model": "model",
    "test ndcg@10": "NDCG@10",
    "test recall@10": "Recall@10",
    "cold users": "test users of cold targets",
    "cold ndcg@10": "cold NDCG@10",
    "cold recall@10": "cold Recall@10",
    "trainable params": "trainable params",
    "train time (s)": "train (s)",
}
PLOTTED = {"test ndcg@10": "test NDCG@10, all users", "cold ndcg@10": "test NDCG@10, users of cold targets"}


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    profile, out, stamp = benchmark_settings("cold", argv)
    ratio = profile.config.get("cold_item_ratio", COLD_ITEM_RATIO)
    results, companions = [], {}
    for label, settings in profile.cold.items():
        # the page ranks all items: no candidate protocol (the profile may turn it on for quality)
        config_dict = profile.run_config({"cold_item_ratio": ratio, "candidate_eval": False, **settings})
        result = run_recbole_llm(settings["model"], profile.dataset, config_dict=config_dict)
        results.append({**result, "model": label})
        for companion in result["companions"]:  # the LLM models read one CF model: its row once
            companions.setdefault(companion["model"].split(" (")[0], companion)
    rows = comparison_rows(results + [{**row, "model": f"{name} (CF model of the LLM models)"}
                                      for name, row in companions.items()])

    out.mkdir(parents=True, exist_ok=True)
    stem = str(out / f"cold-{profile.name}")
    write_csv(stem, rows)
    with saved_figure(stem, len(PLOTTED)) as axes:
        for axis, (key, label) in zip(axes, PLOTTED.items()):
            axis.barh([row["model"] for row in rows][::-1], [row[key] or 0 for row in rows][::-1], color="tab:blue")
            axis.set_xlabel(label)
    title = f"Cold-start items: {profile.dataset}, {ratio:.0%} of the items cold, profile {profile.name}"
    write_page(stem, title, stamp, [("Test split", markdown_table(rows, COLUMNS))], gpu_name=gpu_name())
    print(f"written: {stem}.md, .csv, .png")
    return rows


if __name__ == "__main__":
    run_script(main, "cold")
