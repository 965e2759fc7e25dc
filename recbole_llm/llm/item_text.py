"""The text of every item, written from the dataset's own item features and tokenized once."""

import logging
import re
import string

import torch
from recbole.utils import FeatureType

from recbole_llm.errors import RecBoleLLMError

EMPTY_TEXT_CHOICES = ("error", "id")


def template_fields(template: str) -> list[str]:
    """The placeholder names of a `str.format` template, in order."""
    return [name for _, name, _, _ in string.Formatter().parse(template) if name is not None]


def item_texts(dataset, fields: list[str], template: str, empty_item_text: str = "error", title_articles=None) -> list[str]:
    """The text of every item, by internal id, from the dataset's own item features; item 0 (padding) has none.

    An item whose fields are all empty is an error, or (empty_item_text='id') is written as `item <its id>`. The
    first field is the title: one of `title_articles` stored at its end is written first (article_first).
    """
    texts = written_texts(dataset, fields, template, title_articles)
    empty = [item for item, text in enumerate(texts) if item and not text]
    if not empty:
        return texts
    item_ids = dataset.field2id_token[dataset.iid_field]
    what = f"{len(empty)} of {dataset.item_num - 1} items have no text in item_text_fields {fields}"
    if empty_item_text != "id":
        examples = ", ".join(str(item_ids[item]) for item in empty[:5]) + (", ..." if len(empty) > 5 else "")
        raise RecBoleLLMError(
            f"{what} (item ids {examples}): add their text to the .item file, choose other item_text_fields, or "
            "set empty_item_text=id to write them as 'item <id>'"
        )
    for item in empty:
        texts[item] = f"item {item_ids[item]}"
    logging.getLogger().warning(f"{what}: written as 'item <id>', e.g. {texts[empty[0]]!r}")
    return texts


def written_texts(dataset, fields: list[str], template: str, title_articles=None) -> list[str]:
    """Every item's text by the template, "" where all its fields are empty (and for item 0, the padding)."""
    _check_fields(dataset, fields, template)
    words = {field: _field_words(dataset, field) for field in fields}  # field -> [n_items] strings
    if title_articles:
        words[fields[0]] = [article_first(title, title_articles) for title in words[fields[0]]]
    texts = [""]
    for item in range(1, dataset.item_num):
        values = {field: words[field][item] for field in fields}
        texts.append(template.format(**values).strip() if any(values.values()) else "")
    return texts


def article_first(title: str, articles) -> str:
    """A title stored with its article at the end, as MovieLens does, written as said: 'Usual Suspects, The' ->
    'The Usual Suspects', 'Usual Suspects, The (1995)' -> 'The Usual Suspects (1995)'; an elided article joins its
    word ('Star Maker, L'' -> "L'Star Maker"). Other titles stay as they are."""
    pattern = r"(?P<main>.+?), (?P<article>" + "|".join(map(re.escape, articles)) + r")(?P<rest> \(.*\))?"
    match = re.fullmatch(pattern, title)
    if match is None:
        return title
    article = match["article"] if match["article"].endswith("'") else match["article"] + " "
    return article + match["main"] + (match["rest"] or "")


def text_settings(config, title_only=False):
    """The fields and the template of item_text_fields and item_text_template: the fields joined by spaces when no
    template is set; with title_only, the first field alone (the item's title)."""
    fields = config["item_text_fields"]
    if not fields:
        raise RecBoleLLMError(
            "item_text_fields is not set: name the item features an item is written with, e.g. "
            "--item_text_fields=[title,year] (the columns of the dataset's .item file)"
        )
    fields = [fields] if isinstance(fields, str) else list(fields)
    if title_only:
        return fields[:1], "{" + fields[0] + "}"
    template = config["item_text_template"]
    return fields, " ".join("{" + field + "}" for field in fields) if template is None else template


def check_item_text_settings(config, dataset):
    """One-line errors for item text settings that do not fit the dataset, before its texts are written."""
    empty_item_text = config["empty_item_text"]
    if empty_item_text not in EMPTY_TEXT_CHOICES:
        raise RecBoleLLMError(f"empty_item_text is {empty_item_text!r}: use one of {', '.join(EMPTY_TEXT_CHOICES)}")
    articles = config["title_articles"]
    if articles is not None and not (isinstance(articles, list) and all(isinstance(a, str) and a for a in articles)):
        raise RecBoleLLMError(f"title_articles is {articles!r}: use a list of words, e.g. [The, A, An], or None")
    _check_fields(dataset, *text_settings(config))


def item_texts_from_config(config, dataset, title_only=False) -> list[str]:
    """item_texts with the settings item_text_fields, item_text_template, empty_item_text and title_articles; with
    title_only, each item's title (its first field), or its whole text where it has no title."""
    texts = item_texts(dataset, *text_settings(config), config["empty_item_text"], config["title_articles"])
    if not title_only:
        return texts
    fields, template = text_settings(config, title_only=True)
    titles = written_texts(dataset, fields, template, config["title_articles"])
    untitled = [item for item, title in enumerate(titles) if item and not title]
    if untitled:
        logging.getLogger().warning(
            f"{len(untitled)} of {dataset.item_num - 1} items have no text in {fields[0]}, the title: written from "
            f"all their item_text_fields instead, e.g. {texts[untitled[0]]!r}"
        )
    return [title or text for title, text in zip(titles, texts)]


class ItemTextTable:
    """Item texts tokenized once: `texts[i]`, `token_ids[i]` and `lengths[i]` describe the item of internal id i.

    Each text is tokenized with a leading space, so that its ids are exactly the ids it gets inside a sentence.
    """

    def __init__(self, texts: list[str], tokenizer, max_item_tokens: int):
        self.texts = texts
        self.pad_token_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        pieces = tokenizer([" " + text if text else "" for text in texts], add_special_tokens=False)["input_ids"]
        self.token_ids = torch.full((len(texts), max_item_tokens), self.pad_token_id, dtype=torch.long)
        self.lengths = torch.zeros(len(texts), dtype=torch.long)  # [n_items]
        for item, ids in enumerate(pieces):
            ids = ids[:max_item_tokens]
            self.token_ids[item, : len(ids)] = torch.tensor(ids, dtype=torch.long)
            self.lengths[item] = len(ids)

    @classmethod
    def from_config(cls, config, texts, tokenizer):
        return cls(texts, tokenizer, config["max_item_tokens"])


def _check_fields(dataset, fields: list[str], template: str) -> None:
    present = [] if dataset.item_feat is None else [f for f in dataset.item_feat.columns if f != dataset.iid_field]
    missing = [field for field in fields if field not in present]
    if missing:
        raise RecBoleLLMError(
            f"item_text_fields {missing} are not item features of dataset '{dataset.dataset_name}' "
            f"(it has: {', '.join(present) or 'none, no .item file loaded'}): change item_text_fields, "
            "or add the field to the .item file (and to load_col['item'] where load_col is set)"
        )
    placeholders = template_fields(template)
    if not placeholders:
        raise RecBoleLLMError(f"item_text_template '{template}' has no placeholder: use e.g. '{{{fields[0]}}}'")
    unknown = [name for name in placeholders if name not in fields]
    if unknown:
        raise RecBoleLLMError(
            f"item_text_template '{template}' names {unknown}, which are not in item_text_fields {fields}: "
            "add them to item_text_fields or change item_text_template"
        )


def _field_words(dataset, field: str) -> list[str]:
    """One string per item: RecBole's token ids of `field` mapped back to the words of the .item file."""
    # a tensor once the dataset is built (data_preparation), a pandas Series before; [n_items] or [n_items, seq_len]
    rows = [row if hasattr(row, "__len__") else [row] for row in dataset.item_feat[field].tolist()]
    if dataset.field2type[field] in (FeatureType.TOKEN, FeatureType.TOKEN_SEQ):
        id_to_token = dataset.field2id_token[field]
        return [" ".join(id_to_token[int(token)] for token in row if token != 0) for row in rows]  # 0: padding
    return [" ".join(f"{value:g}" for value in row) for row in rows]
