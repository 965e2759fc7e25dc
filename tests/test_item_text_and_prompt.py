"""Item texts from ml-100k-tiny's item features and prompts assembled from their cached token ids."""

import copy
import logging
import string

import pytest
import torch
from recbole.data import create_dataset, data_preparation
from torch import nn
from transformers import LlamaTokenizer

from conftest import TINY_DATASET, tiny_config
from recbole_llm.config import Config
from recbole_llm.errors import RecBoleLLMError
from recbole_llm.llm import load_llm
from recbole_llm.llm.item_text import ItemTextTable, article_first, item_texts, item_texts_from_config, text_settings
from recbole_llm.llm.prompt import PromptAssembler, fit_to_context

HEAD = "You are a recommendation assistant. In chronological order, the user has watched the following movies:"
MARKER = " >> {index}."
TAIL = " The user is"
D = 8


@pytest.fixture(scope="module")
def tokenizer():
    return load_llm("tiny-llama").tokenizer


@pytest.fixture(scope="module")
def dataset_and_batch(tmp_path_factory):
    settings = tiny_config(tmp_path_factory.mktemp("item_text"), MAX_ITEM_LIST_LENGTH=20, max_item_tokens=24)
    config = Config(model="Laser", dataset=TINY_DATASET, config_dict=settings)
    dataset = create_dataset(config)
    train, _, _ = data_preparation(config, dataset)
    return config, dataset, next(iter(train))


@pytest.fixture(scope="module")
def item_text(dataset_and_batch, tokenizer):
    config, dataset, _ = dataset_and_batch
    return ItemTextTable.from_config(config, item_texts_from_config(config, dataset), tokenizer)


@pytest.fixture(scope="module")
def histories(dataset_and_batch):
    """Three training histories of different lengths: the shortest, a middle one and the longest of the batch."""
    batch = dataset_and_batch[2]
    lengths = batch["item_length"]
    rows = [int(lengths.argmin()), int((lengths - lengths.float().median()).abs().argmin()), int(lengths.argmax())]
    assert len(set(lengths[rows].tolist())) == 3
    return batch["item_id_list"][rows], lengths[rows]


@pytest.fixture(scope="module")
def embed(tokenizer):
    torch.manual_seed(0)
    return nn.Embedding(len(tokenizer), D)


def make_assembler(item_text, tokenizer, separator="", max_prompt_items=50, **kwargs):
    return PromptAssembler(item_text, tokenizer, HEAD, MARKER, separator, TAIL, max_prompt_items, **kwargs)


def expected_text(item_text, items, separator=""):
    """The prompt as one string: what the cached pieces must tokenize to."""
    written = [MARKER.format(index=k) + " " + item_text.texts[item] for k, item in enumerate(items, start=1)]
    return HEAD + separator.join(written) + TAIL


def ids_of(tokenizer, text):
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def real_ids(prompt, row):
    return prompt.input_ids[row][prompt.attention_mask[row].bool()].tolist()


def history(item_seq, item_len, row):
    return item_seq[row, : item_len[row]].tolist()


def contains_run(sequence, run):
    return any(sequence[i : i + len(run)] == run for i in range(len(sequence) - len(run) + 1))


# --- item text ---------------------------------------------------------------------------------------------------


def test_item_texts_are_titles_and_years(dataset_and_batch, item_text):
    dataset = dataset_and_batch[1]
    assert item_text.texts[dataset.token2id("item_id", "1")] == "Toy Story (1995)"
    assert item_text.texts[dataset.token2id("item_id", "2")] == "GoldenEye (1995)"
    assert len(item_text.texts) == dataset.item_num == len(item_text.token_ids) == len(item_text.lengths)


def test_padding_item_has_no_text(item_text, tokenizer):
    assert item_text.texts[0] == ""
    assert item_text.lengths[0] == 0
    assert (item_text.token_ids[0] == tokenizer.pad_token_id).all()


def test_item_ids_are_the_tokenization_with_a_leading_space(dataset_and_batch, item_text, tokenizer):
    item = dataset_and_batch[1].token2id("item_id", "1")
    expected = ids_of(tokenizer, " " + item_text.texts[item])
    assert item_text.lengths[item] == len(expected)
    assert item_text.token_ids[item, : len(expected)].tolist() == expected
    assert (item_text.token_ids[item, len(expected) :] == tokenizer.pad_token_id).all()


def test_long_texts_are_truncated(dataset_and_batch, tokenizer):
    table = ItemTextTable(item_texts(dataset_and_batch[1], ["movie_title", "class"], "{movie_title} {class}"), tokenizer, 4)
    assert table.token_ids.shape[1] == 4 and table.lengths.max() == 4


def test_unknown_field_names_the_existing_ones(dataset_and_batch, tokenizer):
    with pytest.raises(RecBoleLLMError) as error:
        item_texts(dataset_and_batch[1], ["brand"], "{brand}")
    message = str(error.value)
    assert "movie_title, release_year, class" in message and "item_text_fields" in message and "\n" not in message


def test_items_without_text_are_an_error_or_written_as_their_id(dataset_and_batch, tokenizer, caplog):
    dataset = copy.copy(dataset_and_batch[1])
    dataset.item_feat = copy.deepcopy(dataset.item_feat)
    for field in ["movie_title", "release_year"]:
        dataset.item_feat[field][[3, 4]] = 0  # RecBole's padding id: the feature row is missing
    fields, template = ["movie_title", "release_year"], "{movie_title} ({release_year})"
    ids = [dataset.id2token("item_id", item) for item in (3, 4)]
    with pytest.raises(RecBoleLLMError) as error:
        item_texts(dataset, fields, template)
    assert f"2 of {dataset.item_num - 1} items have no text in item_text_fields" in str(error.value)
    assert f"(item ids {ids[0]}, {ids[1]})" in str(error.value) and "empty_item_text=id" in str(error.value)

    with caplog.at_level(logging.WARNING):
        table = ItemTextTable(item_texts(dataset, fields, template, empty_item_text="id"), tokenizer, 24)
    assert table.texts[3] == f"item {ids[0]}" and table.texts[4] == f"item {ids[1]}" and table.lengths[3] > 0
    assert table.texts[5] == item_texts(dataset_and_batch[1], fields, template)[5]
    assert [record.message for record in caplog.records] == [
        f"2 of {dataset.item_num - 1} items have no text in item_text_fields {fields}: written as 'item <id>', "
        f"e.g. 'item {ids[0]}'"
    ]


def test_a_title_only_item_without_a_title_is_written_from_its_other_fields(dataset_and_batch, caplog):
    config, dataset, _ = dataset_and_batch
    dataset = copy.copy(dataset)
    dataset.item_feat = copy.deepcopy(dataset.item_feat)
    dataset.item_feat["movie_title"][[3, 4]] = 0  # no title; the year is there
    with caplog.at_level(logging.WARNING):
        titles = item_texts_from_config(config, dataset, title_only=True)
    years = [dataset.id2token("release_year", int(dataset.item_feat["release_year"][item])) for item in (3, 4)]
    assert titles[3:5] == [f"({years[0]})", f"({years[1]})"]  # the whole item text: "{movie_title} ({release_year})"
    assert titles[5] == item_texts_from_config(config, dataset_and_batch[1], title_only=True)[5]  # a title
    assert f"2 of {dataset.item_num - 1} items have no text in movie_title, the title" in caplog.text


@pytest.mark.parametrize("template", ["{movie_title} ({genre})", "a movie"])
def test_template_must_use_the_fields(dataset_and_batch, tokenizer, template):
    with pytest.raises(RecBoleLLMError, match="item_text_template"):
        item_texts(dataset_and_batch[1], ["movie_title"], template)


def test_without_a_template_the_fields_are_joined_and_a_title_is_the_first_field(dataset_and_batch):
    config, dataset, _ = dataset_and_batch
    fields = {"item_text_fields": ["movie_title", "release_year"], "item_text_template": None}
    assert text_settings(fields) == (["movie_title", "release_year"], "{movie_title} {release_year}")
    assert text_settings(config, title_only=True) == (["movie_title"], "{movie_title}")
    toy_story = dataset.token2id("item_id", "1")
    assert item_texts_from_config(config, dataset, title_only=True)[toy_story] == "Toy Story"
    with pytest.raises(RecBoleLLMError, match="item_text_fields is not set"):
        text_settings({"item_text_fields": None})


def test_trailing_articles_are_written_first_when_title_articles_names_them(dataset_and_batch):
    config, dataset, _ = dataset_and_batch
    usual_suspects, toy_story = dataset.token2id("item_id", "12"), dataset.token2id("item_id", "1")
    assert item_texts_from_config(config, dataset)[usual_suspects] == "Usual Suspects, The (1995)"  # as stored
    fields, template = ["movie_title", "release_year"], "{movie_title} ({release_year})"
    texts = item_texts(dataset, fields, template, title_articles=["The", "A"])
    assert texts[usual_suspects] == "The Usual Suspects (1995)" and texts[toy_story] == "Toy Story (1995)"
    assert item_texts(dataset, fields, template, title_articles=["A"])[usual_suspects] == "Usual Suspects, The (1995)"
    # titles that carry their year or an original title: the article moves, what follows the title stays
    assert article_first("Usual Suspects, The (1995)", ["The"]) == "The Usual Suspects (1995)"
    assert article_first("Big Blue, The (Grand bleu, Le)", ["The", "Le"]) == "The Big Blue (Grand bleu, Le)"
    assert article_first("Star Maker, L'", ["L'"]) == "L'Star Maker"
    assert article_first("Die xue shuang xiong (Killer, The)", ["The"]) == "Die xue shuang xiong (Killer, The)"
    assert article_first("Crumb", ["The"]) == "Crumb"


# --- prompt text and padding -------------------------------------------------------------------------------------


@pytest.mark.parametrize("separator", ["", " ;"])
def test_prompt_ids_are_the_tokenization_of_the_whole_text(item_text, tokenizer, histories, embed, separator):
    item_seq, item_len = histories
    prompt = make_assembler(item_text, tokenizer, separator).assemble(item_seq, item_len, embed)
    for row in range(len(item_seq)):
        text = expected_text(item_text, history(item_seq, item_len, row), separator)
        assert real_ids(prompt, row) == ids_of(tokenizer, text)


def test_prompts_are_left_padded_to_the_longest(item_text, tokenizer, histories, embed):
    item_seq, item_len = histories
    prompt = make_assembler(item_text, tokenizer).assemble(item_seq, item_len, embed)
    lengths = [len(ids_of(tokenizer, expected_text(item_text, history(item_seq, item_len, row)))) for row in range(3)]
    assert prompt.attention_mask.sum(1).tolist() == lengths
    assert prompt.input_ids.shape == (3, max(lengths)) and prompt.inputs_embeds.shape == (3, max(lengths), D)
    assert (prompt.attention_mask.diff(dim=1) >= 0).all()  # zeros only on the left
    assert (prompt.input_ids[prompt.attention_mask == 0] == tokenizer.pad_token_id).all()
    for row, length in enumerate(lengths):
        assert prompt.position_ids[row, -length:].tolist() == list(range(length))
    assert torch.equal(prompt.inputs_embeds, embed(prompt.input_ids))


def test_the_target_item_is_never_written(dataset_and_batch, item_text, tokenizer, embed):
    batch = dataset_and_batch[2]
    item_seq, item_len, targets = batch["item_id_list"][:64], batch["item_length"][:64], batch["item_id"][:64]
    prompt = make_assembler(item_text, tokenizer).assemble(item_seq, item_len, embed)
    for row, target in enumerate(targets.tolist()):
        target_ids = item_text.token_ids[target, : item_text.lengths[target]].tolist()
        written = contains_run(real_ids(prompt, row), target_ids)
        assert written == (target in history(item_seq, item_len, row))


def test_long_histories_keep_the_most_recent_items(item_text, tokenizer, histories, embed):
    item_seq, item_len = histories
    prompt = make_assembler(item_text, tokenizer, max_prompt_items=3).assemble(item_seq, item_len, embed)
    for row in range(3):
        recent = history(item_seq, item_len, row)[-3:]
        assert real_ids(prompt, row) == ids_of(tokenizer, expected_text(item_text, recent))


def test_a_llama_tokenizer_gets_its_bos_first_and_a_following_piece_none(dataset_and_batch, histories, item_text,
                                                                         tokenizer):
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, **{c: k + 3 for k, c in enumerate("▁" + string.printable.strip())}}
    llama_tokenizer = LlamaTokenizer(vocab=vocab, merges=[], add_bos_token=True)  # Llama 2/3 write <s> first
    config, dataset, _ = dataset_and_batch
    llama_text = ItemTextTable.from_config(config, item_texts_from_config(config, dataset), llama_tokenizer)
    llama_embed = nn.Embedding(len(llama_tokenizer), D)
    prompt = make_assembler(llama_text, llama_tokenizer, n_prefix=2).assemble(
        *histories, llama_embed, prefix=torch.zeros(3, 2, D)
    )
    first_real = prompt.attention_mask.argmax(1)  # [B] left padding, then the prompt
    assert (prompt.input_ids[torch.arange(3), first_real] == llama_tokenizer.bos_token_id).all()
    assert (prompt.prefix_positions[:, 0] == first_real + 1).all()  # the learned prefix follows the BOS
    assert (prompt.input_ids == llama_tokenizer.bos_token_id).sum() == 3  # once per prompt
    following = make_assembler(llama_text, llama_tokenizer, starts_prompt=False).assemble(*histories, llama_embed)
    assert not (following.input_ids == llama_tokenizer.bos_token_id).any()
    assert len(make_assembler(item_text, tokenizer).bos_ids) == 0  # SmolLM2's tokenizer writes none


def test_an_item_alone_is_a_one_item_history(item_text, tokenizer, embed):
    assembler = make_assembler(item_text, tokenizer)
    items = torch.tensor([1, 2, 3])
    prompt = assembler.assemble(*assembler.item_only(items), embed)
    for row, item in enumerate(items.tolist()):
        assert real_ids(prompt, row) == ids_of(tokenizer, expected_text(item_text, [item]))


def test_longest_prompt_lengths_are_those_of_histories_of_the_longest_text(item_text, tokenizer, embed):
    assembler = make_assembler(item_text, tokenizer, " ;", max_prompt_items=12, n_prefix=3, n_suffix=1, use_slots=True)
    longest_item = int(item_text.lengths.argmax())
    item_seq = torch.full((12, 12), longest_item)  # row n: a history of n + 1 times the item of the longest text
    prompt = assembler.assemble(item_seq, torch.arange(1, 13), embed)
    assert assembler.longest_prompt_lengths().tolist() == prompt.attention_mask.sum(1).tolist()


def test_prompts_are_cut_to_the_context_with_what_follows_them(item_text, tokenizer, caplog):
    pair = [make_assembler(item_text, tokenizer, max_prompt_items=4, use_slots=slots) for slots in (False, True)]
    longest = pair[1].longest_prompt_lengths().tolist()  # the pair's longer one: with slots
    fit_to_context(pair, context_length=1000, llm_name="an LLM", reserved_tokens=10)
    assert [assembler.max_prompt_items for assembler in pair] == [4, 4] and not caplog.records
    with caplog.at_level(logging.WARNING):
        fit_to_context(pair, context_length=longest[1] + 10, llm_name="an LLM", reserved_tokens=10)
    assert [assembler.max_prompt_items for assembler in pair] == [2, 2]
    assert [record.getMessage() for record in caplog.records] == [
        f"prompts of max_prompt_items=4 history items can reach {longest[3] + 10} tokens with the 10 tokens that "
        f"follow it, beyond the {longest[1] + 10} positions of an LLM: each prompt keeps the most recent 2 items of "
        "its history (the oldest are left out); lower max_prompt_items or max_item_tokens to choose yourself"
    ]
    with pytest.raises(RecBoleLLMError, match=f"a prompt of one history item can reach {longest[0] + 10} tokens"):
        fit_to_context(pair, context_length=longest[0] + 9, llm_name="an LLM", reserved_tokens=10)


# --- learned vectors ---------------------------------------------------------------------------------------------


@pytest.fixture
def learned_prompt(item_text, tokenizer, histories, embed):
    """A prompt of the three histories with 3 prefix vectors, 1 suffix vector and a slot per item, at most 5 items."""
    item_seq, item_len = histories
    torch.manual_seed(1)
    prefix = torch.randn(3, 3, D, requires_grad=True)
    suffix = torch.randn(1, D, requires_grad=True)
    slots = torch.randn(3, item_seq.shape[1], D, requires_grad=True)
    assembler = make_assembler(item_text, tokenizer, max_prompt_items=5, n_prefix=3, n_suffix=1, use_slots=True)
    prompt = assembler.assemble(item_seq, item_len, embed, prefix=prefix, suffix=suffix, slots=slots)
    return prompt, prefix, suffix, slots


def test_prefix_and_suffix_hold_their_vectors(learned_prompt, tokenizer):
    prompt, prefix, suffix, _ = learned_prompt
    first_real = (prompt.attention_mask == 0).sum(1)
    assert prompt.prefix_positions.tolist() == [[start + i for i in range(3)] for start in first_real.tolist()]
    assert (prompt.suffix_positions == prompt.input_ids.shape[1] - 1).all()
    for row in range(3):
        assert torch.equal(prompt.inputs_embeds[row, prompt.prefix_positions[row]], prefix[row])
        assert torch.equal(prompt.inputs_embeds[row, prompt.suffix_positions[row]], suffix)
    assert (prompt.input_ids.gather(1, prompt.prefix_positions) == tokenizer.pad_token_id).all()


def test_slots_follow_their_item_text(learned_prompt, histories, item_text, tokenizer):
    prompt, _, _, slots = learned_prompt
    item_seq, item_len = histories
    for row in range(3):
        n_items = int(item_len[row])
        kept = range(max(0, n_items - 5), n_items)
        dropped = [column for column in range(item_seq.shape[1]) if column not in kept]
        assert (prompt.slot_positions[row, dropped] == -1).all()
        for column in kept:
            position, item = int(prompt.slot_positions[row, column]), int(item_seq[row, column])
            n_text = int(item_text.lengths[item])
            assert torch.equal(prompt.input_ids[row, position - n_text : position], item_text.token_ids[item, :n_text])
            assert prompt.input_ids[row, position] == tokenizer.pad_token_id
            assert torch.equal(prompt.inputs_embeds[row, position], slots[row, column])


def test_text_only_prompt_is_the_learned_one_without_its_learned_positions(item_text, tokenizer, histories, embed):
    item_seq, item_len = histories
    text_only = make_assembler(item_text, tokenizer).assemble(item_seq, item_len, embed)
    learned = make_assembler(item_text, tokenizer, n_prefix=2, n_suffix=1, use_slots=True)
    learned = learned.assemble(item_seq, item_len, embed)
    assert text_only.slot_positions is None and text_only.prefix_positions is None
    assert text_only.suffix_positions is None
    for row in range(3):
        slots = learned.slot_positions[row][learned.slot_positions[row] >= 0]
        positions = torch.cat([learned.prefix_positions[row], slots, learned.suffix_positions[row]]).tolist()
        real = [position for position in range(learned.input_ids.shape[1]) if learned.attention_mask[row, position]]
        without_learned = [int(learned.input_ids[row, position]) for position in real if position not in positions]
        assert without_learned == real_ids(text_only, row)


def test_gradients_reach_the_learned_vectors(learned_prompt, histories):
    prompt, prefix, suffix, slots = learned_prompt
    prompt.inputs_embeds.sum().backward()
    assert (prefix.grad == 1).all() and (suffix.grad == 3).all()
    assert torch.equal(slots.grad[..., 0] == 1, prompt.slot_positions >= 0)
