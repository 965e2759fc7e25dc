"""The text of every item, written from the dataset's own item features and tokenized once."""

import logging
import string

import torch
from recbole.utils import FeatureType

from recbole_llm.errors import RecBoleLLMError

DEFAULT_FIELDS = ["movie_title", "release_year"]
DEFAULT_TEMPLATE = "{movie_title} ({release_year})"
DEFAULT_MAX_ITEM_TOKENS = 24


def template_fields(template: str) -> list[str]:
    """The placeholder names of a `str.format` template, in order."""
    return [name for _, name, _, _ in string.Formatter().parse(template) if name is not None]


class ItemTextTable:
    """Text of every item from the dataset's own item features, tokenized once.

    `texts[i]`, `token_ids[i]` and `lengths[i]` describe the item of internal id i; item 0 (padding) has no text.
    Each text is tokenized with a leading space, so that its ids are exactly the ids it gets inside a sentence.
    """

    def __init__(self, dataset, tokenizer, fields: list[str], template: str, max_item_tokens: int):
        _check_fields(dataset, fields, template)
        words = {field: _field_words(dataset, field) for field in fields}  # field -> [n_items] strings
        self.texts = [""]  # item 0 is padding
        for item in range(1, dataset.item_num):
            values = {field: words[field][item] for field in fields}
            self.texts.append(template.format(**values) if any(values.values()) else "")
        n_without_text = sum(not text for text in self.texts[1:])
        if n_without_text:
            logging.getLogger().warning(
                f"{n_without_text} of {dataset.item_num - 1} items have no text in item_text_fields {fields}"
            )

        self.pad_token_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        pieces = tokenizer([" " + text if text else "" for text in self.texts], add_special_tokens=False)["input_ids"]
        self.token_ids = torch.full((dataset.item_num, max_item_tokens), self.pad_token_id, dtype=torch.long)
        self.lengths = torch.zeros(dataset.item_num, dtype=torch.long)  # [n_items]
        for item, ids in enumerate(pieces):
            ids = ids[:max_item_tokens]
            self.token_ids[item, : len(ids)] = torch.tensor(ids, dtype=torch.long)
            self.lengths[item] = len(ids)

    @classmethod
    def from_config(cls, config, dataset, tokenizer):
        fields = config["item_text_fields"] or DEFAULT_FIELDS
        fields = [fields] if isinstance(fields, str) else list(fields)
        template = config["item_text_template"] or DEFAULT_TEMPLATE
        return cls(dataset, tokenizer, fields, template, config["max_item_tokens"] or DEFAULT_MAX_ITEM_TOKENS)


def _check_fields(dataset, fields: list[str], template: str) -> None:
    present = [] if dataset.item_feat is None else [f for f in dataset.item_feat.columns if f != dataset.iid_field]
    missing = [field for field in fields if field not in present]
    if missing:
        raise RecBoleLLMError(
            f"item_text_fields {missing} are not item features of dataset '{dataset.dataset_name}' "
            f"(it has: {', '.join(present) or 'none, no .item file loaded'}): change item_text_fields "
            "or add the field to load_col['item']"
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
