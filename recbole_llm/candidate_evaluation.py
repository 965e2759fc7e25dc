"""LLaRA's candidate protocol, an evaluation beside RecBole's full ranking: the LLM picks a user's next item from a
list of candidates by writing its title (for a model that writes answers: RSLLM's ``answer_candidates``).

Each user gets the target and `n_candidates - 1` items outside their history, in a seeded random order. An answer
is valid when it names exactly one candidate, and a hit when that candidate is the target. HR@1 and ValidRatio
join RecBole's metrics in the test result (``candidate_eval``).
"""

from logging import getLogger

import torch
from recbole.utils import set_color

from recbole_llm.distributed import evaluated_samples, gather_in_sample_order, is_distributed, process_share
from recbole_llm.errors import RecBoleLLMError


def answers_candidates(model):
    """Whether a model takes part in the protocol: it writes answers (``answer_candidates``); the others ignore it."""
    return hasattr(model, "answer_candidates")


def evaluate_candidates(model, eval_data, config):
    """HR@1 and ValidRatio of the model's greedy answers, for n_candidate_users users of eval_data drawn with the
    seed (all of them when None), each with n_candidates candidates drawn with the seed."""
    fields = (model.ITEM_SEQ, model.ITEM_SEQ_LEN, model.POS_ITEM_ID)
    columns = zip(*[[interaction[field] for field in fields] for interaction, *_ in eval_data])
    item_seq, item_len, targets = (torch.cat(column) for column in columns)  # [N, L], [N], [N]
    if is_distributed(config):  # every process draws from all users, as one process does
        samples = evaluated_samples(eval_data)
        item_seq, item_len, targets = gather_in_sample_order(samples, [item_seq, item_len, targets])
    generator = torch.Generator().manual_seed(config["seed"])
    users = torch.randperm(len(targets), generator=generator)[: config["n_candidate_users"] or len(targets)]
    item_seq, item_len, targets = item_seq[users], item_len[users], targets[users]
    candidates, target_index = sample_candidates(
        item_seq, targets, model.n_items, config["n_candidates"], generator
    )  # [n, C], [n]
    answers, answered = [], process_share(len(users), config)  # each process answers its share of users
    for rows in answered.split(config["eval_batch_size"]):
        answers += model.answer_candidates(
            item_seq[rows].to(model.device), item_len[rows].to(model.device), candidates[rows].to(model.device)
        )
    if is_distributed(config):
        answers = gather_in_sample_order(answered, [answers])[0]
    candidate_names = [[model.item_names[item] for item in row] for row in candidates.tolist()]
    metrics = candidate_metrics(named_candidates(answers, candidate_names), target_index)
    getLogger().info(
        set_color("candidate evaluation", "blue") + f" ({len(users)} users, {config['n_candidates']} "
        f"candidates, greedy answers; e.g. target {candidate_names[0][target_index[0]]!r}, answer {answers[0]!r}): "
        + ", ".join(f"{key}: {value:.4f}" for key, value in metrics.items())
    )
    return metrics


def sample_candidates(history, targets, n_items, n_candidates, generator):
    """Candidates [N, C] holding each target once plus C - 1 distinct items not in its history, and where the
    target sits [N].

    history [N, L] item ids (0: padding), targets [N]; everything is drawn from `generator` (on the CPU), so the
    same seed gives the same candidates.
    """
    n_users = len(targets)
    seen = torch.zeros(n_users, n_items, dtype=torch.bool)  # [N, n_items]
    seen.scatter_(1, history, True)
    seen.scatter_(1, targets[:, None], True)
    seen[:, 0] = True  # the padding item
    fewest_unseen = int((~seen).sum(1).min())
    if fewest_unseen < n_candidates - 1:
        raise RecBoleLLMError(
            f"n_candidates is {n_candidates} but a user has only {fewest_unseen} items outside their history: "
            f"set n_candidates to at most {fewest_unseen + 1}"
        )
    draws = torch.rand(n_users, n_items, generator=generator).masked_fill(seen, -1.0)  # [N, n_items]
    negatives = draws.topk(n_candidates - 1, dim=1).indices  # [N, C - 1] a uniform sample without replacement
    ordered = torch.cat([targets[:, None], negatives], dim=1)  # [N, C] the target first
    order = torch.rand(n_users, n_candidates, generator=generator).argsort(dim=1)  # [N, C] shuffle the target's place
    target_index = (order == 0).int().argmax(dim=1)  # [N]
    return ordered.gather(1, order), target_index


def named_candidates(answers, candidate_names):
    """Which candidates each answer names [N, C] bool: a candidate's name appears in the answer, ignoring case
    and spacing (as LLaRA matches titles)."""
    named = [[_normalized(name) in _normalized(answer) for name in names]
             for answer, names in zip(answers, candidate_names)]
    return torch.tensor(named, dtype=torch.bool).reshape(len(answers), -1)


def candidate_metrics(named, target_index):
    """HR@1 (answers that name the target and no other candidate) and ValidRatio (answers that name exactly one
    candidate), both over all answers."""
    valid = named.sum(1) == 1  # [N]
    hit = valid & named.gather(1, target_index[:, None]).squeeze(1)  # [N]
    return {"hr@1_candidates": hit.sum().item() / len(hit), "valid_ratio": valid.sum().item() / len(valid)}


def _normalized(text):
    return " ".join(text.lower().split())
