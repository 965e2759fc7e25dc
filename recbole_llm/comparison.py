"""The comparison table of several runs, and the one table writer of the plugin and its benchmarks: Markdown for
people, CSV for scripts.

A comparison runs every model once per seed on the same split. Its table has one row per model: each number's mean
over the seeds (± their standard deviation when there are several), and each row's paired difference to the reference
models, and an LLM model's to the CF model it reads, on the same test users (the users' metrics averaged over the
seeds first): the 95% interval and a mark where the paired test says the difference is significant after Holm's
correction over the table's rows (recbole_llm.statistics). Beside the table: a CSV of its rows (and of every seed's),
and one of every test user's metrics (user id, model, seed, metric, value).
"""

import csv

import numpy as np

from recbole_llm.errors import RecBoleLLMError
from recbole_llm.statistics import paired_difference, with_holm

COLD_METRICS = ("ndcg@10", "recall@10")  # of the test users whose target is a cold item (cold_item_ratio)
SPREAD_KEYS = ("test ", "best valid ", "cold ")  # the numbers whose spread over seeds the table shows
CSV_ONLY = (" std", " low", " high", " p", " p (Holm)")  # the details of a row that only its CSV shows
# the settings (properties/overall.yaml) of the comparison's differences to its reference models
SIGNIFICANCE_SETTINGS = ("significance_metrics", "significance_test", "significance_level", "bootstrap_resamples")
CF_MODEL = "its CF model"  # the reference of an LLM model's row in its Δ columns: the CF model it reads


def with_companions(results):
    """The results of run_recbole_llm, each followed by its companion rows (the CF model an LLM model reads)."""
    return [row for result in results for row in (result, *result["companions"])]


def comparison_rows(results):
    """One row per run: test metrics, the best validation score, the tested stage and its trainable parameters, and
    timings."""
    rows = []
    for result in results:
        seed = result.get("seed")
        row = {"model": result["model"], "seed": None if seed is None else str(seed)}  # a label, not a number
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


def write_comparison(results, path_stem, references, settings, footer=()):
    """Write ``<path_stem>.md``, ``.csv`` and ``-users.csv`` for results (run_recbole_llm's, companions included, every
    seed's); references: the row labels the differences are taken against; settings: significance_metrics,
    significance_test, significance_level, bootstrap_resamples. Returns the Markdown."""
    rows, seed_rows = comparison_table(results, references, settings)
    markdown = markdown_table(shown_rows(rows, seed_rows), shown_columns(rows))
    markdown += "\n\n" + "\n".join([table_note(results, settings), *footer])
    with open(path_stem + ".md", "w") as f:
        f.write(markdown + "\n")
    write_csv(path_stem, rows + (seed_rows if len(rows) < len(seed_rows) else []))
    write_user_metrics(f"{path_stem}-users", results, settings["significance_metrics"])
    return markdown


def comparison_table(results, references, settings):
    """The table's rows (one per model, over its seeds, with the Δ columns: the text, and its interval's ends and
    p-values for the CSV) and every seed's own row."""
    seed_rows = comparison_rows(results)
    rows = over_seeds(seed_rows)
    families = {**reference_differences(results, references, settings), **cf_model_differences(results, settings)}
    for (metric, reference), family in families.items():
        for row in rows:
            difference = family.get(row["model"])
            key = difference_column(metric, reference)
            row[key] = difference.text(settings["significance_level"]) if difference else \
                "reference" if row["model"] == reference else None
            if difference:
                row.update({f"{key} low": difference.low, f"{key} high": difference.high,
                            f"{key} p": difference.p_value, f"{key} p (Holm)": difference.p_holm})
    return rows, seed_rows


def shown_columns(rows):
    """Markdown's columns: the model, its Δ columns, then every other key but the CSV's details."""
    shown = [key for key in all_keys(rows) if key != "model" and not key.endswith(CSV_ONLY)]
    deltas = [key for key in shown if key.startswith("Δ ")]
    return {key: key for key in ["model", *deltas, *(key for key in shown if key not in deltas)]}


def shown_rows(rows, seed_rows):
    """The rows as Markdown shows them: `mean ± std` where a model ran with several seeds."""
    return [with_spread(row) for row in rows] if len(rows) < len(seed_rows) else rows


def table_note(results, settings):
    alpha = settings["significance_level"]
    reads = any(result.get("companions") for result in results)
    cf_model = f" (vs {CF_MODEL}: the CF model the row's model reads)" if reads else ""
    return (f"Δ: the row minus the reference{cf_model} on the same {users_count(results)} test users (each user's "
            f"metric averaged over the seeds), the mean and its {1 - alpha:.0%} interval from a paired bootstrap over "
            f"users ({settings['bootstrap_resamples']} resamples); * where the paired {settings['significance_test']} "
            f"test is significant at {alpha} after Holm's correction over the table's rows.")


def difference_column(metric, reference):
    return f"Δ {metric} vs {reference}"


def over_seeds(rows):
    """One row per model: the mean of each number over its seeds and, under ``<key> std``, their standard deviation
    (only when a model ran with several seeds); ``seed`` lists the seeds."""
    groups = {}
    for row in rows:
        groups.setdefault(row["model"], []).append(row)
    summary = []
    for label, group in groups.items():
        if len(group) == 1:
            summary.append(dict(group[0]))
            continue
        row = {"model": label, "seed": ",".join(str(r["seed"]) for r in group)}
        for key in all_keys(group):
            if key in row:
                continue
            numbers = [number(r.get(key)) for r in group]
            if all(n is not None for n in numbers) and key != "trainable params":
                row[key] = float(np.mean(numbers))
                if key.startswith(SPREAD_KEYS):
                    row[f"{key} std"] = float(np.std(numbers, ddof=1))
            else:
                row[key] = group[0].get(key)
        summary.append(row)
    return summary


def number(value):
    """A number of a comparison row (times are written as text) as a float; None for anything else."""
    if isinstance(value, bool) or value is None:
        return None
    try:
        return float(value)
    except (TypeError, ValueError):
        return None


def with_spread(row):
    """A row for Markdown: `mean ± std` where the row has a std."""
    return {key: f"{readable(value)} ± {readable(row[f'{key} std'])}" if f"{key} std" in row else value
            for key, value in row.items()}


def users_over_seeds(results, metric):
    """{row label: (user ids [n] sorted, the users' metric averaged over the label's seeds [n])}, for the rows that
    have per-user metrics."""
    by_label = {}
    for result in results:
        per_user = users_of(result, metric)
        if per_user is None:
            continue
        order = np.argsort(per_user["user_id"], kind="stable")
        by_label.setdefault(result["model"], []).append((per_user["user_id"][order], per_user[metric][order]))
    averaged = {}
    for label, seeds in by_label.items():
        users = seeds[0][0]
        if any(len(ids) != len(users) or np.any(ids != users) for ids, _ in seeds):
            raise RecBoleLLMError(f"the seeds of {label} were tested on different users: compare runs on one split")
        averaged[label] = (users, np.mean([values for _, values in seeds], axis=0))
    return averaged


def users_of(result, metric):
    """The per-user dict of a result that holds `metric`: RecBole's metrics of every test user, or the candidate
    protocol's outcomes of its users; None without it."""
    for key in ("test_per_user", "candidate_per_user"):
        if result.get(key) is not None and metric in result[key]:
            return result[key]
    return None


def reference_differences(results, references, settings):
    """{(metric, reference): {row label: PairedDifference}} for every significance metric and reference that has it
    per user, each family (the rows other than the reference that have it) Holm-corrected."""
    differences = {}
    for metric in settings["significance_metrics"]:
        users = users_over_seeds(results, metric)
        for reference in references:
            if reference in users:  # not where the candidate protocol ran for some models only, not the reference
                pairs = [(label, reference) for label in users if label != reference]
                differences[(metric, reference)] = paired_family(users, pairs, settings)
    return differences


def cf_model_differences(results, settings):
    """{(metric, CF_MODEL): {row label: PairedDifference}}: each LLM model's row minus the CF model it reads (its
    companion row) on the same users, Holm-corrected over the table's LLM rows: does it beat what it reads?"""
    reads = {result["model"]: companion["model"] for result in results for companion in result.get("companions", [])}
    differences = {}
    for metric in settings["significance_metrics"]:
        users = users_over_seeds(results, metric)
        pairs = [(label, cf_label) for label, cf_label in reads.items() if label in users and cf_label in users]
        if pairs:
            differences[(metric, CF_MODEL)] = paired_family(users, pairs, settings)
    return differences


def paired_family(users, pairs, settings):
    """{label: PairedDifference of label's users against the other's} for (label, other) pairs of users_over_seeds,
    Holm-corrected together."""
    family = {}
    for label, other in pairs:
        (user_ids, values), (other_ids, other_values) = users[label], users[other]
        if len(user_ids) != len(other_ids) or np.any(user_ids != other_ids):
            raise RecBoleLLMError(f"{label} and {other} were tested on different users: compare runs on one split")
        family[label] = paired_difference(
            values, other_values, resamples=settings["bootstrap_resamples"],
            level=1 - settings["significance_level"], test=settings["significance_test"],
        )
    with_holm(list(family.values()))
    return family


def users_count(results):
    """How many users the differences are taken over: every test user, and the candidate protocol's where it ran."""
    counts = {len(r["test_per_user"]["user_id"]) for r in results if r.get("test_per_user") is not None}
    text = "/".join(map(str, sorted(counts))) or "0"
    candidates = {len(r["candidate_per_user"]["user_id"]) for r in results if r.get("candidate_per_user")}
    return text + (f" (the candidate protocol's: {'/'.join(map(str, sorted(candidates)))})" if candidates else "")


def write_user_metrics(path_stem, results, metrics):
    """``<path_stem>.csv``: user_id, model, seed, metric, value; a row per user, run and metric (the candidate
    protocol's metrics for its users)."""
    with open(f"{path_stem}.csv", "w", newline="") as file:
        writer = csv.writer(file)
        writer.writerow(["user_id", "model", "seed", "metric", "value"])
        for result in results:
            for metric in metrics:
                per_user = users_of(result, metric)
                if per_user is not None:
                    writer.writerows(
                        (user, result["model"], result.get("seed"), metric, repr(float(value)))
                        for user, value in zip(per_user["user_id"], per_user[metric])
                    )


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
