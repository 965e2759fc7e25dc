"""What RSLLM's pick depends on: its candidate protocol on the same test users with the ID slots as trained, zeroed
and shuffled, and where in the list its picks sit.

    python -m benchmarks.rsllm_picks --checkpoint=saved/RSLLM-<time>.pth [--users=300] [--out=benchmarks/results]
    python -m benchmarks.rsllm_picks --profile=cpu [--users=300]     # trains RSLLM with the profile's settings first
    python -m benchmarks.rsllm_picks --profile=cpu-long --variants=trained   # the slots as trained only, all users

The checkpoint (or the run it trains) is loaded with load_data_and_model; its test users (`users` of them, drawn with
the seed, or all) get LLaRA's candidate protocol (n_candidates items, the target among them, seeded) four times:

- as trained;
- ID slots zeroed: every projected ID in the prompts (history and candidates) set to 0, so the LLM reads titles alone;
- ID slots shuffled: each item's slot holds another item's projected ID (a fixed random permutation of the items).

A model that ignores its slots picks alike in all three; `--variants` (e.g. trained, or trained,zeroed) reads some
of them only: each is a full candidate reading, about 17 minutes for 943 users on 2 CPU cores. Beside them, on the
same users and candidates, two ID pickers that take their best-scored candidate: the items' popularity (their count
among the training split's next items) and the CF model whose item embeddings fill RSLLM's ID slots.

For each: LLaRA's HR@1, ValidRatio and HR@1 x ValidRatio (greedy answers), HR@1 of the title ranked most likely
(per token) and of the candidate its full ranking scores highest (the user state against the item tower), and where
the picks sit in the listed order: the share of answers naming the first and the last listed candidate
(1/n_candidates each for a model that reads the user; the targets are placed uniformly), and the largest share any
one position gets. Paired intervals of each row's hits against the trained model's, over the same users. Writes
rsllm-picks-<dataset>.md and .csv (-<profile> after <dataset> where it trained the model with a profile other than
cpu; with --users: -<users>-users-seed-<seed> after it, a page per trained model).
"""

import sys
from contextlib import nullcontext

import numpy as np
import torch

import recbole_llm.candidate_evaluation as candidate_evaluation
from benchmarks.report import run_script, write_page
from benchmarks.settings import benchmark_settings, split_arguments
from recbole_llm.comparison import markdown_table, write_csv
from recbole_llm.errors import RecBoleLLMError
from recbole_llm.quick_start import load_data_and_model, run_recbole_llm
from recbole_llm.statistics import paired_difference, with_holm
from recbole_llm.trainer import autocast_dtype

VARIANT_NAMES = {"trained": "as trained", "zeroed": "ID slots zeroed", "shuffled": "ID slots shuffled"}
VARIANTS = tuple(VARIANT_NAMES.values())
POPULARITY, CF_MODEL = "popularity (training counts)", "CF model (its ID slots)"
HITS = ("hr@1_x_valid_ratio", "hr@1_ranked")


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    own, _ = split_arguments(argv, own_keys=("profile", "out", "checkpoint", "users", "variants"))
    variants = chosen_variants(own.get("variants"))
    profile, out, stamp = benchmark_settings(
        "rsllm_picks", [a for a in argv if not a.startswith(("--checkpoint=", "--users=", "--variants="))]
    )
    checkpoint = own.get("checkpoint") or run_recbole_llm(
        "RSLLM", profile.dataset, config_dict=profile.run_config(profile.quality.get("RSLLM", {}))
    )["saved_model_file"]
    config, model, dataset, train_data, _, test_data = load_data_and_model(checkpoint)
    stamp.seeds = [config["seed"]]  # the one trained model's, not the profile's list
    config["n_candidate_users"] = int(own["users"]) if own.get("users") else None
    pickers = [(variant, model, slots_as(model, variant, config["seed"])) for variant in variants]
    pickers += [(POPULARITY, Popularity(train_data, model.device), nullcontext()),
                (CF_MODEL, model.cf_encoder.recommender, nullcontext())]
    rows, per_user = [], {}
    dtype = autocast_dtype(config, model.device)  # the passes compute as the run's evaluation computed them
    autocast = torch.autocast(model.device.type, dtype=dtype, enabled=dtype is not None)
    for name, picker, slots in pickers:
        with slots, recorded_picks() as picks, autocast:
            metrics, per_user[name] = candidate_evaluation.evaluate_candidates(picker, test_data, config)
        rows.append({"variant": name, **metrics, **pick_positions(picks, config["n_candidates"])})
    for metric in HITS:  # Holm over the other rows, per metric
        differences = with_holm([
            paired_difference(per_user[row["variant"]][metric], per_user[VARIANTS[0]][metric],
                              resamples=config["bootstrap_resamples"], test=config["significance_test"])
            for row in rows[1:]
        ])
        for row, difference in zip(rows[1:], differences):
            row[f"Δ {metric} vs as trained"] = difference.text(config["significance_level"])
    name = dataset.dataset_name  # all test users; some: one page per trained model
    if not own.get("checkpoint") and profile.name != "cpu":  # trained here with another profile's settings
        name += f"-{profile.name}"
    if own.get("users"):
        name += f"-{own['users']}-users-seed-{config['seed']}"
    write_results(out, stamp, name, checkpoint, model, rows)
    return rows


def chosen_variants(names):
    """The variants a --variants value names (comma-separated short names, 'as trained' always first); all if None."""
    if names is None:
        return VARIANTS
    chosen = [name.strip() for name in names.split(",")]
    unknown = [name for name in chosen if name not in VARIANT_NAMES]
    if unknown or "trained" not in chosen:
        raise RecBoleLLMError(f"--variants={names}: name some of {', '.join(VARIANT_NAMES)}, trained among them "
                              f"(every other variant is compared with it)")
    return tuple(label for name, label in VARIANT_NAMES.items() if name in chosen)


class Popularity(torch.nn.Module):
    """Scores every item by its count among the training split's next items (RecBole's Pop counts the same items)."""

    def __init__(self, train_data, device):
        super().__init__()
        dataset = train_data._dataset
        counts = torch.bincount(dataset.inter_feat[dataset.iid_field], minlength=dataset.item_num)
        self.register_buffer("counts", counts.float().to(device))

    @property
    def device(self):
        return self.counts.device

    def full_sort_predict(self, interaction):
        return self.counts.expand(len(interaction), -1)


class slots_as:
    """RSLLM's ID slots (history and candidates alike) as the variant says, while the block runs."""

    def __init__(self, model, variant, seed):
        self.model, self.variant = model, variant
        generator = torch.Generator().manual_seed(seed)
        items = 1 + torch.randperm(model.n_items - 1, generator=generator)  # item i -> another item's ID
        self.permutation = torch.cat([torch.zeros(1, dtype=torch.long), items]).to(model.device)

    def __enter__(self):
        original = self.model.id_slots

        def id_slots(item_seq, stage):
            if self.variant == "ID slots shuffled":
                item_seq = self.permutation[item_seq]
            slots = original(item_seq, stage)
            return None if slots is None else slots * (self.variant != "ID slots zeroed")

        self.model.id_slots = id_slots
        return self

    def __exit__(self, *exc):
        del self.model.id_slots  # the class's method again


class recorded_picks:
    """Which listed position each answer names (-1: none or several) and each title ranked most likely picks."""

    def __enter__(self):
        self.named, self.ranked, self.judged = [], [], candidate_evaluation.judged_candidates

        def judged(model, interaction, candidates):
            rankings, named, answers = self.judged(model, interaction, candidates)
            self.named.append(torch.where(named.sum(1) == 1, named.int().argmax(1), -1))
            self.ranked.append(rankings[candidate_evaluation.RANKED].argmax(1))
            return rankings, named, answers

        candidate_evaluation.judged_candidates = judged
        return self

    def __exit__(self, *exc):
        candidate_evaluation.judged_candidates = self.judged


def pick_positions(picks, n_candidates):
    """Shares of the valid answers (and of the likeliest titles) at the first and last listed position, and the
    largest share of any one position."""
    row = {}
    for name, positions in (("answer", torch.cat(picks.named)), ("likeliest", torch.cat(picks.ranked))):
        positions = positions[positions >= 0].numpy()
        counts = np.bincount(positions, minlength=n_candidates) / max(len(positions), 1)
        row.update({f"{name} first": counts[0], f"{name} last": counts[-1], f"{name} top position": counts.max(),
                    f"{name} top at": int(counts.argmax())})
    return row


def write_results(out, stamp, name, checkpoint, model, rows):
    out.mkdir(parents=True, exist_ok=True)
    stem = str(out / f"rsllm-picks-{name}")
    write_csv(stem, rows)
    columns = {"variant": "variant", "hr@1_candidates": "HR@1", "valid_ratio": "ValidRatio",
               "hr@1_x_valid_ratio": "HR@1 x ValidRatio", "hr@1_ranked": "HR@1 (likeliest title)",
               "hr@1_ranked_scores": "HR@1 (its full ranking's scores)",
               "Δ hr@1_x_valid_ratio vs as trained": "Δ HR@1 x ValidRatio", "Δ hr@1_ranked vs as trained":
               "Δ HR@1 (likeliest)", "answer first": "answers: first listed", "answer last": "last listed",
               "answer top position": "most picked position: share", "answer top at": "at",
               "likeliest first": "likeliest: first listed", "likeliest last": "last listed"}
    gate = model.slot_gate.item()
    note = (f"{checkpoint}: stage {model.stage}, slot gate {gate:+.3f} (the ID slots enter the prompt times this). "
            f"Δ: the variant's per-user hits minus the trained model's on the same users, with a paired bootstrap "
            f"95% interval; * where the paired test is significant after Holm's correction. A model that reads its "
            f"users puts 1/n_candidates of its picks at each position.")
    write_page(stem, f"RSLLM's picks: {name}", stamp, [("Candidate protocol", markdown_table(rows, columns)
                                                                 + "\n\n" + note)], figure=False)
    print(f"written: {stem}.md, .csv")


if __name__ == "__main__":
    run_script(main, "rsllm_picks")
