"""Ablations: each model's switches, every setting over several seeds, decided on validation and reported on test with
the paired interval of its difference to the model's default (and to Pop) on the same test users.

    python -m benchmarks.ablations --profile=cpu [--models=Laser,RSLLM] [--out=benchmarks/results] [--key=value ...]

The profile's `ablations` section names the seeds and, per model, its settings (row label -> settings on top of the
defaults; the label `default` is the model as it ships), in the order they run: setting by setting, each over all
seeds. Each run (setting x seed) is kept as it ends in `<out>/ablations-<profile>-runs/` (its scores, its test users'
metrics and the machine it ran on: small, committed beside the page), so a stopped benchmark goes on where it
stopped, in a later session too; two processes share the work (each claims a run before it starts it), and
`--models` runs some models only. Every call ends by writing ablations-<profile>.md and .csv from all the runs kept
so far.
"""

import json
import sys
from datetime import datetime, timezone

import numpy as np

from benchmarks.kept_runs import claimed
from benchmarks.report import run_script, write_page
from benchmarks.settings import benchmark_settings, split_arguments
from recbole_llm.comparison import CF_MODEL, cf_model_differences, markdown_table, reference_differences, write_csv
from recbole_llm.environment import cpu_computes_bf16, run_environment
from recbole_llm.errors import RecBoleLLMError
from recbole_llm.quick_start import run_recbole_llm

DEFAULT = "default"
FLOOR = "Pop"  # every setting is also compared with popularity, the floor
METRICS = ("ndcg@10", "recall@10")
# LLaRA's candidate protocol, where a setting asks for it (candidate_eval: True): HR@1 of the greedy answers, as the
# quality page and rsllm_picks report it; the users and candidates are candidate_seed's, the same for every run
CANDIDATE_METRIC = "hr@1_x_valid_ratio"
RANKED_METRIC = "hr@1_ranked"  # the same candidates as the model ranks them: for RSLLM, the likeliest title per token
BF16_SETTINGS = ("cpu_bf16", "no_grad_bf16")  # on or off, the same fp32 run on a CPU without bf16 matrix units


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    own, _ = split_arguments(argv, own_keys=("profile", "out", "models"))
    profile, out, stamp = benchmark_settings("ablations", [a for a in argv if not a.startswith("--models=")])
    plan = ablation_plan(profile)
    stamp.seeds = plan["seeds"]
    chosen = own["models"].split(",") if "models" in own else list(plan["models"])
    runs_dir = out / f"ablations-{profile.name}-runs"
    runs_dir.mkdir(parents=True, exist_ok=True)
    for model in chosen:  # setting by setting, in the profile's order: the first ones get all their seeds first
        for label, settings in plan["models"][model].items():
            if any(key in settings for key in BF16_SETTINGS) and not cpu_computes_bf16():
                print(f"ablations: {run_label(model, label)} skipped: this CPU has no bf16 matrix units")
                continue
            for seed in plan["seeds"]:
                path = runs_dir / f"{run_label(model, label)}-{seed}.json".replace(" ", "_").replace(":", "")
                with claimed(path) as mine:
                    if mine:
                        config_dict = {**profile.config, "candidate_eval": False, **settings, "seed": seed}
                        result = run_recbole_llm(model, profile.dataset, config_dict=config_dict)
                        path.write_text(json.dumps(kept(result, model, label, stamp.revision)))
    write_ablation_page(profile, plan, runs_dir, out, stamp)


def ablation_plan(profile):
    """{"seeds": [...], "models": {model: {label: settings}}} from the profile's `ablations`, the floor included."""
    section = profile.extra.get("ablations") or {}
    seeds = section.get("seeds") or []
    models = {model: settings for model, settings in section.items() if model != "seeds"}
    if len(seeds) < 2 or not models:
        raise RecBoleLLMError(f"profile {profile.name} has no ablations with seeds (at least 2) and models: see "
                              f"benchmarks/profiles/cpu.yaml")
    models.setdefault(FLOOR, {DEFAULT: {}})
    return {"seeds": seeds, "models": {model: {label: s or {} for label, s in runs.items()}
                                       for model, runs in models.items()}}


def run_label(model, label):
    return model if label == DEFAULT else f"{model} ({label})"


def kept(result, model, label, commit):
    """What the page needs of one run: its scores and its test users' metrics, and those of the CF model it reads;
    when it ended and the commit it ran (a page written later from kept runs says when they were made)."""
    return {
        "model": run_label(model, label), "base": model, "setting": label, "seed": result["seed"],
        "best_valid_score": result["best_valid_score"], "test_result": dict(result["test_result"]),
        "test_per_user": test_users(result), "candidate_per_user": candidate_users(result),
        "companions": [{"model": companion["model"], "seed": companion["seed"],
                        "test_result": dict(companion["test_result"]), "test_per_user": test_users(companion)}
                       for companion in result["companions"]],
        "train_time": result["train_time"], "comparison_settings": result["comparison_settings"],
        "environment": run_environment(), "autocast": result["autocast"],
        "ended": f"{datetime.now(timezone.utc):%Y-%m-%d %H:%M}", "commit": commit,
    }


def test_users(result):
    per_user = result["test_per_user"]
    return {"user_id": [str(u) for u in per_user["user_id"]],
            **{metric: per_user[metric].tolist() for metric in METRICS}}


def candidate_users(result):
    """The candidate protocol's users and their hits, where the run answered candidates; else None."""
    per_user = result.get("candidate_per_user")
    if per_user is None:
        return None
    return {"user_id": [str(u) for u in per_user["user_id"]], CANDIDATE_METRIC: per_user[CANDIDATE_METRIC].tolist()}


def read_runs(runs_dir):
    runs = []
    for path in sorted(runs_dir.glob("*.json")):
        run = json.loads(path.read_text())
        for row in (run, *run.get("companions", ())):  # runs kept before companions were have none
            for key in ("test_per_user", "candidate_per_user"):
                if row.get(key) is not None:
                    row[key] = {name: np.asarray(values) for name, values in row[key].items()}
        runs.append(run)
    return runs


def write_ablation_page(profile, plan, runs_dir, out, stamp):
    runs = read_runs(runs_dir)
    if not runs:
        return
    settings = {**runs[0]["comparison_settings"], "significance_metrics": ["ndcg@10", CANDIDATE_METRIC]}
    alpha = settings["significance_level"]
    rows = []
    for model, labels in plan["models"].items():
        family = [run for run in runs if run["base"] == model]
        floor = [run for run in runs if run["base"] == FLOOR]
        seeds_of = {label: sorted(run["seed"] for run in family if run["setting"] == label) for label in labels}
        kept_labels = [label for label in labels if seeds_of[label]]
        if not kept_labels:
            continue
        # settings with every seed of the plan form the Holm family; one with fewer (its runs still to come) is
        # compared alone, over the seeds it ran, so that it never narrows the others' comparison to its seeds
        complete = [label for label in kept_labels if set(seeds_of[label]) >= set(plan["seeds"])]
        partial = [label for label in kept_labels if label not in complete]
        to_default, to_floor, paired_over = {}, {}, {}  # {(metric, row name): PairedDifference}
        for group in ([complete] if complete else []) + [[label] for label in partial]:
            seeds = set.intersection(*(set(seeds_of[label]) for label in group))
            if model != FLOOR:
                seeds &= {run["seed"] for run in floor} & set(seeds_of.get(DEFAULT, seeds))
            group_runs = [run for run in family + floor if run["seed"] in seeds
                          and (run["base"] == FLOOR or run["setting"] in (*group, DEFAULT))]
            names = {run_label(model, label) for label in group}  # the default's own rows come from its group
            if model != FLOOR and seeds:
                for reference, found in ((model, to_default), (FLOOR, to_floor)):
                    if reference == model and not seeds_of.get(DEFAULT):
                        continue
                    for (metric, _), differences in reference_differences(group_runs, [reference], settings).items():
                        found.update({(metric, name): d for name, d in differences.items() if name in names})
            paired_over.update({label: sorted(seeds) for label in group})
        to_cf = cf_differences(family, settings)
        for label in kept_labels:
            label_runs = [run for run in family if run["setting"] == label]
            cf_test = [run["companions"][0]["test_result"]["ndcg@10"] for run in label_runs if run.get("companions")]
            valid = [run["best_valid_score"] for run in label_runs]
            test = [run["test_result"]["ndcg@10"] for run in label_runs]
            hits = [run["test_result"][CANDIDATE_METRIC] for run in label_runs if run.get("candidate_per_user")]
            ranked_hits = [run["test_result"][RANKED_METRIC] for run in label_runs if run.get("candidate_per_user")]
            name = run_label(model, label)
            rows.append({
                "model": model, "setting": label, "seeds": ",".join(map(str, seeds_of[label])),
                "valid NDCG@10": mean_std(valid), "test NDCG@10": mean_std(test),
                "Δ test NDCG@10 vs default": difference_text(to_default, "ndcg@10", name, alpha),
                "Δ test NDCG@10 vs Pop": difference_text(to_floor, "ndcg@10", name, alpha),
                "its CF model's test NDCG@10": mean_std(cf_test) if cf_test else "-",
                "Δ test NDCG@10 vs its CF model": difference_text(to_cf, "ndcg@10", name, alpha),
                "p vs default (Holm)": getattr(to_default.get(("ndcg@10", name)), "p_holm", None),
                "HR@1 x VR": mean_std(hits) if hits else "-",
                "Δ HR@1 x VR vs default": difference_text(to_default, CANDIDATE_METRIC, name, alpha),
                "Δ HR@1 x VR vs Pop": difference_text(to_floor, CANDIDATE_METRIC, name, alpha),
                "HR@1 likeliest": mean_std(ranked_hits) if ranked_hits else "-",
                "valid mean": float(np.mean(valid)), "test mean": float(np.mean(test)),
                "train (s)": float(np.mean([run["train_time"] for run in label_runs])),
                "paired over seeds": ",".join(map(str, paired_over[label])),
            })
    out.mkdir(parents=True, exist_ok=True)
    stem = str(out / f"ablations-{profile.name}")
    write_csv(stem, rows)
    shown = ["model", "setting", "seeds", "valid NDCG@10", "test NDCG@10", "Δ test NDCG@10 vs default",
             "Δ test NDCG@10 vs Pop", "train (s)"]
    if any(row["its CF model's test NDCG@10"] != "-" for row in rows):  # an LLM model: the CF model it reads
        shown[-1:-1] = ["its CF model's test NDCG@10", "Δ test NDCG@10 vs its CF model"]
    if any(row["HR@1 x VR"] != "-" for row in rows):  # a setting answered candidates: their hits beside
        shown[-1:-1] = ["HR@1 x VR", "Δ HR@1 x VR vs default", "Δ HR@1 x VR vs Pop", "HR@1 likeliest"]
    columns = {key: key for key in shown}
    note = (f"valid and test: mean ± std over the seeds. Δ: the setting minus the model's default (or Pop) on the "
            f"same test users, each user's NDCG@10 averaged over the seeds both ran first; the mean and its "
            f"{1 - alpha:.0%} interval from a paired bootstrap over users ({settings['bootstrap_resamples']} "
            f"resamples); * where the paired {settings['significance_test']} test is significant at {alpha} after "
            f"Holm's correction over the model's settings that ran every seed (a setting with fewer seeds, its runs "
            f"still to come, is compared alone over the seeds it ran: a hypothesis). Runs on: {machines(runs)}. "
            f"{when_made(runs)}")
    if "Δ test NDCG@10 vs its CF model" in columns:
        note += (" Its CF model: the frozen CF model each run reads (one per seed), tested on the same users; Δ, each "
                 "setting against the CF models its own runs read, Holm-corrected over the model's settings.")
    if "HR@1 x VR" in columns:
        note += (f" HR@1 x VR: LLaRA's candidate protocol (greedy answers; hits over all asked, invalid answers "
                 f"miss) on the same {candidate_count(runs)} test users and candidates in every run (candidate_seed), "
                 f"its Δ as NDCG@10's (against Pop where Pop answered them too: its most popular candidate). "
                 f"HR@1 likeliest: the candidate the model ranks first (RSLLM: the title with the highest "
                 f"log-likelihood per token as its answer), on the same users.")
    title = f"Ablations: {profile.dataset}, each setting over seeds {', '.join(map(str, plan['seeds']))}, " \
            f"profile {profile.name}"
    write_page(stem, title, stamp, [("Settings", markdown_table(rows, columns) + "\n\n" + note)], figure=False)
    print(f"written: {stem}.md, .csv ({len(runs)} runs)")


def cf_differences(family, settings):
    """{("ndcg@10", row name): PairedDifference} of each setting of a model against the CF models its runs read (each
    run's own, one per seed), Holm-corrected over the settings; {} for models that read none."""
    rows = []
    for run in family:
        for companion in run.get("companions", ()):  # each setting's CF rows apart: its seeds' CF models
            read = {**companion, "model": f"CF model of {run['model']}"}
            rows += [{**run, "companions": [read]}, read]
    found = cf_model_differences(rows, {**settings, "significance_metrics": ["ndcg@10"]}).get(("ndcg@10", CF_MODEL), {})
    return {("ndcg@10", name): difference for name, difference in found.items()}


def candidate_count(runs):
    return "/".join(sorted({str(len(run["candidate_per_user"]["user_id"])) for run in runs
                            if run.get("candidate_per_user")}))


def difference_text(differences, metric, name, alpha):
    difference = differences.get((metric, name))
    return difference.text(alpha) if difference else "-"


def machines(runs):
    """Each machine the runs ran on; where there are several, the runs of all but the most used one by name."""
    by_machine = {}
    for run in runs:
        by_machine.setdefault(run.get("environment", "an unrecorded machine"), []).append(run)
    ordered = sorted(by_machine.items(), key=lambda item: -len(item[1]))
    named = [(machine, ", ".join(f"{run['model']} seed {run['seed']}" for run in runs))
             for machine, runs in ordered[1:]]
    return "; ".join([ordered[0][0]] + [f"{machine} ({names})" for machine, names in named])


def when_made(runs):
    """When the runs ended (UTC) and at which commits; runs kept before these were recorded are counted."""
    dated = [run for run in runs if run.get("ended")]
    undated = len(runs) - len(dated)
    if not dated:
        return f"The {undated} runs' dates were not recorded."
    ended = sorted(run["ended"] for run in dated)
    commits = ", ".join(dict.fromkeys(run["commit"] or "an unknown commit" for run in dated))
    span = ended[0] if ended[0] == ended[-1] else f"between {ended[0]} and {ended[-1]}"
    text = f"Runs ended {span} UTC, at {commits}"
    return text + (f"; {undated} kept before dates were recorded." if undated else ".")


def mean_std(values):
    return f"{np.mean(values):.4f} ± {np.std(values, ddof=1):.4f}" if len(values) > 1 else f"{values[0]:.4f}"


if __name__ == "__main__":
    run_script(main, "ablations")
