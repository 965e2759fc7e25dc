"""Laser on tiny-llama and the tiny ml-100k copy: M-Former blocks, frozen backbones, the two-stage item matrix,
scoring, and end-to-end runs of Laser and of each of the paper's ablation switches."""

import logging
import os

import pytest
import torch
import torch.nn.functional as F

from conftest import TINY_DATASET, assert_users_in_chunks_score_as_one_pass
from recbole_llm.cf_training import trained_checkpoint
from recbole_llm.checkpoint import load_checkpoint
from recbole_llm.config import Config
from recbole_llm.errors import RecBoleLLMError
from recbole_llm.model.layers import MFormer, MFormerBlock, Routing
from recbole_llm.model.sequential_recommender.laser import FROZEN_ITEMS, REFRESHED_ITEMS, Laser
from recbole_llm.quick_start import load_data_and_model, run_recbole_llm
from recbole_llm.trainer import LLMTrainer, load_model_state
from recbole_llm.utils import get_trainer

pytestmark = pytest.mark.usefixtures("workdir")


MODEL = "Laser"  # of the tiny and batch fixtures


@pytest.fixture(scope="module")
def laser(tiny):
    return tiny.build()


def cf_checkpoint_of(tiny, cf_model):
    """The session's SASRec, or a CF model of another kind trained into the module's folder on first use."""
    if cf_model == tiny.config["cf_model"]:
        return tiny.config["cf_checkpoint"]
    config = Config(model="Laser", dataset=TINY_DATASET, config_dict={**tiny.config_dict, "cf_model": cf_model})
    return trained_checkpoint(config, tiny.train_data._dataset)


def trainable_state(model):
    return {name: p.detach().clone() for name, p in model.named_parameters() if p.requires_grad}


# ---- M-Former -----------------------------------------------------------------------------------------------


def mformer(top_k=1, n_experts=4):
    torch.manual_seed(0)
    return MFormer(
        cf_size=16, llm_size=24, n_experts=n_experts, n_query=5, hidden_size=32, n_layers=3, n_heads=4,
        cross_attention_freq=2, top_k=top_k, dropout=0.0,
    )


def cf_batch():
    torch.manual_seed(1)
    cf_states = torch.randn(6, 7, 16)  # [B, N, d_cf]
    valid = torch.arange(7) < torch.tensor([7, 5, 3, 1, 2, 6])[:, None]  # [B, N]
    return cf_states, valid


def test_every_block_keeps_the_query_shape_and_the_mformer_makes_an_llm_wide_prefix():
    cf_states, valid = cf_batch()
    module = mformer()
    assert [block.has_cross_attention for block in module.blocks] == [True, False, True]
    assert module.query_experts.shape == (4, 5, 32)
    queries, memory = torch.randn(6, 5, 32), module.cf_projection(cf_states)
    assert memory.shape == (6, 7, 32)
    for block in module.blocks:
        assert isinstance(block, MFormerBlock) and block(queries, memory, ~valid).shape == (6, 5, 32)
    prefix, routing = module(cf_states, valid)
    assert prefix.shape == (6, 5, 24)
    assert routing.probs.shape == routing.weights.shape == routing.chosen.shape == (6, 4)


def test_padding_positions_are_invisible_to_the_mformer():
    cf_states, valid = cf_batch()
    module = mformer().eval()
    changed = cf_states.masked_fill(~valid[..., None], 1e3)
    assert torch.allclose(module(cf_states, valid)[0], module(changed, valid)[0], atol=1e-5)


def test_router_probabilities_sum_to_one_differ_between_users_and_top1_picks_one_expert():
    cf_states, valid = cf_batch()
    routing = mformer().route(cf_states, valid)
    assert torch.allclose(routing.probs.sum(1), torch.ones(6))
    assert not torch.allclose(routing.probs[0], routing.probs[1])
    assert (routing.chosen.sum(1) == 1).all()
    assert torch.equal(routing.weights, routing.chosen.float())  # the chosen expert's tokens, exactly
    assert torch.equal(routing.chosen.float().argmax(1), routing.probs.argmax(1))
    # the router is the average over valid positions of each position's softmax
    module = mformer()
    by_hand = torch.softmax(module.router(cf_states[2, :3]), -1).mean(0)
    assert torch.allclose(module.route(cf_states, valid).probs[2], by_hand, atol=1e-6)


def test_top_k_mixes_the_chosen_experts_query_tokens_with_renormalised_weights():
    cf_states, valid = cf_batch()
    module = mformer(top_k=2)
    routing = module.route(cf_states, valid)
    assert (routing.chosen.sum(1) == 2).all()
    assert torch.allclose(routing.weights.sum(1), torch.ones(6))
    top2 = routing.probs.topk(2).values
    assert torch.allclose(routing.weights.topk(2).values, top2 / top2.sum(1, keepdim=True))


def test_router_gets_the_task_gradient_with_top1():
    cf_states, valid = cf_batch()
    module = mformer()
    module(cf_states, valid)[0].pow(2).sum().backward()
    assert module.router.weight.grad.abs().sum() > 0


def test_load_balancing_term_on_a_hand_made_example():
    probs = torch.tensor([[0.7, 0.2, 0.1], [0.6, 0.3, 0.1], [0.1, 0.2, 0.7], [0.3, 0.4, 0.3]])
    chosen = torch.tensor([[1, 0, 0], [1, 0, 0], [0, 0, 1], [0, 1, 0]], dtype=torch.bool)
    routing = Routing(probs=probs, weights=chosen.float(), chosen=chosen)
    f = [2 / 4, 1 / 4, 1 / 4]
    p = [(0.7 + 0.6 + 0.1 + 0.3) / 4, (0.2 + 0.3 + 0.2 + 0.4) / 4, (0.1 + 0.1 + 0.7 + 0.3) / 4]
    assert routing.balance_loss().item() == pytest.approx(3 * sum(fj * pj for fj, pj in zip(f, p)))
    even = Routing(probs=torch.full((3, 3), 1 / 3), weights=torch.eye(3), chosen=torch.eye(3, dtype=torch.bool))
    assert even.balance_loss().item() == pytest.approx(1.0)


# ---- Settings ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "setting, message",
    [
        ({"n_query": 0}, "n_query is 0"),
        ({"n_experts": 0, "router_top_k": 1}, "n_experts is 0"),
        ({"router_top_k": 4}, "router_top_k is 4"),
        ({"router_top_k": 0}, "router_top_k is 0"),
        ({"mformer_hidden": 30}, "mformer_hidden is 30: it must be divisible by mformer_heads (4)"),
        ({"prompt_item_marker": " >> item:"}, "prompt_item_marker is ' >> item:': it must hold {index} once"),
        ({"prefix_mode": "qformer"}, "prefix_mode is 'qformer'"),
        ({"stage2_epochs": -1}, "stage2_epochs is -1"),
        ({"llm_layers": 3}, "llm_layers is 3: tiny-llama has 2 layers"),
        ({"deep_prefix": "yes"}, "deep_prefix is 'yes'"),
    ],
)
def test_bad_settings_give_one_line_errors(tiny, setting, message):
    with pytest.raises(RecBoleLLMError) as caught:
        tiny.build(**setting)
    assert message in str(caught.value) and "\n" not in str(caught.value)


# ---- The model on a batch ----------------------------------------------------------------------------------


def test_shapes_of_the_embeddings_and_scores(laser, batch):
    laser.eval()
    with torch.no_grad():
        user_embedding, routing = laser.user_embedding(batch[laser.ITEM_SEQ], batch[laser.ITEM_SEQ_LEN])
        laser.begin_evaluation()
        scores = laser.full_sort_predict(batch)
    assert user_embedding.shape == (len(batch), 64)
    assert routing.probs.shape == (len(batch), 3)
    assert laser.item_matrix.shape == (laser.n_items, 64)
    assert torch.allclose(laser.item_matrix[1:].norm(dim=1), torch.ones(laser.n_items - 1))
    assert scores.shape == (len(batch), laser.n_items)
    assert (scores[:, 1:].abs() <= 1 / laser.tau + 1e-3).all()


def test_item_matrix_batched_by_text_length_holds_each_items_own_embedding(laser, monkeypatch):
    monkeypatch.setattr(laser, "item_batch_size", 37)  # batches of items of one text length, not of neighbouring ids
    laser.eval()
    items = torch.tensor([1, 2, 3, 200, laser.n_items - 1])
    with torch.no_grad():
        matrix = laser.compute_item_matrix()
        alone = torch.nn.functional.normalize(laser.item_embedding(items), dim=-1)
    assert torch.allclose(matrix[items], alone, atol=1e-5)
    assert (matrix[0] == 0).all()  # the padding item


def test_full_ranking_scores_of_users_in_chunks_equal_one_pass(laser, tiny):
    assert_users_in_chunks_score_as_one_pass(laser, next(iter(tiny.test_data))[0])


def test_user_embedding_is_the_llm_output_at_the_suffix(tiny, batch):
    laser = tiny.build(deep_prefix=False).eval()  # the paper's input prefix; the deep one: the test below
    item_seq, item_len = batch[laser.ITEM_SEQ], batch[laser.ITEM_SEQ_LEN]
    with torch.no_grad():
        user_embedding, _ = laser.user_embedding(item_seq, item_len)
        prefix, _ = laser.history_prefix(item_seq, item_len)
        prompt = laser.user_prompt.assemble(
            item_seq, item_len, laser.llm.input_embeddings(), prefix=prefix, suffix=laser.suffix_tokens
        )
        hidden = laser.llm.transformer()(
            inputs_embeds=prompt.inputs_embeds, attention_mask=prompt.attention_mask, position_ids=prompt.position_ids
        ).last_hidden_state
    assert (prompt.suffix_positions[:, -1] == prompt.inputs_embeds.shape[1] - 1).all()  # the suffix ends the prompt
    assert torch.allclose(prompt.inputs_embeds[:, -1], laser.suffix_tokens[-1].expand(len(batch), -1))
    assert torch.allclose(user_embedding, hidden[:, -1], atol=1e-5)


def test_llm_layers_reads_an_earlier_layer_and_leaves_the_shared_llm_whole(tiny, batch):
    first_layer = tiny.build(llm_layers=1, deep_prefix=False).eval()
    decoder = first_layer.llm.transformer()
    assert len(decoder.layers) == 2  # the cached LLM keeps its layers
    item_seq, item_len = batch[first_layer.ITEM_SEQ], batch[first_layer.ITEM_SEQ_LEN]
    with torch.no_grad():
        embedding, _ = first_layer.user_embedding(item_seq, item_len)
        prefix, _ = first_layer.history_prefix(item_seq, item_len)
        prompt = first_layer.user_prompt.assemble(
            item_seq, item_len, decoder.embed_tokens, prefix=prefix, suffix=first_layer.suffix_tokens
        )
        hidden_states = decoder(
            inputs_embeds=prompt.inputs_embeds, attention_mask=prompt.attention_mask,
            position_ids=prompt.position_ids, output_hidden_states=True,
        ).hidden_states  # the embeddings, then the output of each layer
    assert torch.allclose(embedding, decoder.norm(hidden_states[1])[:, -1], atol=1e-5)


@pytest.mark.parametrize("llm_path", ["tiny-llama", "tiny-qwen2", "tiny-gpt2"])
def test_deep_prefix_is_read_by_every_layer_not_written_in_the_prompt(tiny, batch, llm_path):
    deep = tiny.build(llm_path=llm_path).eval()  # deep_prefix: Laser.yaml's default
    item_seq, item_len = batch[deep.ITEM_SEQ], batch[deep.ITEM_SEQ_LEN]
    prompt = deep.user_prompt.assemble(item_seq, item_len, deep.llm.input_embeddings(), suffix=deep.suffix_tokens)
    assert prompt.prefix_positions is None  # the prompt holds no prefix tokens: the layers' keys and values do
    with torch.no_grad():
        together, _ = deep.user_embedding(item_seq, item_len)
        alone = torch.cat([deep.user_embedding(item_seq[[row]], item_len[[row]])[0] for row in range(4)])
        prefix, _ = deep.history_prefix(item_seq, item_len)
        moved = deep.suffix_output(deep.user_prompt, item_seq, item_len, prefix + torch.randn_like(prefix) * prefix.std())
    assert torch.allclose(together[:4], alone, atol=1e-4)  # left padding and the prefix's mask line up
    assert not torch.allclose(together, moved, atol=1e-3)

    deep.begin_stage(REFRESHED_ITEMS)
    deep.train()
    deep.begin_epoch(0)  # the item matrix the loss scores against
    next_item_loss, balance_loss = deep.calculate_loss(batch)
    (next_item_loss + balance_loss).backward()
    assert deep.mformer.prefix_map.weight.grad.abs().sum() > 0  # through every layer's keys and values
    assert all(p.grad is None for p in deep.llm.model.parameters())


def test_a_checkpoint_from_before_deep_prefix_keeps_its_input_prefix(tiny):
    older = tiny.build(deep_prefix=None)  # a Config restored from such a checkpoint has no value for it
    assert not older.deep_prefix and older.user_prompt.n_prefix == older.n_query


def test_the_target_item_never_appears_in_the_prompt(laser, batch):
    item_seq, item_len, targets = batch[laser.ITEM_SEQ], batch[laser.ITEM_SEQ_LEN], batch[laser.POS_ITEM_ID]
    prompt = laser.user_prompt.assemble(item_seq, item_len, laser.llm.input_embeddings())
    item_text = laser.user_prompt.item_token_ids
    texts = laser.llm.tokenizer.batch_decode(prompt.input_ids, skip_special_tokens=True)
    for text, history, length, target in zip(texts, item_seq, item_len, targets):
        last_items = history[:length][-3:]
        assert target not in history[:length]
        for item in last_items:  # the kept history is written...
            assert laser.llm.tokenizer.decode(item_text[item][: laser.user_prompt.item_token_valid[item].sum()]) in text
        target_text = laser.llm.tokenizer.decode(item_text[target][: laser.user_prompt.item_token_valid[target].sum()])
        assert target_text not in text  # ...the target is not


def test_full_sort_predict_agrees_with_predict(laser, batch):
    laser.eval()
    with torch.no_grad():
        laser.begin_evaluation()
        full_scores = laser.full_sort_predict(batch)
        pair_scores = laser.predict(batch)  # the batch's own next items
    rows = torch.arange(len(batch))
    assert torch.allclose(full_scores[rows, batch[laser.ITEM_ID]], pair_scores, atol=1e-4)


def test_scores_are_cosines_of_centred_embeddings_and_the_paper_s_without_the_switches(tiny, laser, batch):
    """Laser.yaml's switches (centring, a linear head that starts as the identity) compare embeddings after
    subtracting the mean item row; without them the scores are the paper's plain cosine / tau."""
    paper = tiny.build(embedding_head="none", center_embeddings=False)
    paper.load_state_dict(laser.state_dict(), strict=False)  # the same prefix and suffix weights
    for model in (laser, paper):
        model.eval()
    with torch.no_grad():
        laser.begin_evaluation()
        paper.begin_evaluation()
        assert torch.equal(laser.item_matrix, paper.item_matrix)
        items = laser.item_matrix
        users = F.normalize(laser.user_embedding(batch[laser.ITEM_SEQ], batch[laser.ITEM_SEQ_LEN])[0], dim=-1)
        mean = items[1:].mean(0)
        centred = F.normalize(users - mean, dim=-1) @ F.normalize(items - mean, dim=-1).T / laser.tau
        plain = users @ items.T / laser.tau
        for model, expected in ((laser, centred), (paper, plain)):
            scores = model.full_sort_predict(batch)
            assert torch.allclose(scores[:, 1:], expected[:, 1:], atol=1e-4) and scores[:, 0].eq(float("-inf")).all()
    assert laser.item_matrix.norm(dim=1)[1:].allclose(torch.ones(laser.n_items - 1))  # stored unit rows, either way


def test_separate_heads_start_as_the_shared_one_and_then_map_users_and_items_each_their_own_way(tiny, laser, batch):
    separate = tiny.build(embedding_head="separate")
    separate.load_state_dict(laser.state_dict(), strict=False)  # the same prefix, suffix and (identity) item head
    for model in (laser, separate):
        model.eval()
        model.begin_evaluation()
    with torch.no_grad():
        assert torch.allclose(separate.full_sort_predict(batch)[:, 1:], laser.full_sort_predict(batch)[:, 1:], atol=1e-4)
    separate.train()
    separate.begin_stage(FROZEN_ITEMS)
    sum(separate.calculate_loss(batch)).backward()
    for head in (separate.user_head, separate.embedding_head):  # each side's map learns from the same loss
        assert head.weight.grad.abs().sum() > 0
    assert not torch.equal(separate.user_head.weight.grad, separate.embedding_head.weight.grad)
    with torch.no_grad():
        separate.user_head.weight.add_(0.1 * torch.randn_like(separate.user_head.weight))
        rows = separate.item_matrix[1:4]
        assert torch.equal(separate.compared(rows), laser.compared(rows))  # items keep theirs
        assert not torch.allclose(separate.compared_users(rows), laser.compared_users(rows))


def test_training_changes_only_the_trainable_weights_and_the_prefix_learns_through_the_frozen_llm(tiny):
    model = tiny.build()
    llm_before = {k: v.clone() for k, v in model.llm.model.state_dict().items()}
    cf_before = {k: v.clone() for k, v in model.cf_encoder.state_dict().items()}
    trainable_before = trainable_state(model)
    assert set(trainable_before) == {
        name for name, _ in model.named_parameters()
        if name.startswith(("mformer.", "suffix_tokens", "embedding_head."))  # the head: Laser.yaml's default
    }
    model.begin_stage(REFRESHED_ITEMS)
    model.train()
    model.begin_epoch(0)
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    for step, interaction in zip(range(3), tiny.train_data):
        optimizer.zero_grad()
        next_item_loss, balance_loss = model.calculate_loss(interaction)
        (next_item_loss + balance_loss).backward()
        # the prefix map's only way to the loss is through the frozen LLM's input embeddings
        assert model.mformer.prefix_map.weight.grad.abs().sum() > 0
        assert model.suffix_tokens.grad.abs().sum() > 0
        optimizer.step()
    assert all(torch.equal(v, model.llm.model.state_dict()[k]) for k, v in llm_before.items())
    assert all(torch.equal(v, model.cf_encoder.state_dict()[k]) for k, v in cf_before.items())
    assert all(p.grad is None for p in model.llm.model.parameters())
    assert all(not torch.equal(v, trainable_state(model)[k]) for k, v in trainable_before.items())


def test_trainable_share_is_logged(tiny, caplog):
    with caplog.at_level(logging.INFO):
        model = tiny.build()
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert f"Laser trains {trainable:,} parameters" in caplog.text and "of the LLM's" in caplog.text


# ---- Two stages through the trainer ------------------------------------------------------------------------


def record_item_matrix_calls(model, monkeypatch):
    """Events in order: the trainer's hooks and every computation of the item matrix."""
    events = []
    for hook in ("begin_stage", "begin_epoch", "begin_evaluation", "compute_item_matrix"):
        original = getattr(model, hook)

        def recorded(*args, _original=original, _hook=hook):
            stage = args[0] if _hook == "begin_stage" else model.stage
            events.append(_hook if _hook == "compute_item_matrix" else f"{_hook}:{stage}")
            return _original(*args)

        monkeypatch.setattr(model, hook, recorded)
    return events


def test_item_matrix_is_computed_once_per_stage1_epoch_and_evaluation_and_never_in_stage2(tiny, monkeypatch, caplog):
    model = tiny.build(stage1_epochs=2, stage2_epochs=2)
    events = record_item_matrix_calls(model, monkeypatch)
    matrix_is_the_best_weights = []
    begin_stage = model.begin_stage

    def begin_stage_and_check(name):
        begin_stage(name)
        if name == FROZEN_ITEMS:  # the reloaded best checkpoint brought the matrix its weights made
            recomputed = Laser.compute_item_matrix(model)  # the class's method: not recorded
            matrix_is_the_best_weights.append(torch.allclose(model.item_matrix, recomputed, atol=1e-5))

    monkeypatch.setattr(model, "begin_stage", begin_stage_and_check)
    trainer = LLMTrainer(model.config, model)
    with caplog.at_level(logging.INFO):
        trainer.fit(tiny.train_data, tiny.valid_data, saved=True)
    compute = "compute_item_matrix"
    stage1 = [
        f"begin_epoch:{REFRESHED_ITEMS}", compute, f"begin_evaluation:{REFRESHED_ITEMS}", compute,
        f"begin_epoch:{REFRESHED_ITEMS}",  # the weights have not changed since the validation's matrix
        f"begin_evaluation:{REFRESHED_ITEMS}", compute,
    ]
    stage2 = [f"begin_epoch:{FROZEN_ITEMS}", f"begin_evaluation:{FROZEN_ITEMS}"] * 2
    assert events == [f"begin_stage:{REFRESHED_ITEMS}", *stage1, f"begin_stage:{FROZEN_ITEMS}", *stage2]
    assert matrix_is_the_best_weights == [True]
    assert caplog.text.count("routing shares of the 3 query experts over 300 evaluated users") == 4

    frozen_matrix = model.item_matrix.clone()
    model.train()
    model.calculate_loss(next(iter(tiny.train_data)))[0].backward()
    assert torch.equal(model.item_matrix, frozen_matrix)  # no gradient, no refresh in stage 2


def fixed_users(model, interaction):
    """The batch's user embeddings, computed once and detached: the loss then reaches the trainable weights through
    the item side alone."""
    with torch.no_grad():
        users, _ = model.user_embedding(interaction[model.ITEM_SEQ], interaction[model.ITEM_SEQ_LEN])
    return lambda item_seq, item_len: (users, None)


@pytest.mark.parametrize("item_grad_negatives, item_grad_scores", [(0, "sampled"), (5, "sampled"), (5, "matrix")])
def test_stage1_with_item_grad_negatives_trains_the_item_side(tiny, batch, monkeypatch, item_grad_negatives,
                                                               item_grad_scores):
    model = tiny.build(item_grad_negatives=item_grad_negatives, item_grad_scores=item_grad_scores,
                       embedding_head="none", cold_item_ratio=0.3, mformer_dropout=0.0)
    model.begin_stage(REFRESHED_ITEMS)
    model.train()
    model.begin_epoch(0)
    held = model.item_matrix.clone()
    monkeypatch.setattr(model, "user_embedding", fixed_users(model, batch))
    written = []
    monkeypatch.setattr(model, "item_embedding", lambda items, _embed=model.item_embedding: (
        written.append(items), _embed(items))[1])
    next_item_loss, _ = model.calculate_loss(batch)
    item_side_learns = item_grad_negatives > 0
    assert next_item_loss.requires_grad == item_side_learns  # without it, nothing trainable reaches the loss
    if not item_side_learns:
        assert written == [] and torch.equal(model.item_matrix, held)
        return
    next_item_loss.backward()
    assert model.mformer.prefix_map.weight.grad.abs().sum() > 0 and model.suffix_tokens.grad.abs().sum() > 0
    [items] = written
    next_items = batch[model.POS_ITEM_ID]
    drawn = items[~torch.isin(items, next_items)]  # (this batch was loaded before the model drew cold items)
    assert set(next_items.tolist()) <= set(items.tolist()) and len(items) <= len(set(next_items.tolist())) + 5
    assert len(drawn) > 0 and not model.is_cold_item[drawn].any()  # negatives are drawn among the warm items

    rewritten = (model.item_matrix != held).any(1).nonzero().squeeze(1)
    if item_grad_scores == "matrix":  # the held matrix keeps the written rows
        assert torch.equal(rewritten, items)
        assert torch.allclose(model.item_matrix[items].norm(dim=1), torch.ones(len(items)))
    else:  # the loss ranks the written items alone: the held matrix is the epoch's
        assert len(rewritten) == 0
        model.zero_grad()
        with torch.no_grad():
            rows = F.normalize(Laser.item_embedding(model, items).float(), dim=-1)
            users = model.compared_users(model.user_embedding(None, None)[0])
            expected = F.cross_entropy(users @ model.compared(rows).T / model.tau, torch.searchsorted(items, next_items))
        assert next_item_loss.item() == pytest.approx(expected.item(), rel=1e-5)


def test_item_grad_negatives_leave_stage2_and_evaluation_alone(tiny, batch):
    model = tiny.build(item_grad_negatives=5, stage1_epochs=0)
    model.begin_stage(FROZEN_ITEMS)
    model.train()
    frozen = model.item_matrix.clone()
    model.calculate_loss(batch)[0].backward()
    assert torch.equal(model.item_matrix, frozen) and model.suffix_tokens.grad is not None


def test_item_grad_negatives_must_be_a_count(tiny):
    with pytest.raises(RecBoleLLMError, match="item_grad_negatives"):
        tiny.build(item_grad_negatives=-1)


def test_a_reloaded_stage2_checkpoint_scores_identically_without_recomputing_items(tiny, monkeypatch):
    model = tiny.build(stage1_epochs=0, stage2_epochs=1)
    events = record_item_matrix_calls(model, monkeypatch)
    trainer = LLMTrainer(model.config, model)
    trainer.fit(tiny.train_data, tiny.valid_data, saved=True)
    # computed once, when stage 2 starts without a stage 1
    assert events == [
        f"begin_stage:{FROZEN_ITEMS}", "compute_item_matrix",
        f"begin_epoch:{FROZEN_ITEMS}", f"begin_evaluation:{FROZEN_ITEMS}",
    ]
    batch = next(iter(tiny.test_data))[0]
    model.eval()
    with torch.no_grad():
        model.begin_evaluation()
        expected = model.full_sort_predict(batch)

    checkpoint = load_checkpoint(trainer.saved_model_file)
    assert checkpoint["stage"] == FROZEN_ITEMS
    assert set(checkpoint["state_dict"]) == set(trainable_state(model)) | {"item_matrix", "item_matrix_is_current"}
    reloaded = tiny.build(stage1_epochs=0, stage2_epochs=1)
    events = record_item_matrix_calls(reloaded, monkeypatch)
    load_model_state(reloaded, checkpoint)
    reloaded.eval()
    with torch.no_grad():
        reloaded.begin_evaluation()
        assert torch.equal(reloaded.full_sort_predict(batch), expected)
    assert events == [f"begin_evaluation:{FROZEN_ITEMS}"]


# ---- End to end --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "ablation",
    [
        {},
        {"n_experts": 1},
        {"prefix_mode": "free"},
        {"prefix_mode": "none"},
        {"stage1_epochs": 0},
        {"stage2_epochs": 0},
        {"cf_model": "BERT4Rec"},
        {"embedding_head": "none", "center_embeddings": False},  # the paper's scoring (laser_paper.yaml)
        {"deep_prefix": False},  # the paper's input prefix
        {"item_grad_negatives": 3},  # the authors' stage "2-1"
    ],
    ids=lambda ablation: ",".join(f"{k}={v}" for k, v in ablation.items()) or "laser",
)
def test_run_recbole_llm_end_to_end(tiny, tmp_path, ablation):
    cf_checkpoint = cf_checkpoint_of(tiny, ablation.get("cf_model", "SASRec"))
    config_dict = {**tiny.config_dict, "checkpoint_dir": str(tmp_path / "saved"), "cf_checkpoint": cf_checkpoint}
    config_dict.update(ablation)
    result = run_recbole_llm(model="Laser", dataset=TINY_DATASET, config_dict=config_dict)

    assert set(result["test_result"]) >= {"recall@10", "ndcg@10"}
    assert all(0.0 <= value <= 1.0 for value in result["test_result"].values())
    checkpoint = load_checkpoint(result["saved_model_file"])
    saved_names = set(checkpoint["state_dict"])
    trained = {"none": ("suffix_tokens",), "free": ("suffix_tokens", "free_prefix")}.get(
        ablation.get("prefix_mode"), ("suffix_tokens", "mformer.")
    ) + (("embedding_head.",) if ablation.get("embedding_head", "linear") == "linear" else ())
    assert all(name.startswith(trained) for name in saved_names - {"item_matrix", "item_matrix_is_current"})
    assert os.path.getsize(result["saved_model_file"]) < 1_000_000  # tiny-llama: the item matrix is 221 KB
    if not ablation:  # the checkpoint alone rebuilds the run: data, model, stage and trainable weights
        config, model, _, _, _, test_data = load_data_and_model(result["saved_model_file"])
        assert model.stage == checkpoint["stage"] and result["companions"][0]["model"] == "SASRec (CF model of Laser)"
        trainer = get_trainer(config["MODEL_TYPE"], "Laser")(config, model)
        assert trainer.evaluate(test_data, load_best_model=False) == result["test_result"]


def test_the_given_cf_checkpoint_is_read_once(tiny, monkeypatch):
    reads = []

    def counted(path, *args, **kwargs):
        reads.append(path)
        return load_checkpoint(path, *args, **kwargs)

    monkeypatch.setattr("recbole_llm.model.collaborative.load_checkpoint", counted)
    tiny.build()
    assert reads == [tiny.config["cf_checkpoint"]]
