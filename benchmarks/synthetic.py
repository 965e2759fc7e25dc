"""A synthetic catalog for scale: a RecBole atomic dataset of any number of items and users, deterministic from a seed,
with what the models read in real data: popularity that falls off as Zipf's law, histories whose next item depends
on the last one (items come in topics, and a user keeps to a topic for a while), and item titles made of words.

    python -m benchmarks.synthetic --items=10000 --users=5000 [--seed=0] [--out=saved/synthetic]

writes `<out>/synthetic-<items>/synthetic-<items>.inter` and `.item`; run a model on it with
`--dataset=synthetic-<items> --data_path=<out> --item_text_fields=[title,year]`.
"""

import sys
from pathlib import Path

import numpy as np

from benchmarks.report import run_script
from benchmarks.settings import split_arguments
from recbole_llm.errors import RecBoleLLMError

WORDS = (
    "night river stone glass winter summer city garden shadow light storm silver golden broken hidden last first "
    "long quiet wild little secret dark bright lost distant final red blue green black white iron paper ocean fire "
    "mountain dream road house heart king queen song war love star moon sun sky island forest desert train letter "
    "angel ghost wolf horse bird tiger dragon mirror clock door window bridge tower castle empire planet machine"
).split()
TOPICS = 50  # items fall into this many topics (each item's title starts with its topic's word)
STAY_IN_TOPIC = 0.7  # the chance that a user's next item shares the last one's topic
ZIPF_EXPONENT = 1.0


def synthetic_dataset(folder, n_items, n_users, seed=0, mean_history=20):
    """Writes the dataset `synthetic-<n_items>` under folder and returns its name."""
    if n_items < TOPICS or n_users < 1:
        raise RecBoleLLMError(f"a synthetic catalog needs at least {TOPICS} items and one user")
    rng = np.random.default_rng(seed)
    popularity = 1.0 / np.arange(1, n_items + 1) ** ZIPF_EXPONENT
    popularity = popularity[rng.permutation(n_items)]  # popular items in every topic
    topics = rng.integers(0, TOPICS, n_items)
    in_topic = [np.flatnonzero(topics == topic) for topic in range(TOPICS)]
    # draws by popularity: a uniform number looked up in the cumulative shares (np.random's choice is O(n) a call)
    topic_shares = [np.cumsum(popularity[items]) / popularity[items].sum() for items in in_topic]
    overall_shares = np.cumsum(popularity) / popularity.sum()

    def popular(shares):
        return min(int(np.searchsorted(shares, rng.random())), len(shares) - 1)

    name = f"synthetic-{n_items}"
    path = Path(folder) / name
    path.mkdir(parents=True, exist_ok=True)
    lengths = np.maximum(5, rng.poisson(mean_history, n_users))  # leave-one-out needs a few per user
    with open(path / f"{name}.inter", "w") as inter:
        inter.write("user_id:token\titem_id:token\ttimestamp:float\n")
        for user, length in enumerate(lengths, start=1):
            item = popular(overall_shares)
            for step in range(length):
                inter.write(f"{user}\t{item + 1}\t{step}\n")
                topic = topics[item]
                if rng.random() < STAY_IN_TOPIC:
                    item = in_topic[topic][popular(topic_shares[topic])]
                else:
                    item = popular(overall_shares)
    with open(path / f"{name}.item", "w") as items:
        items.write("item_id:token\ttitle:token_seq\tyear:token\n")
        words = rng.integers(0, len(WORDS), (n_items, 2))
        years = rng.integers(1950, 2025, n_items)
        for item in range(n_items):
            title = " ".join([WORDS[topics[item] % len(WORDS)].capitalize(), *(WORDS[w] for w in words[item])])
            items.write(f"{item + 1}\t{title}\t{years[item]}\n")
    return name


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    own, _ = split_arguments(argv, own_keys=("items", "users", "seed", "out"))
    name = synthetic_dataset(own.get("out", "saved/synthetic"), int(own.get("items", 10000)),
                             int(own.get("users", 5000)), int(own.get("seed", 0)))
    print(f"written: {own.get('out', 'saved/synthetic')}/{name}")


if __name__ == "__main__":
    run_script(main, "synthetic")
