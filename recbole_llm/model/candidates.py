"""Candidate lists of LLaRA's protocol: a user's next item among items outside their history. RSLLM trains on
prompts that list them; recbole_llm.candidate_evaluation tests every model on them."""

import torch

from recbole_llm.errors import RecBoleLLMError


def sample_candidates(history, targets, n_items, n_candidates, generator=None, excluded=None):
    """Candidates [N, C] holding each target once plus C - 1 distinct items not in its history, and where the
    target sits [N].

    history [N, L] item ids (0: padding), targets [N]; everything is computed on history's device (a training step's
    draw needs no copy to the host) and drawn from `generator` (one on that device; None: torch's default one), so the
    same seed gives the same candidates. excluded [n_items] (bool, on that device): items never drawn as a wrong
    candidate (training leaves out the cold items: they do not exist yet).
    """
    n_users = len(targets)
    device = history.device
    seen = torch.zeros(n_users, n_items, dtype=torch.bool, device=device)  # [N, n_items]
    if excluded is not None:
        seen |= excluded
    seen.scatter_(1, history, True)
    seen.scatter_(1, targets[:, None], True)
    seen[:, 0] = True  # the padding item
    fewest_unseen = int((~seen).sum(1).min())
    if fewest_unseen < n_candidates - 1:
        raise RecBoleLLMError(
            f"n_candidates is {n_candidates} but a user has only {fewest_unseen} items outside their history: "
            f"set n_candidates to at most {fewest_unseen + 1}"
        )
    draws = torch.rand(n_users, n_items, generator=generator, device=device).masked_fill(seen, -1.0)  # [N, n_items]
    negatives = draws.topk(n_candidates - 1, dim=1).indices  # [N, C - 1] a uniform sample without replacement
    ordered = torch.cat([targets[:, None], negatives], dim=1)  # [N, C] the target first
    # [N, C] shuffle the target's place
    order = torch.rand(n_users, n_candidates, generator=generator, device=device).argsort(dim=1)
    target_index = (order == 0).int().argmax(dim=1)  # [N]
    return ordered.gather(1, order), target_index
