"""Recommendations for a person from a saved model: the top-k items after a user's history in the dataset, or after
a history given as item ids or titles, with the items' text and scores, the history's items left out.

An LLM model scores with the item matrix its checkpoint holds: only the users' side goes through the LLM. A process
keeps the last checkpoint it loaded: further calls on the same file score at once.
"""

import difflib
import json
import os
from functools import lru_cache

import torch
from recbole.data.interaction import Interaction
from recbole.utils import ModelType

from recbole_llm.comparison import markdown_table
from recbole_llm.errors import RecBoleLLMError
from recbole_llm.llm.item_text import item_texts_from_config
from recbole_llm.model.abstract_recommender import LLMSequentialRecommender
from recbole_llm.quick_start import load_data_and_model

COLUMNS = {"user": "user", "rank": "rank", "item_id": "item id", "title": "title", "score": "score"}
HISTORY_SEPARATOR = ";"


def recommend(model_file, user_ids=None, history=None, topk=10, trust_checkpoint=False):
    """The top-k items of each user of ``user_ids`` (the dataset's user ids), or of one person whose ``history`` is
    a list of item ids or titles, oldest first: a list of rows {user, rank, item_id, title, score}, best first per
    user (user None for a given history). Items of the history are never recommended."""
    if (user_ids is None) == (history is None):
        raise RecBoleLLMError("recommend for user ids or for a history: give exactly one of them")
    if not isinstance(topk, int) or topk < 1:
        raise RecBoleLLMError(f"topk is {topk!r}: it must be a positive number of items")
    config, model, dataset, titles = loaded(model_file, trust_checkpoint)
    if user_ids is not None:
        users = [user_index(dataset, user_id) for user_id in user_ids]
        histories = [user_history(dataset, user) for user in users]
    else:
        if config["MODEL_TYPE"] != ModelType.SEQUENTIAL:
            raise RecBoleLLMError(
                f"{config['model']} scores the dataset's users by their id, not a history: use --user_id"
            )
        users, user_ids = [0], [None]  # 0: RecBole's padding user, whom a sequential model never reads
        histories = [torch.tensor([item_index(dataset, titles, entry) for entry in history])]
    scores = full_scores(config, model, users, histories)  # [B, n_items]
    scores[:, 0] = float("-inf")  # the padding item
    for row, items in enumerate(histories):
        scores[row, items] = float("-inf")
    top_scores, top_items = scores.topk(min(topk, dataset.item_num - 1), dim=1)
    item_tokens = dataset.field2id_token[dataset.iid_field]
    return [
        {"user": user_id, "rank": rank, "item_id": str(item_tokens[item]), "title": titles[item] if titles else None,
         "score": score}
        for user_id, user_scores, user_items in zip(user_ids, top_scores.tolist(), top_items.tolist())
        for rank, (score, item) in enumerate(zip(user_scores, user_items), start=1)
        if score > float("-inf")  # a history that holds nearly every item leaves fewer than k
    ]


def loaded(model_file, trust_checkpoint=False):
    """The config, model, dataset and item titles of a checkpoint, loaded once while the file stays the same."""
    path = os.path.realpath(model_file)
    stat = os.stat(path) if os.path.isfile(path) else None  # a missing file: load_data_and_model says so
    version = (stat.st_mtime_ns, stat.st_size) if stat else None
    return _loaded(path, version, trust_checkpoint)


@lru_cache(maxsize=1)
def _loaded(path, version, trust_checkpoint):
    config, model, dataset, _, _, _ = load_data_and_model(path, trust_checkpoint=trust_checkpoint)
    return config, model, dataset, item_titles(config, dataset)


@torch.no_grad()
def full_scores(config, model, users, histories):
    """The model's score of every item [B, n_items] for each user [B] and history (item ids, oldest first), as the
    full-ranking evaluation computes them: the last MAX_ITEM_LIST_LENGTH items of each history."""
    model.eval()
    if isinstance(model, LLMSequentialRecommender):
        model.begin_evaluation()  # the checkpoint's item matrix, unless its weights changed since it was made
    max_length = config["MAX_ITEM_LIST_LENGTH"]
    item_seq = torch.zeros(len(histories), max_length, dtype=torch.long)
    for row, items in enumerate(histories):
        recent = items[-max_length:]
        item_seq[row, : len(recent)] = recent
    interaction = Interaction({
        config["USER_ID_FIELD"]: torch.tensor(users),
        config["ITEM_ID_FIELD"] + config["LIST_SUFFIX"]: item_seq,
        config["ITEM_LIST_LENGTH_FIELD"]: torch.tensor([min(len(items), max_length) for items in histories]),
    }).to(config["device"])
    return model.full_sort_predict(interaction).view(len(histories), -1).float().cpu()


def item_titles(config, dataset):
    """Every item's text by internal id, as the LLM models write it (item_text_fields); None without item text."""
    return item_texts_from_config(config, dataset) if config["item_text_fields"] else None


def user_index(dataset, user_id):
    """The internal id of a user id of the dataset; a one-line error for an unknown one."""
    tokens = dataset.field2token_id[dataset.uid_field]
    if str(user_id) not in tokens:
        examples = ", ".join(list(tokens)[1:4])  # the first is the padding token
        raise RecBoleLLMError(
            f"user id '{user_id}' is not in dataset {dataset.dataset_name} (its user ids are like {examples}): "
            "give a user id of the dataset, or the person's items with --history"
        )
    return tokens[str(user_id)]


def user_history(dataset, user):
    """A user's items in the dataset, oldest first [n]: every interaction, training, validation and test."""
    features = dataset.inter_feat
    rows = (features[dataset.uid_field] == user).nonzero().squeeze(1)  # in time order (RecBole sorts by time)
    items = features[dataset.iid_field][rows]
    history_field = getattr(dataset, "item_id_list_field", None)
    if history_field is not None and len(rows):  # a sequential row's next item: all but the first interaction
        items = torch.cat([features[history_field][rows[0], :1], items])
    if not len(items):
        raise RecBoleLLMError(f"user '{dataset.id2token(dataset.uid_field, user)}' has no history to recommend after")
    return items


def item_index(dataset, titles, entry):
    """The internal id of one history entry: an item id of the dataset, or the text of exactly one item (its case
    aside); a one-line error naming the closest texts otherwise."""
    entry = str(entry).strip()
    tokens = dataset.field2token_id[dataset.iid_field]
    if entry in tokens and entry != "[PAD]":
        return tokens[entry]
    if titles is None:
        raise RecBoleLLMError(f"'{entry}' is not an item id, and the dataset has no item text (item_text_fields)")
    matches = [item for item, title in enumerate(titles) if item and title.lower() == entry.lower()]
    if len(matches) == 1:
        return matches[0]
    if matches:
        ids = ", ".join(str(dataset.id2token(dataset.iid_field, item)) for item in matches)
        raise RecBoleLLMError(f"'{entry}' is the title of {len(matches)} items (item ids {ids}): give the item id")
    closest = difflib.get_close_matches(entry, titles[1:], n=3, cutoff=0.4)
    hint = f"the closest: {'; '.join(closest)}" if closest else "no title comes close"
    raise RecBoleLLMError(f"no item has the id or title '{entry}' ({hint})")


def parse_history(text):
    """Items separated by ';' (titles hold commas): "Toy Story (1995);Heat (1995)" -> its entries."""
    entries = [entry.strip() for entry in text.split(HISTORY_SEPARATOR) if entry.strip()]
    if not entries:
        raise RecBoleLLMError("--history is empty: give item ids or titles separated by ';'")
    return entries


def formatted(rows, output_format="table"):
    """The rows as a readable table or as JSON."""
    if output_format == "json":
        return json.dumps(rows, indent=2)
    if output_format == "table":
        return markdown_table([{**row, "user": row["user"] or "history"} for row in rows], COLUMNS)
    raise RecBoleLLMError(f"--format is '{output_format}': use table or json")
