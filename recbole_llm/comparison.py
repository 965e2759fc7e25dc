"""The comparison table of several runs, and the one table writer of the plugin and its benchmarks: Markdown for
people, CSV for scripts."""

import csv

COLD_METRICS = ("ndcg@10", "recall@10")  # of the test users whose target is a cold item (cold_item_ratio)


def with_companions(results):
    """The results of run_recbole_llm, each followed by its companion rows (the CF model an LLM model reads)."""
    return [row for result in results for row in (result, *result["companions"])]


def comparison_rows(results):
    """One row per run: test metrics, the best validation score, the tested stage and its trainable parameters, and
    timings."""
    rows = []
    for result in results:
        row = {"model": result["model"]}
        row.update({f"test {k}": v for k, v in (result["test_result"] or {}).items()})
        cold_result = result.get("cold_test_result")
        if cold_result is not None:
            row["cold users"] = cold_result["users"]
            row.update({f"cold {metric}": cold_result.get(metric) for metric in COLD_METRICS})
        row[f"best valid {result['valid_metric']}"] = result["best_valid_score"]
        row["tested stage"] = result.get("tested_stage")  # which stage's best weights the test read
        row["trainable params"] = result["trainable_parameters"]
        row["train time (s)"] = f"{result['train_time']:.1f}" if result["train_time"] is not None else None
        row["eval time (s)"] = f"{result['eval_time']:.1f}"
        rows.append(row)
    return rows


def write_comparison(results, path_stem):
    """Write ``<path_stem>.md`` and ``<path_stem>.csv``; returns the Markdown."""
    rows = comparison_rows(results)
    markdown = markdown_table(rows)
    with open(path_stem + ".md", "w") as f:
        f.write(markdown + "\n")
    write_csv(path_stem, rows)
    return markdown


def markdown_table(rows, columns=None):
    """rows (dicts) as a Markdown table of `columns` ({key: heading}; None: every key, as its own heading), numbers
    written to a readable precision."""
    columns = columns or {key: key for key in all_keys(rows)}
    lines = ["| " + " | ".join(columns.values()) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(readable(row.get(key)) for key in columns) + " |" for row in rows]
    return "\n".join(lines)


def write_csv(path_stem, rows):
    """``<path_stem>.csv``: every key of every row, each value as it is."""
    with open(f"{path_stem}.csv", "w", newline="") as file:
        writer = csv.DictWriter(file, fieldnames=all_keys(rows))
        writer.writeheader()
        writer.writerows(rows)


def all_keys(rows):
    return list(dict.fromkeys(key for row in rows for key in row))


def readable(value):
    if value is None or value == "":
        return "-"
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return str(value)
    if isinstance(value, int) or abs(value) >= 1000:
        return f"{value:,.0f}"
    return f"{value:.4f}" if abs(value) < 1 else f"{value:.3g}"  # metrics and shares to 4 decimals
