"""The LLaRA candidate protocol: the LLM picks a user's next item from a list of candidates by writing its title.

Each user gets the target and `n_candidates - 1` items outside their history, in a seeded random order. An answer
is valid when it names exactly one candidate, and a hit when that candidate is the target.
"""

import torch

from recbole_llm.errors import RecBoleLLMError


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
