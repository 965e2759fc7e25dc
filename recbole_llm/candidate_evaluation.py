"""LLaRA's candidate protocol, an evaluation beside RecBole's full ranking, for every model on the same candidates:
each test user's next item is picked from a list of candidates. A model that writes answers (RSLLM's
``read_candidates``) picks by writing a title; any other model picks its highest-scored candidate
(``full_sort_predict``), so its every answer is valid. A general model such as Pop, whose batches hold no histories,
answers the sequential models' candidates: ``sequential_test_data`` gives it the test split as they read it.

Each user gets the target and `n_candidates - 1` items outside their history, in a seeded random order: the same
users and candidates for every model of a run. An answer is valid when it names one candidate, and a hit when that
candidate is the target. As LLaRA defines them: HR@1 = hits / valid answers, ValidRatio = valid answers / answers,
and their product (hits / answers, LLaRA's model-selection metric) join RecBole's metrics in the test result
(``candidate_eval``).
"""

import re
from copy import copy
from logging import getLogger

import torch
import torch.nn.functional as F
from recbole.data import create_dataset
from recbole.data.interaction import Interaction, cat_interactions
from recbole.utils import ModelType, set_color

from recbole_llm.cold_items import data_preparation
from recbole_llm.distributed import evaluated_samples, gather_in_sample_order, is_distributed, process_share
from recbole_llm.model.candidates import sample_candidates

RANKED = "ranked"  # the candidates as a model ranks them (judged_candidates)


def answers_candidates(model):
    """Whether a model writes its answers (``read_candidates``); the others pick by their scores."""
    return hasattr(model, "read_candidates")


def evaluate_candidates(model, eval_data, config):
    """HR@1, ValidRatio and their product for n_candidate_users users of eval_data drawn with candidate_seed (all of
    them when None), each with n_candidates candidates drawn with it (the same for every model and seed); and HR@1
    and NDCG@5 of the candidates as the model ranks them (judged_candidates), an answer that is never invalid.
    Returns the metrics and each user's outcomes ({"user_id": RecBole's ids, metric: [n_users]}, the users in the
    drawn order: the same for every model), for paired comparisons."""
    interactions = cat_interactions([interaction for interaction, *_ in eval_data])
    if is_distributed(config):  # every process draws from all users, as one process does
        fields = sorted(interactions.interaction)  # one order in every process (RecBole keeps the fields in a set)
        columns = gather_in_sample_order(evaluated_samples(eval_data), [interactions[field] for field in fields])
        interactions = Interaction(dict(zip(fields, columns)))
    draw_seed = config["candidate_seed"]
    generator = torch.Generator().manual_seed(config["seed"] if draw_seed is None else draw_seed)  # None: a checkpoint
    # written before candidate_seed, which drew with the run's seed
    users = torch.randperm(len(interactions), generator=generator)[: config["n_candidate_users"] or len(interactions)]
    interactions = interactions[users]
    dataset = eval_data._dataset
    candidates, target_index = sample_candidates(
        interactions[dataset.item_id_list_field].cpu(), interactions[dataset.iid_field].cpu(), dataset.item_num,
        config["n_candidates"], generator,
    )  # [n, C], [n]
    named, answers, rankings, answered = [], [], [], process_share(len(users), config)  # each process: its share
    for rows in answered.split(config["eval_batch_size"]):
        batch = interactions[rows].to(model.device)
        batch_rankings, batch_named, batch_answers = judged_candidates(model, batch, candidates[rows])
        rankings.append(batch_rankings)
        named.append(batch_named)
        answers += batch_answers
    named = torch.cat(named)
    rankings = {name: torch.cat([ranking[name] for ranking in rankings]) for name in rankings[0]}
    if is_distributed(config):
        named, *ranked = gather_in_sample_order(answered, [named, *rankings.values()])
        rankings = dict(zip(rankings, ranked))
        answers = gather_in_sample_order(answered, [answers])[0] if answers_candidates(model) else answers
    ranked = {}
    for name, scores in rankings.items():
        ranked.update(ranking_metrics(scores, target_index, name))
    metrics = {**candidate_metrics(named, target_index), **{key: float(v.mean()) for key, v in ranked.items()}}
    per_user = {"user_id": interactions[dataset.uid_field].cpu().numpy(), **user_hits(named, target_index), **ranked}
    example = f"; e.g. answer {answers[0]!r}" if answers else ""
    getLogger().info(
        set_color("candidate evaluation", "blue") + f" ({len(users)} users, {config['n_candidates']} candidates, "
        + ("greedy answers" if answers_candidates(model) else "the best-scored candidate") + f"{example}): "
        + ", ".join(f"{key}: {value:.4f}" for key, value in metrics.items())
    )
    return metrics, per_user


def sequential_test_data(config):
    """The test split of config's run as its sequential models read it (each user's history and next item), for a
    general model's candidates: the same users and candidates as theirs."""
    sequential = copy(config)
    sequential.final_config_dict = {**config.final_config_dict, "MODEL_TYPE": ModelType.SEQUENTIAL}
    return data_preparation(sequential, create_dataset(sequential))[2]


@torch.no_grad()
def judged_candidates(model, interaction, candidates):
    """How the model ranks each user's candidates [B, C] (on the CPU, by name), which candidate it picks [B, C] and its
    answers (strings). A model that scores items ranks them "ranked" by its scores and picks its best-ranked (no
    answers). A model that writes answers picks the candidate its answer names, and ranks them "ranked" by the
    log-likelihood per token of each title as its answer ("ranked_sum": in all; "ranked_scores": by its full
    ranking's scores: does its user state know what its answer does not?)."""
    if not answers_candidates(model):
        rankings = {RANKED: candidate_scores(model, interaction, candidates)}
        return rankings, F.one_hot(rankings[RANKED].argmax(1), candidates.shape[1]).bool(), []
    reading = model.read_candidates(
        interaction[model.ITEM_SEQ], interaction[model.ITEM_SEQ_LEN], candidates.to(model.device)
    )
    rankings = {RANKED: (reading.log_likelihoods / reading.lengths).cpu(),
                f"{RANKED}_sum": reading.log_likelihoods.cpu(), f"{RANKED}_scores": reading.scores.cpu()}
    candidate_names = [[model.item_names[item] for item in row] for row in candidates.tolist()]
    return rankings, named_candidates(reading.answers, candidate_names), reading.answers


def named_candidates(answers, candidate_names):
    """Which candidate each answer names [N, C] bool, at most one per answer: the longest candidate title that the
    answer's first line starts with, as whole words ("M" is not named by "Men in Black"), ignoring case, spacing and
    what follows the title (a year, a full stop)."""
    named = torch.zeros(len(answers), len(candidate_names[0]) if candidate_names else 0, dtype=torch.bool)
    for row, (answer, names) in enumerate(zip(answers, candidate_names)):
        first_line = _normalized(answer.strip().split("\n")[0])
        lengths = [len(name) if _starts_with_title(first_line, name) else 0 for name in map(_normalized, names)]
        longest = max(range(len(names)), key=lengths.__getitem__)
        named[row, longest] = lengths[longest] > 0
    return named


def candidate_scores(model, interaction, candidates):
    """The model's full-ranking scores of each user's candidates [B, C], on the CPU."""
    with torch.autocast(model.device.type, enabled=False):
        scores = model.full_sort_predict(interaction).float().reshape(len(candidates), -1).cpu()  # [B, n_items]
    return scores.gather(1, candidates)


def ranking_metrics(scores, target_index, name):
    """Each user's HR@1 and NDCG@5 [N] of the target among the candidates ranked by scores [N, C] (ties: the first
    listed first), as numpy arrays."""
    order = scores.argsort(dim=1, descending=True, stable=True)  # [N, C]
    rank = (order == target_index[:, None]).int().argmax(1)  # [N] 0 = ranked first
    ndcg = torch.where(rank < 5, 1 / torch.log2(rank.double() + 2), torch.zeros_like(rank, dtype=torch.double))
    return {f"hr@1_{name}": (rank == 0).double().numpy(), f"ndcg@5_{name}": ndcg.numpy()}


def user_hits(named, target_index):
    """Each user's hit [N] of LLaRA's protocol (a valid answer naming the target): their mean is HR@1 x ValidRatio."""
    valid = named.sum(1) == 1
    return {"hr@1_x_valid_ratio": (valid & named.gather(1, target_index[:, None]).squeeze(1)).double().numpy()}


def candidate_metrics(named, target_index):
    """LLaRA's metrics from which candidate each answer names [N, C] and where the target is [N]: HR@1 (hits over
    valid answers, those that name one candidate; 0 without any), ValidRatio, and HR@1 x ValidRatio (hits over all
    answers)."""
    valid = named.sum(1) == 1  # [N]
    hits = int((valid & named.gather(1, target_index[:, None]).squeeze(1)).sum())
    n_valid = int(valid.sum())
    return {
        "hr@1_candidates": hits / n_valid if n_valid else 0.0,
        "valid_ratio": n_valid / len(valid),
        "hr@1_x_valid_ratio": hits / len(valid),
    }


def _starts_with_title(text, title):
    """Whether text begins with the whole title: the title, then the text's end or a character that ends a word."""
    return bool(title) and text.startswith(title) and not re.match(r"\w", text[len(title) : len(title) + 1])


def _normalized(text):
    return " ".join(text.lower().split())
