"""Cold-start items: with ``cold_item_ratio``, a share of the items, drawn with the seed, lose every training
interaction, so that they exist only in the item text and as validation and test targets; and the test users whose
target is one of them, on whom every model gets its cold metrics. Which items are cold is drawn in
model/abstract_recommender.py, whose LLM models leave them out of their training losses.

RecBole splits a sequential dataset as rows of (history, next item), so the training split loses the rows whose next
item is cold, and every training history loses its cold items (the later items move up, the history gets shorter);
a row left with an empty history goes too. Validation and test rows stay as RecBole splits them: their histories are
what the users did.
"""

import torch
from recbole.data import data_preparation as recbole_data_preparation
from recbole.data.interaction import Interaction
from recbole.data.utils import get_dataloader

from recbole_llm.errors import is_number, require
from recbole_llm.model.abstract_recommender import cold_items  # the draw: the LLM models read it too


def data_preparation(config, dataset):
    """RecBole's data_preparation; with cold_item_ratio, its training loader without the cold items' interactions."""
    ratio = config["cold_item_ratio"] or 0  # None: a checkpoint written before the setting
    require(config, "cold_item_ratio", is_number(ratio) and 0 <= ratio < 1, "a share of the items from 0 (none) to below 1")
    train_data, valid_data, test_data = recbole_data_preparation(config, dataset)
    if ratio:
        train_dataset = without_items(train_data._dataset, cold_items(config, dataset))
        train_data = get_dataloader(config, "train")(config, train_dataset, train_data._sampler, shuffle=config["shuffle"])
    return train_data, valid_data, test_data


def without_items(dataset, items):
    """A copy of a training dataset without any interaction with `items` (a general dataset's rows are interactions;
    a sequential one's are histories and their next item)."""
    features = dict(dataset.inter_feat.interaction)  # fields are replaced below, never changed in place
    rows = ~torch.isin(features[dataset.iid_field], items)
    history_field = getattr(dataset, "item_id_list_field", None)
    if history_field:
        history = features[history_field]  # [N, L]
        kept = (history != 0) & ~torch.isin(history, items)
        order = (~kept).to(torch.int8).argsort(dim=1, stable=True)  # the kept positions first, in time order
        kept = kept.gather(1, order)
        for field in [field for field in features if field.endswith(dataset.config["LIST_SUFFIX"])]:
            values = features[field]  # [N, L, ...]
            index = order.view(*order.shape, *[1] * (values.dim() - 2)).expand_as(values)
            mask = kept.view(*kept.shape, *[1] * (values.dim() - 2))
            features[field] = values.gather(1, index) * mask
        features[dataset.item_list_length_field] = kept.sum(1)
        rows &= kept.any(1)
    return dataset.copy(Interaction(features)[rows.nonzero().squeeze(1)])


def cold_target_data(config, test_data, items):
    """A loader of the users of `test_data` whose target is one of `items`, evaluated as test_data is; None when
    there is none."""
    dataset = test_data._dataset
    rows = torch.isin(dataset.inter_feat[dataset.iid_field], items).nonzero().squeeze(1)
    if not len(rows):
        return None
    return get_dataloader(config, "test")(config, dataset.copy(dataset.inter_feat[rows]), test_data._sampler)


def cold_test_result(config, trainer, test_data):
    """The trainer's model evaluated on the test users whose target is a cold item: {"users": their number, metric:
    value, ...}; None without cold items."""
    if not config["cold_item_ratio"]:
        return None
    cold_data = cold_target_data(config, test_data, cold_items(config, test_data._dataset))
    if cold_data is None:
        return {"users": 0}
    return {"users": len(cold_data._dataset), **trainer.evaluate(cold_data, load_best_model=False)}
