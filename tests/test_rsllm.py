"""RSLLM on tiny-llama and the tiny ml-100k copy: the candidate protocol's pure functions on hand-made examples,
what trains, the unified prompt, the LM labels, the losses, the two stages, the item tower, and end-to-end runs."""

import dataclasses
import logging
import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from peft.tuners.lora import LoraLayer
from torch import nn
from transformers.modeling_layers import GradientCheckpointingLayer

from conftest import RSLLM_SIZES, TINY_DATASET, assert_users_in_chunks_score_as_one_pass, tiny_config
from recbole_llm.candidate_evaluation import candidate_metrics, judged_candidates, named_candidates, ranking_metrics
from recbole_llm.model.candidates import sample_candidates
from recbole_llm.checkpoint import load_checkpoint
from recbole_llm.comparison import comparison_rows
from recbole_llm.errors import RecBoleLLMError
from recbole_llm.llm import load_llm
from recbole_llm.model.sequential_recommender.rsllm import IGNORED, TEXT_ONLY, UNIFIED, joined, rank_loss
from recbole_llm.quick_start import run_recbole_llm
from recbole_llm.trainer import LLMTrainer


MODEL = "RSLLM"  # of the tiny and batch fixtures


@pytest.fixture(scope="module")
def rsllm(tiny):
    return tiny.build()


# ---- The candidate protocol's pure functions ---------------------------------------------------------------------


def test_candidates_hold_the_target_once_and_no_history_item():
    history = torch.tensor([[1, 2, 3, 0], [4, 0, 0, 0], [2, 7, 9, 8]])  # [N, L], 0: padding
    targets = torch.tensor([5, 6, 1])
    candidates, target_index = sample_candidates(history, targets, 12, 6, torch.Generator().manual_seed(0))

    assert candidates.shape == (3, 6)
    assert torch.equal(candidates[torch.arange(3), target_index], targets)
    for row, seen in zip(candidates.tolist(), history.tolist()):
        assert len(set(row)) == 6  # no duplicates
        assert 0 not in row and not set(row) & (set(seen) - {0})
    again = sample_candidates(history, targets, 12, 6, torch.Generator().manual_seed(0))
    assert torch.equal(again[0], candidates) and torch.equal(again[1], target_index)  # fixed by the seed
    excluded = torch.zeros(16, dtype=torch.bool).index_fill_(0, torch.tensor([1, 10, 11]), True)  # e.g. cold items
    candidates, target_index = sample_candidates(history, targets, 16, 6, torch.Generator().manual_seed(0), excluded)
    assert torch.equal(candidates[torch.arange(3), target_index], targets)  # a target is listed, excluded or not
    wrong = candidates.masked_fill(torch.arange(6) == target_index[:, None], 0)
    assert not torch.isin(wrong, torch.tensor([1, 10, 11])).any()


def test_too_many_candidates_for_a_history_is_a_one_line_error():
    with pytest.raises(RecBoleLLMError, match="at most 2") as caught:
        sample_candidates(torch.tensor([[1, 2, 3]]), torch.tensor([4]), 6, 5, torch.Generator().manual_seed(0))
    assert "\n" not in str(caught.value)


def test_hit_ratio_is_hits_over_valid_answers_as_llara_defines_it():
    answers = ["Toy Story (1995)", "  heat (1995) ", "GoldenEye (1995) or Heat (1995)", "a movie", "Casino (1995)."]
    candidate_names = [
        ["Heat (1995)", "Toy Story (1995)"],  # names the target: valid hit
        ["Heat (1995)", "Casino (1995)"],  # names one candidate (case and spacing ignored), not the target: valid miss
        ["GoldenEye (1995)", "Heat (1995)"],  # begins with the target's title: valid hit
        ["Heat (1995)", "Casino (1995)"],  # names none: not valid
        ["Heat (1995)", "Casino (1995)"],  # names the target, then a full stop: valid hit
    ]
    target_index = torch.tensor([1, 1, 0, 0, 1])

    named = named_candidates(answers, candidate_names)
    assert named.tolist() == [[False, True], [True, False], [True, False], [False, False], [False, True]]
    assert candidate_metrics(named, target_index) == {
        "hr@1_candidates": 3 / 4,  # hits over the 4 valid answers
        "valid_ratio": 4 / 5,
        "hr@1_x_valid_ratio": 3 / 5,  # hits over all answers
    }
    assert candidate_metrics(torch.zeros(2, 3, dtype=torch.bool), torch.tensor([0, 1]))["hr@1_candidates"] == 0


def test_an_answer_names_a_whole_title_not_a_substring():
    answers = ["Men in Black", "M", "Mendy", "Heat Wave (1990)", "The Usual Suspects.\n2. Heat", "1. M"]
    candidate_names = [
        ["M", "Men in Black"],  # "M" is inside "Men in Black" but not a whole title of it
        ["M", "Men in Black"],
        ["M", "Heat"],  # "Mendy" begins with the letter M, not with the title M
        ["Heat", "Heat Wave"],  # the longest title the answer begins with
        ["The Usual Suspects", "Heat"],  # the first line only
        ["M", "Heat"],  # a title inside the answer, not at its start, is not named
    ]
    assert named_candidates(answers, candidate_names).tolist() == [
        [False, True], [True, False], [False, False], [False, True], [True, False], [False, False]
    ]


def test_ranked_candidates_give_hr1_and_ndcg5_by_hand():
    scores = torch.tensor([[0.1, 0.9, 0.5], [3.0, 2.0, 1.0], [1.0, 1.0, 1.0]])
    # ranks of the targets: 1 (0.5 after 0.9), 0, and 1 among ties (the first listed first)
    per_user = ranking_metrics(scores, torch.tensor([2, 0, 1]), "ranked")
    assert per_user["hr@1_ranked"].tolist() == [0, 1, 0]
    assert per_user["ndcg@5_ranked"] == pytest.approx([1 / np.log2(3), 1, 1 / np.log2(3)])
    beyond_five = ranking_metrics(torch.arange(7.0)[None], torch.tensor([0]), "ranked")  # ranked last of 7
    assert beyond_five["hr@1_ranked"].tolist() == beyond_five["ndcg@5_ranked"].tolist() == [0.0]


@torch.no_grad()
def answer_log_likelihood(model, item_seq, item_len, candidates, item):
    """The log-likelihood of one item's title and end token after one user's prompt and list, by a full forward."""
    prompt = joined(model.user_prompt(item_seq, item_len), model.candidate_list(candidates))
    return answer_log_likelihood_after(model, prompt, item)


@torch.no_grad()
def answer_log_likelihood_after(model, prompt, item):
    """The log-likelihood of one item's title and end token after a one-row prompt, and its token count, by a full
    forward of the prompt and that answer alone."""
    inputs_embeds, attention_mask, position_ids, labels, _, _ = model.with_answers(prompt, item.reshape(1, 1))
    hidden = model.last_hidden_states(inputs_embeds, attention_mask, position_ids)
    log_probs = model.llm.get_output_embeddings()(hidden[:, :-1]).float().log_softmax(-1)
    answer = labels[:, 1:] != IGNORED
    return log_probs[answer].gather(1, labels[:, 1:][answer][:, None]).sum(), int(answer.sum())


@pytest.mark.parametrize("stage", [TEXT_ONLY, UNIFIED])
def test_candidate_likelihoods_in_one_batched_pass_equal_a_full_forward_per_candidate(rsllm, batch, stage):
    rsllm.set_stage(stage)
    rsllm.eval()
    item_seq, item_len = batch[rsllm.ITEM_SEQ][:2], batch[rsllm.ITEM_SEQ_LEN][:2]
    candidates, _ = sample_candidates(item_seq, batch[rsllm.POS_ITEM_ID][:2], rsllm.n_items, 6,
                                      torch.Generator().manual_seed(0))
    reading = rsllm.read_candidates(item_seq, item_len, candidates)
    sums, lengths = reading.log_likelihoods, reading.lengths
    assert sums.shape == lengths.shape == (2, 6) and torch.all(sums < 0)
    # the passes go shortest first per user, each cut to its longest: the lists' answers are not in that order
    assert not torch.equal(lengths.argsort(dim=1, stable=True), torch.arange(6).expand(2, 6))
    for user in range(2):
        for column in range(6):
            expected, tokens = answer_log_likelihood(rsllm, item_seq[user:user + 1], item_len[user:user + 1],
                                                     candidates[user:user + 1], candidates[user, column])
            assert float(sums[user, column]) == pytest.approx(float(expected), abs=1e-3)
            assert int(lengths[user, column]) == tokens == int(rsllm.item_text_lengths[candidates[user, column]]) + 1


@pytest.mark.parametrize("stage", [TEXT_ONLY, UNIFIED])
def test_answers_generated_on_from_the_shared_pass_equal_a_generation_from_the_prompt(tiny, batch, stage):
    model = tiny.build()
    model.set_stage(stage)
    model.eval()
    # the tiny LLM's own head writes one token to every prompt; a random head of scale 1 (on this model's copy) makes
    # each answer depend on its prompt, so an answer that read the wrong keys and values would differ
    base = model.llm.get_base_model()
    head = nn.Linear(base.config.hidden_size, base.config.vocab_size, bias=False)
    nn.init.normal_(head.weight, generator=torch.Generator().manual_seed(0))
    base.set_output_embeddings(head)
    item_seq, item_len = batch[model.ITEM_SEQ][:4], batch[model.ITEM_SEQ_LEN][:4]
    candidates, _ = sample_candidates(item_seq, batch[model.POS_ITEM_ID][:4], model.n_items, 5,
                                      torch.Generator().manual_seed(1))
    answers = model.read_candidates(item_seq, item_len, candidates).answers
    with torch.no_grad():
        prompt = joined(model.user_prompt(item_seq, item_len), model.candidate_list(candidates))
        from_prompt = model.llm.generate(
            inputs_embeds=prompt.inputs_embeds, attention_mask=prompt.attention_mask,
            max_new_tokens=model.max_answer_tokens, do_sample=False,
            eos_token_id=model.tokenizer.eos_token_id, pad_token_id=model.tokenizer.pad_token_id,
        )
    expected = model.tokenizer.batch_decode(from_prompt, skip_special_tokens=True)
    assert answers == expected and len(set(expected)) == 4  # each user's answer is its own


def test_candidates_are_also_ranked_by_the_user_state_against_the_item_tower(rsllm, batch):
    rsllm.set_stage(UNIFIED)
    rsllm.eval()
    users = batch[torch.arange(3)]
    candidates, _ = sample_candidates(users[rsllm.ITEM_SEQ], users[rsllm.POS_ITEM_ID], rsllm.n_items, 4,
                                      torch.Generator().manual_seed(0))
    rankings, named, answers = judged_candidates(rsllm, users, candidates)
    assert set(rankings) == {"ranked", "ranked_sum", "ranked_scores"}  # per token, in all, by the full ranking
    with torch.no_grad():
        full_ranking = rsllm.full_sort_predict(users).view(3, -1)  # [3, n_items]
    assert torch.allclose(rankings["ranked_scores"], full_ranking.gather(1, candidates), atol=1e-5)
    assert not torch.allclose(rankings["ranked_scores"].argsort(1), rankings["ranked"].argsort(1))


def test_a_title_the_llm_favours_is_ranked_first_summed_and_per_token(tiny, batch):
    model = tiny.build()
    model.eval()
    item_seq, item_len = batch[model.ITEM_SEQ][:1], batch[model.ITEM_SEQ_LEN][:1]
    favoured = 7
    favoured_tokens = set(model.title_ids[favoured, : model.item_text_lengths[favoured]].tolist())
    others = [item for item in range(8, 200) if item not in item_seq[0].tolist()
              and not set(model.title_ids[item, : model.item_text_lengths[item]].tolist()) <= favoured_tokens][:4]
    candidates = torch.tensor([[others[0], others[1], favoured, others[2], others[3]]])
    # the LLM's last states all 0 (a fresh norm of weight 0 on this model's copy), so its logits are the head's bias:
    # every token of the favoured title, and the end token, far likelier than any other
    base = model.llm.get_base_model()
    decoder = base.get_decoder()
    decoder.norm = type(decoder.norm)(decoder.norm.weight.shape[0])
    decoder.norm.weight.data.zero_()
    head = nn.Linear(decoder.norm.weight.shape[0], base.config.vocab_size)
    head.weight.data.zero_()
    head.bias.data.zero_()
    head.bias.data[sorted(favoured_tokens | {model.tokenizer.eos_token_id})] = 20.0
    base.set_output_embeddings(head)
    reading = model.read_candidates(item_seq, item_len, candidates)
    sums, lengths = reading.log_likelihoods, reading.lengths
    assert int(sums.argmax()) == int((sums / lengths).argmax()) == 2
    per_user = ranking_metrics(sums / lengths, torch.tensor([2]), "ranked")
    assert per_user["hr@1_ranked"].tolist() == per_user["ndcg@5_ranked"].tolist() == [1.0]


def test_candidate_prompt_joins_two_left_padded_prompts_into_one():
    def prompt(tokens, mask):  # token k has the id k and the embedding [k]
        embeds = torch.tensor(tokens, dtype=torch.float)[..., None]  # [B, T, 1]
        return SimpleNamespace(inputs_embeds=embeds, attention_mask=torch.tensor(mask), input_ids=torch.tensor(tokens))

    history = prompt([[0, 1, 2], [3, 4, 5]], [[0, 1, 1], [1, 1, 1]])
    listing = prompt([[0, 6, 7], [0, 0, 8]], [[0, 1, 1], [0, 0, 1]])
    both = joined(history, listing)
    assert both.attention_mask.tolist() == [[0, 0, 1, 1, 1, 1], [0, 0, 1, 1, 1, 1]]
    assert both.inputs_embeds[..., 0][both.attention_mask.bool()].reshape(2, 4).tolist() == [[1, 2, 6, 7], [3, 4, 5, 8]]
    assert both.input_ids[both.attention_mask.bool()].reshape(2, 4).tolist() == [[1, 2, 6, 7], [3, 4, 5, 8]]
    assert both.position_ids.tolist() == [[0, 0, 0, 1, 2, 3], [0, 0, 0, 1, 2, 3]]


# ---- What trains, and what stays frozen ------------------------------------------------------------------------


def trainable_names(model):
    return {name for name, p in model.named_parameters() if p.requires_grad}


def test_full_ranking_scores_of_users_in_chunks_equal_one_pass(rsllm, tiny):
    assert_users_in_chunks_score_as_one_pass(rsllm, next(iter(tiny.test_data))[0])


def test_only_lora_projector_and_heads_train_and_the_shared_llm_gets_no_adapter(rsllm):
    rsllm.set_stage(UNIFIED)
    names = trainable_names(rsllm)
    assert {name.split(".")[0] for name in names} == {"llm", "projector", "slot_gate", "state_head", "title_head"}
    assert all("lora_" in name for name in names if name.startswith("llm."))
    rsllm.set_stage(TEXT_ONLY)
    assert {name.split(".")[0] for name in trainable_names(rsllm)} == {"llm", "state_head"}

    backbone = load_llm("tiny-llama")
    assert not any(isinstance(module, LoraLayer) for module in backbone.model.modules())
    assert rsllm.llm.get_base_model() is not backbone.model
    assert rsllm.input_embeddings().weight is backbone.input_embeddings().weight  # modules copied, weights shared
    checkpoint_keys = rsllm.checkpoint_state_dict().keys()
    assert all("lora_" in key or not key.startswith("llm.") for key in checkpoint_keys)
    assert not any(key.startswith("cf_encoder.") for key in checkpoint_keys)


# ---- The unified prompt and the LM labels ----------------------------------------------------------------------


def test_id_slots_hold_the_projected_embeddings_and_text_only_prompts_have_none(tiny, rsllm, batch):
    item_seq, item_len = batch[rsllm.ITEM_SEQ], batch[rsllm.ITEM_SEQ_LEN]
    with torch.no_grad():
        rsllm.set_stage(UNIFIED)
        assert rsllm.slot_gate == 1  # open at the start, as the paper's prompts: the slots enter whole
        closed = tiny.build(slot_gate_init=0)
        closed.set_stage(UNIFIED)  # slot_gate_init 0: stage 2's prompts begin with empty slots
        assert (closed.user_prompt(item_seq, item_len).inputs_embeds == 0).all(-1).sum() >= item_len.clamp(max=3).sum()
        rsllm.slot_gate.fill_(0.5)
        unified = rsllm.user_prompt(item_seq, item_len)
        projected = 0.5 * rsllm.projector(rsllm.cf_encoder.item_embeddings[item_seq])  # [B, L, d_llm]
        assert projected.abs().sum() > 0
        rsllm.set_stage(TEXT_ONLY)
        text_only = rsllm.user_prompt(item_seq, item_len)
        rsllm.slot_gate.fill_(1)

    has_slot = unified.slot_positions >= 0  # [B, L]
    assert torch.equal(has_slot.sum(1), item_len.clamp(max=3))  # one slot per written item
    rows = torch.arange(len(item_seq))[:, None].expand_as(has_slot)[has_slot]
    assert torch.equal(unified.inputs_embeds[rows, unified.slot_positions[has_slot]], projected[has_slot])

    assert text_only.slot_positions is None
    slot_mask = torch.zeros_like(unified.attention_mask, dtype=torch.bool)
    slot_mask[rows, unified.slot_positions[has_slot]] = True
    for b in range(len(item_seq)):  # the same words, without the slots
        words = unified.input_ids[b][unified.attention_mask[b].bool() & ~slot_mask[b]]
        assert torch.equal(words, text_only.input_ids[b][text_only.attention_mask[b].bool()])


def test_lm_labels_cover_only_the_next_items_title_and_its_end(rsllm, batch):
    rsllm.set_stage(UNIFIED)
    item_seq, item_len, next_items = batch[rsllm.ITEM_SEQ], batch[rsllm.ITEM_SEQ_LEN], batch[rsllm.POS_ITEM_ID]
    with torch.no_grad():
        prompt = rsllm.user_prompt(item_seq, item_len)
        inputs_embeds, attention_mask, position_ids, labels, _, _ = rsllm.with_answers(prompt, next_items[:, None])

    prompt_length = prompt.inputs_embeds.shape[1]
    assert (labels[:, :prompt_length] == IGNORED).all()
    for b, item in enumerate(next_items.tolist()):
        title = rsllm.title_ids[item, : rsllm.item_text_lengths[item]].tolist()
        assert labels[b][labels[b] != IGNORED].tolist() == title + [rsllm.tokenizer.eos_token_id]
        answer = slice(prompt_length, prompt_length + len(title) + 1)
        assert attention_mask[b, answer].all() and not attention_mask[b, answer.stop :].any()
        start = int(position_ids[b, prompt_length - 1]) + 1  # positions go on after the prompt's last one
        assert position_ids[b, answer].tolist() == list(range(start, start + len(title) + 1))
    assert torch.equal(inputs_embeds[:, :prompt_length], prompt.inputs_embeds)


@pytest.mark.parametrize("stage", [TEXT_ONLY, UNIFIED])
def test_training_prompts_list_candidates_after_the_user_prompt(rsllm, batch, stage):
    rsllm.set_stage(stage)
    item_seq, item_len, next_items = batch[rsllm.ITEM_SEQ], batch[rsllm.ITEM_SEQ_LEN], batch[rsllm.POS_ITEM_ID]
    with torch.no_grad():
        prompt, user_positions, answers, listed = rsllm.training_prompt(item_seq, item_len, next_items)  # share 1
        user_prompt = rsllm.user_prompt(item_seq, item_len)
        states = rsllm.last_hidden_states(prompt.inputs_embeds, prompt.attention_mask, prompt.position_ids)
        user_states = rsllm.prompt_state(user_prompt)

    listing_head = rsllm.tokenizer(" Choose the answer from", add_special_tokens=False)["input_ids"]
    for b, item in enumerate(next_items.tolist()):
        words = prompt.input_ids[b][prompt.attention_mask[b].bool()].tolist()
        user_words = user_prompt.input_ids[b][user_prompt.attention_mask[b].bool()].tolist()
        assert words[: len(user_words)] == user_words  # the user prompt, then the list
        assert words[len(user_words) : len(user_words) + len(listing_head)] == listing_head
        title = rsllm.title_ids[item, : rsllm.item_text_lengths[item]].tolist()
        assert any(words[k : k + len(title)] == title for k in range(len(user_words), len(words)))  # the target listed
        assert user_positions[b] == prompt.attention_mask.shape[1] - 1 - (len(words) - len(user_words))
    # where the user prompt ends, the causal LLM's state is the user prompt's own: the list does not reach it
    assert torch.allclose(states[torch.arange(len(states)), user_positions].float(), user_states, atol=1e-4)


def test_no_candidates_in_training_prompts_with_a_share_of_0(tiny, batch):
    model = tiny.build(candidate_train_share=0.0)
    item_seq, item_len, next_items = batch[model.ITEM_SEQ], batch[model.ITEM_SEQ_LEN], batch[model.POS_ITEM_ID]
    prompt, user_positions, answers, listed = model.training_prompt(item_seq, item_len, next_items)
    assert torch.equal(prompt.input_ids, model.user_prompt(item_seq, item_len).input_ids)
    assert torch.equal(answers, next_items[:, None]) and not listed.any()
    assert (user_positions == prompt.input_ids.shape[1] - 1).all()


# ---- Hyper-parameters ------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "overrides, fragment",
    [
        ({"lora_r": 0}, "lora_r is 0"),
        ({"lora_dropout": 1.5}, "lora_dropout is 1.5"),
        ({"tau": 0}, "tau is 0"),
        ({"n_candidates": 1}, "n_candidates is 1"),
        ({"prompt_template": "This user has watched movies."}, "prompt_template"),
        ({"item_prompt_template": "{item} and {item}"}, "item_prompt_template"),
        ({"candidate_template": "Pick one:"}, "must contain {candidates}"),
        ({"candidate_train_share": 1.5}, "candidate_train_share"),
        ({"rank_candidates": 1}, "rank_candidates is 1: it must be 0 (no L_rank) or an integer in [2, n_candidates"),
        ({"rank_candidates": 99}, "rank_candidates is 99"),
        ({"rank_candidates": 3, "candidate_train_share": 0.0}, "set candidate_train_share > 0"),
        ({"gamma": -1}, "gamma is -1"),
        ({"rank_target": "popularity"}, "rank_target is 'popularity': use next_item"),
        ({"rank_per_token": "yes"}, "rank_per_token"),
        ({"slot_gate_lr": 0}, "slot_gate_lr is 0"),
        ({"slot_gate_init": "open"}, "slot_gate_init is 'open'"),
        ({"center_states": "yes"}, "center_states"),
        ({"item_tower": "fixed"}, "item_tower"),
        ({"lora_target_modules": ["no_such_module"]}, "lora_target_modules"),
    ],
)
def test_bad_hyper_parameters_are_one_line_errors(tiny, overrides, fragment):
    with pytest.raises(RecBoleLLMError) as caught:
        tiny.build(**overrides)
    assert fragment in str(caught.value) and "\n" not in str(caught.value)


# ---- Losses ----------------------------------------------------------------------------------------------------


def test_each_loss_term_is_finite_and_decreases_on_one_batch(tiny, batch):
    model = tiny.build()
    model.begin_stage(UNIFIED)
    model.train()
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    history = []
    for _ in range(6):
        losses = model.calculate_loss(batch)
        assert len(losses) == 3 and all(torch.isfinite(term) for term in losses)
        history.append([term.item() for term in losses])
        optimizer.zero_grad()
        sum(losses).backward()
        optimizer.step()
    first, last = history[0], history[-1]
    assert all(end < start for start, end in zip(first, last)), history

    model.set_stage(TEXT_ONLY)
    assert len(model.calculate_loss(batch)) == 2  # stage 1: L_lm and L_user_item


def test_ranked_answers_side_by_side_read_the_prompt_and_themselves_alone(tiny, batch):
    """With rank_candidates, each answer's log-likelihood in the one training pass equals that of a full forward of
    the prompt and that answer alone; the next item comes first, the others are listed candidates."""
    model = tiny.build(rank_candidates=3, length_groups=2)
    model.set_stage(UNIFIED)
    model.eval()  # no LoRA dropout: the same function in both passes
    item_seq, item_len, next_items = (batch[key][:4] for key in (model.ITEM_SEQ, model.ITEM_SEQ_LEN, model.POS_ITEM_ID))
    with torch.no_grad():
        torch.manual_seed(0)
        prompt, user_positions, answers, listed = model.training_prompt(item_seq, item_len, next_items)
        lm_loss, _, log_likelihoods = model.answered(prompt, answers, user_positions)
    assert answers.shape == log_likelihoods.shape == (4, 3) and listed.all()
    assert torch.equal(answers[:, 0], next_items) and (answers[:, 1:] != next_items[:, None]).all()
    for b in range(4):
        words = prompt.input_ids[b][prompt.attention_mask[b].bool()].tolist()
        for item in answers[b, 1:].tolist():  # the others are candidates the prompt lists
            title = model.title_ids[item, : model.item_text_lengths[item]].tolist()
            assert any(words[k : k + len(title)] == title for k in range(len(words)))
        for column in range(3):
            alone, _ = answer_log_likelihood_after(model, prompt_row(prompt, b), answers[b, column])
            assert log_likelihoods[b, column].item() == pytest.approx(alone.item(), rel=1e-4, abs=1e-4)
    n_tokens = int((model.item_text_lengths[next_items] + 1).sum())
    assert lm_loss.item() == pytest.approx(-log_likelihoods[:, 0].sum().item() / n_tokens, rel=1e-5)


def prompt_row(prompt, row):
    """One row of a left-padded prompt, its padding kept."""
    return dataclasses.replace(prompt, **{
        name: getattr(prompt, name)[row : row + 1]
        for name in ("inputs_embeds", "attention_mask", "input_ids", "position_ids")
    })


def test_rank_loss_is_a_loss_term_whose_gradient_reaches_lora_and_which_training_lowers(tiny, batch):
    model = tiny.build(rank_candidates=4)
    model.begin_stage(TEXT_ONLY)
    model.train()
    losses = model.calculate_loss(batch)
    assert len(losses) == 3 and losses[2].item() > 0  # (L_lm, L_user_item, L_rank) in stage 1
    lora = [weight for name, weight in model.llm.named_parameters() if "lora_B" in name]
    gradients = torch.autograd.grad(losses[2], lora, allow_unused=True)
    assert any(g is not None and g.abs().sum() > 0 for g in gradients)  # L_rank alone moves the adapters

    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    rank_losses = []
    for step in range(16):  # steps on L_rank alone, on two fixed candidate draws, alternating
        torch.manual_seed(step % 2)
        rank_losses.append(model.calculate_loss(batch)[2])
        optimizer.zero_grad()
        rank_losses[-1].backward()
        optimizer.step()
    for draw in (rank_losses[0::2], rank_losses[1::2]):  # each draw's L_rank falls at every visit
        falls = [before.item() - after.item() for before, after in zip(draw, draw[1:])]
        assert min(falls) > 0 and sum(falls) > 0.3
    model.set_stage(UNIFIED)
    assert len(model.calculate_loss(batch)) == 4  # (L_lm, L_user_item, L_id_text, L_rank) in stage 2


def test_rank_loss_is_the_next_items_cross_entropy_over_listed_rows_only():
    log_likelihoods = torch.tensor([[-1.0, -2.0, -3.0], [-5.0, -1.0, -1.0], [-2.0, -2.0, -2.0]])
    listed = torch.tensor([True, False, True])
    expected = (torch.logsumexp(log_likelihoods[0], 0) + 1.0 + torch.logsumexp(log_likelihoods[2], 0) + 2.0) / 2
    assert rank_loss(log_likelihoods, listed).item() == pytest.approx(expected.item())
    assert rank_loss(log_likelihoods, torch.zeros(3, dtype=torch.bool)).item() == 0
    assert rank_loss(log_likelihoods[:, :1], listed).item() == 0  # only the next item: nothing to rank


def test_rank_loss_against_a_distribution_is_its_cross_entropy_over_listed_rows_only():
    log_likelihoods = torch.tensor([[-1.0, -2.0, -3.0], [-5.0, -1.0, -1.0], [-2.0, -2.0, -2.0]])
    listed = torch.tensor([True, False, True])
    targets = torch.tensor([[0.5, 0.5, 0.0], [1.0, 0.0, 0.0], [0.2, 0.3, 0.5]])
    log_softmax = log_likelihoods.log_softmax(-1)
    expected = -(targets[listed] * log_softmax[listed]).sum(-1).mean()
    assert rank_loss(log_likelihoods, listed, targets).item() == pytest.approx(expected.item())
    one_hot = torch.zeros(3, 3).index_fill_(1, torch.tensor([0]), 1.0)  # all on the next item: the default's loss
    default = rank_loss(log_likelihoods, listed).item()
    assert rank_loss(log_likelihoods, listed, one_hot).item() == pytest.approx(default)


@pytest.mark.parametrize("rank_target, rank_per_token", [("next_item", True), ("cf_model", False), ("cf_model", True)])
def test_rank_loss_scores_answers_per_token_and_learns_the_cf_models_softmax(tiny, batch, rank_target, rank_per_token):
    """L_rank in training equals the cross-entropy of the answers' log-likelihoods (divided by each answer's tokens,
    the title's and the end token, with rank_per_token) against the next item or the frozen CF model's softmax over
    the same answers, as RecBole's SASRec scores them after the history."""
    model = tiny.build(rank_candidates=4, rank_target=rank_target, rank_per_token=rank_per_token)
    model.begin_stage(UNIFIED)
    model.eval()  # no LoRA dropout: the loss and the expectation compute the same function
    item_seq, item_len, next_items = (batch[key] for key in (model.ITEM_SEQ, model.ITEM_SEQ_LEN, model.POS_ITEM_ID))
    with torch.no_grad():
        torch.manual_seed(0)
        L_rank = model.calculate_loss(batch)[-1]
        torch.manual_seed(0)  # the same candidates drawn again
        prompt, user_positions, answers, listed = model.training_prompt(item_seq, item_len, next_items)
        _, _, log_likelihoods = model.answered(prompt, answers, user_positions)
    tokens = torch.tensor([[len(model.tokenizer(" " + model.item_names[item], add_special_tokens=False).input_ids) + 1
                            for item in row] for row in answers.tolist()])
    assert torch.equal(tokens, model.item_text_lengths[answers] + 1)  # the titles as tokenized, and the end token
    scores = log_likelihoods / tokens if rank_per_token else log_likelihoods
    if rank_target == "cf_model":
        cf_scores = model.cf_encoder.recommender.full_sort_predict(batch).gather(1, answers)  # RecBole's SASRec
        targets = cf_scores.softmax(-1)
        assert not torch.allclose(targets[:, 0], torch.ones(len(targets)))  # the other answers get a share too
    else:
        targets = torch.zeros_like(scores).index_fill_(1, torch.tensor([0]), 1.0)
    expected = -(targets * scores.log_softmax(-1)).sum(-1).mean()
    assert L_rank.item() == pytest.approx(model.gamma * expected.item(), rel=1e-4)


@pytest.mark.parametrize("stage", [TEXT_ONLY, UNIFIED])
def test_length_groups_give_the_losses_and_gradients_of_one_padded_pass_on_fewer_tokens(tiny, batch, stage):
    outcomes = {}
    for groups in (1, 3):
        model = tiny.build(length_groups=groups)
        model.begin_stage(stage)
        model.eval()  # no LoRA dropout: the two runs compute the same function
        columns = []
        decoder = model.llm.get_base_model().get_decoder()
        hook = decoder.register_forward_pre_hook(lambda module, args, kwargs: columns.append(
            kwargs["inputs_embeds"].shape[0] * kwargs["inputs_embeds"].shape[1]), with_kwargs=True)
        torch.manual_seed(0)  # the same candidate lists
        losses = model.calculate_loss(batch)
        hook.remove()
        sum(losses).backward()
        gradients = {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}
        outcomes[groups] = torch.stack(losses).detach(), gradients, sum(columns), len(columns)
    (one_losses, one_grads, one_tokens, one_calls), (losses, grads, tokens, calls) = outcomes[1], outcomes[3]
    assert calls == one_calls + 2  # the prompts in three passes (the item tower's pass, where there is one, alike)
    assert tokens < one_tokens  # each group padded to its own longest prompt and answer only
    torch.testing.assert_close(losses, one_losses, rtol=1e-5, atol=1e-6)
    assert grads.keys() == one_grads.keys() and any("lora_B" in name for name in grads)
    for name in grads:
        torch.testing.assert_close(grads[name], one_grads[name], rtol=1e-4, atol=1e-6, msg=name)


def test_gradient_checkpointing_stays_on_while_training(tiny, batch):
    model = tiny.build(gradient_checkpointing=True)
    layers = [m for m in model.llm.modules() if isinstance(m, GradientCheckpointingLayer)]
    model.begin_stage(UNIFIED)
    model.train()
    assert layers and all(layer.gradient_checkpointing and layer.training for layer in layers)
    sum(model.calculate_loss(batch)).backward()
    assert all(p.grad is not None for name, p in model.named_parameters() if "lora_B" in name)
    model.eval()
    assert not any(layer.training for layer in layers)


# ---- Two stages, and the item tower once per evaluation --------------------------------------------------------


class Records(logging.Handler):
    def __init__(self):
        super().__init__(logging.INFO)
        self.messages = []

    def emit(self, record):
        self.messages.append(record.getMessage())


@pytest.fixture(scope="module")
def trained(tiny):
    """A model trained through both stages by the LLMTrainer, with snapshots of the projector at each stage start."""
    model = tiny.build()
    backbone_before = {name: t.clone() for name, t in load_llm("tiny-llama").model.state_dict().items()}
    projector_at = {"init": [p.detach().clone() for p in model.projector.parameters()]}
    begin_stage = model.begin_stage

    def recorded_begin_stage(name):
        begin_stage(name)
        projector_at[name] = [p.detach().clone() for p in model.projector.parameters()]

    model.begin_stage = recorded_begin_stage
    records = Records()
    logging.getLogger().addHandler(records)
    logging.getLogger().setLevel(logging.INFO)
    trainer = LLMTrainer(model.config, model)
    try:
        trainer.fit(tiny.train_data, tiny.valid_data, saved=True)
    finally:
        logging.getLogger().removeHandler(records)
    return model, trainer, records.messages, projector_at, backbone_before


def test_stage_1_then_stage_2_each_logged(trained):
    _, _, messages, _, _ = trained
    stage_lines = [m for m in messages if "stage '" in m and "epochs" in m]
    assert [TEXT_ONLY in stage_lines[0], UNIFIED in stage_lines[1], len(stage_lines)] == [True, True, 2]


def test_the_slot_gate_learns_at_its_own_rate_in_stage_2_only(tiny, batch):
    model = tiny.build(slot_gate_lr=0.05)
    trainer = LLMTrainer(model.config, model)
    for stage, gate_groups in ((TEXT_ONLY, []), (UNIFIED, [[0.05, 1]])):
        model.begin_stage(stage)
        optimizer = trainer._build_optimizer()
        assert [[group["lr"], len(group["params"])] for group in optimizer.param_groups
                if any(weight is model.slot_gate for weight in group["params"])] == gate_groups
    model.train()
    sum(model.calculate_loss(batch)).backward()
    optimizer.step()  # Adam's first step moves each weight by its learning rate
    assert abs(model.slot_gate.item() - 1) == pytest.approx(0.05, rel=1e-3)  # from its start, open
    assert model.config["learning_rate"] < 0.01  # the other weights move by the run's rate


def test_centred_scores_spread_items_that_the_llm_writes_alike(trained):
    model, _, _, _, _ = trained
    items = model.item_matrix[1:]

    def mean_pairwise_cosine(rows):
        cosines = rows @ rows.T
        return ((cosines.sum() - cosines.trace()) / (len(rows) * (len(rows) - 1))).item()

    assert torch.allclose(model.compared(items), items, atol=1e-6)  # unit rows already: the paper's cosine
    model.center_states = True
    try:
        centred = model.compared(items)
    finally:
        model.center_states = False
    assert torch.allclose(centred.norm(dim=1), torch.ones(len(items)), atol=1e-5)
    assert mean_pairwise_cosine(centred) < min(0.05, mean_pairwise_cosine(items) - 0.1)


def test_a_frozen_item_tower_is_computed_once_and_held_through_training_evaluation_and_stages(
    tiny, batch, monkeypatch
):
    model = tiny.build(item_tower="frozen")
    trainer = LLMTrainer(model.config, model)
    model.begin_stage(TEXT_ONLY)  # computes the stage's item matrix
    held = model.item_matrix.clone()
    assert torch.allclose(held[1:].norm(dim=1), torch.ones(model.n_items - 1))
    monkeypatch.setattr(model, "compute_item_matrix", lambda: pytest.fail("the held item matrix was computed again"))
    monkeypatch.setattr(model, "item_embedding", lambda items: pytest.fail("the item tower ran in training"))
    model.train()
    optimizer = trainer._build_optimizer()
    lm_loss, user_item_loss = model.calculate_loss(batch)
    assert 0 < user_item_loss.item() / model.alpha < 2 * math.log(model.n_items)  # a softmax over every item
    (lm_loss + user_item_loss).backward()
    optimizer.step()
    trainer.evaluate(tiny.valid_data, load_best_model=False)  # with changed weights, still the held matrix
    model.begin_stage(UNIFIED)  # and in the next stage
    model.calculate_loss(batch)
    assert torch.equal(model.item_matrix, held)


def test_projector_trains_in_stage_2_only(trained):
    model, _, _, projector_at, _ = trained
    unchanged = [torch.equal(a, b) for a, b in zip(projector_at["init"], projector_at[UNIFIED])]
    assert all(unchanged)  # stage 1 (and its best checkpoint) left the projector alone
    after = [p.detach() for p in model.projector.parameters()]
    assert not any(torch.equal(a, b) for a, b in zip(projector_at[UNIFIED], after))


def test_base_llm_is_bit_identical_after_training(trained):
    model, trainer, _, _, backbone_before = trained
    backbone = load_llm("tiny-llama")
    after = backbone.model.state_dict()
    assert all(torch.equal(backbone_before[name], after[name]) for name in backbone_before)
    assert not any(isinstance(module, LoraLayer) for module in backbone.model.modules())
    saved = load_checkpoint(trainer.saved_model_file)["state_dict"]
    assert not any(key.startswith("llm.") and "lora_" not in key for key in saved)
    assert any("lora_B" in key for key in saved)


def test_item_tower_runs_once_per_evaluation_and_again_only_after_a_training_step(trained, tiny):
    model, trainer, _, _, _ = trained
    calls = {"item_embedding": 0, "full_sort_predict": 0}
    for name in calls:
        method = getattr(model, name)

        def counted(*args, _method=method, _name=name):
            calls[_name] += 1
            return _method(*args)

        setattr(model, name, counted)
    n_item_batches = math.ceil((model.n_items - 1) / model.item_batch_size)  # item 0 is padding
    valid_data = tiny.valid_data
    try:
        model.item_matrix_outdated()
        first = trainer.evaluate(valid_data, load_best_model=False)
        assert calls == {"item_embedding": n_item_batches, "full_sort_predict": len(valid_data)}
        again = trainer.evaluate(valid_data, load_best_model=False)  # same weights: the item matrix is reused
        assert calls == {"item_embedding": n_item_batches, "full_sort_predict": 2 * len(valid_data)}
        assert again == first
        model.train()
        model.calculate_loss(next(iter(tiny.train_data)))  # a training step follows: the weights change
        before = calls["item_embedding"]
        trainer.evaluate(valid_data, load_best_model=False)
        assert calls["item_embedding"] == before + n_item_batches  # computed again
    finally:
        for name in calls:
            delattr(model, name)
    assert len(valid_data) > 1  # several user batches reuse one item matrix


def test_a_reloaded_checkpoint_scores_with_the_item_matrix_it_holds(trained, tiny, monkeypatch):
    model, trainer, _, _, _ = trained
    expected = trainer.evaluate(tiny.test_data, load_best_model=True)
    reloaded = tiny.build()
    monkeypatch.setattr(reloaded, "compute_item_matrix", lambda: pytest.fail("the item matrix was computed again"))
    assert LLMTrainer(reloaded.config, reloaded).evaluate(
        tiny.test_data, load_best_model=True, model_file=trainer.saved_model_file
    ) == expected


def test_llm_layers_runs_the_first_layers_and_leaves_the_shared_llm_whole(tiny, batch):
    shallow = tiny.build(llm_layers=1)
    assert len(shallow.llm.get_base_model().get_decoder().layers) == 1
    assert len(load_llm("tiny-llama").model.get_decoder().layers) == 2
    losses = shallow.calculate_loss(batch)
    assert all(torch.isfinite(loss) for loss in losses)
    item_seq, item_len = batch[shallow.ITEM_SEQ][:2], batch[shallow.ITEM_SEQ_LEN][:2]
    candidates = torch.arange(1, 11).reshape(2, 5)
    assert len(shallow.read_candidates(item_seq, item_len, candidates).answers) == 2  # generation runs on the cut model
    with pytest.raises(RecBoleLLMError, match="llm_layers is 3: tiny-llama has 2 layers"):
        tiny.build(llm_layers=3)


# ---- End to end ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("candidate_eval", [False, True])
def test_end_to_end_through_run_recbole_llm(workdir, candidate_eval):
    result = run_recbole_llm(  # without a cf_checkpoint: the run trains the CF model first (cached in workdir)
        model="RSLLM", dataset=TINY_DATASET,
        config_dict=tiny_config(workdir, **RSLLM_SIZES, candidate_eval=candidate_eval),
    )
    test_result = result["test_result"]
    assert 0 <= test_result["ndcg@10"] <= 1 and 0 <= test_result["recall@10"] <= 1
    assert ("hr@1_candidates" in test_result) == candidate_eval == ("valid_ratio" in test_result)
    assert "hr@1_candidates" not in result["best_valid_result"]  # validation reads RecBole's metrics only
    if candidate_eval:
        assert 0 <= test_result["hr@1_x_valid_ratio"] <= test_result["valid_ratio"] <= 1
        assert 0 <= test_result["hr@1_candidates"] <= 1
        assert "test hr@1_candidates" in comparison_rows([result])[0]
        for ranked in ("hr@1_ranked", "ndcg@5_ranked", "hr@1_ranked_sum", "ndcg@5_ranked_sum",
                       "hr@1_ranked_scores", "ndcg@5_ranked_scores"):  # the titles' likelihood, the full ranking's
            assert 0 <= test_result[ranked] <= 1  # scores: a ranking, never an invalid answer
        assert test_result["hr@1_ranked"] <= test_result["ndcg@5_ranked"]
        per_user = result["candidate_per_user"]  # each candidate user's outcome, for paired comparisons
        assert len(per_user["user_id"]) == RSLLM_SIZES["n_candidate_users"]
        assert per_user["hr@1_x_valid_ratio"].mean() == pytest.approx(test_result["hr@1_x_valid_ratio"])
        assert per_user["ndcg@5_ranked"].mean() == pytest.approx(test_result["ndcg@5_ranked"])
        sasrec = run_recbole_llm(model="SASRec", dataset=TINY_DATASET, config_dict=tiny_config(
            workdir, candidate_eval=True, n_candidates=RSLLM_SIZES["n_candidates"]
        ))["test_result"]  # the same users and candidates, SASRec's best-scored one picked
        assert sasrec["valid_ratio"] == 1 and sasrec["hr@1_candidates"] == sasrec["hr@1_x_valid_ratio"]
        assert sasrec["hr@1_ranked"] == sasrec["hr@1_candidates"]  # its pick is its best-ranked candidate
    checkpoint = load_checkpoint(result["saved_model_file"])
    assert checkpoint["stage"] == result["tested_stage"] == UNIFIED  # the last stage's best
    assert comparison_rows([result])[0]["tested stage"] == UNIFIED
    assert not any(key.startswith("llm.") and "lora_" not in key for key in checkpoint["state_dict"])
