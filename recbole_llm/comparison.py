"""The comparison table of several runs: Markdown for people, CSV for scripts."""

import csv


def with_companions(results):
    """The results of run_recbole_llm, each followed by its companion rows (the CF model an LLM model reads)."""
    return [row for result in results for row in (result, *result["companions"])]


def comparison_rows(results):
    """One row per run: test metrics, the best validation score, trainable parameters and timings."""
    rows = []
    for result in results:
        row = {"model": result["model"]}
        row.update({f"test {k}": v for k, v in (result["test_result"] or {}).items()})
        row[f"best valid {result['valid_metric']}"] = result["best_valid_score"]
        row["trainable params"] = result["trainable_parameters"]
        row["train time (s)"] = f"{result['train_time']:.1f}" if result["train_time"] is not None else None
        row["eval time (s)"] = f"{result['eval_time']:.1f}"
        rows.append(row)
    return rows


def to_markdown(rows):
    columns = list(dict.fromkeys(key for row in rows for key in row))
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(_format(row.get(c, "")) for c in columns) + " |" for row in rows]
    return "\n".join(lines)


def write_comparison(results, path_stem):
    """Write ``<path_stem>.md`` and ``<path_stem>.csv``; returns the Markdown."""
    rows = comparison_rows(results)
    markdown = to_markdown(rows)
    with open(path_stem + ".md", "w") as f:
        f.write(markdown + "\n")
    with open(path_stem + ".csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(dict.fromkeys(key for row in rows for key in row)))
        writer.writeheader()
        writer.writerows(rows)
    return markdown


def _format(value):
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.4f}"
    if isinstance(value, int):
        return f"{value:,}"
    return str(value)
