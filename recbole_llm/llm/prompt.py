"""LLM inputs for a batch of histories, assembled from cached token ids with tensor code: nothing is tokenized per
batch and nothing loops over users or items."""

import logging
from dataclasses import dataclass

import torch
from torch import nn

from recbole_llm.errors import RecBoleLLMError
from recbole_llm.llm.item_text import ItemTextTable


@dataclass
class Prompt:
    """A left-padded batch of prompts; learned vectors sit at the `*_positions` (pad ids in `input_ids` there)."""

    inputs_embeds: torch.Tensor  # [B, T, d]
    attention_mask: torch.LongTensor  # [B, T], 0 on the left padding
    input_ids: torch.LongTensor  # [B, T]
    prefix_positions: torch.LongTensor | None  # [B, n_prefix]
    suffix_positions: torch.LongTensor | None  # [B, n_suffix]
    slot_positions: torch.LongTensor | None  # [B, L], aligned with item_seq; -1 where no item is written
    position_ids: torch.LongTensor  # [B, T], 0 at the first real token


class PromptAssembler(nn.Module):
    """Writes each history, oldest first, as

    `[pad ...] [bos] [prefix] head  marker(1) text(1) [slot] separator  marker(2) text(2) [slot] ...  tail [suffix]`

    keeping the most recent `max_prompt_items` items, numbered 1..n in that window (the item marker holds {index}
    once: the models check their settings). The separator goes between items, not after the last. `bos` is the
    token the tokenizer itself writes first (Llama's; SmolLM2's and Qwen's write none), before the learned prefix: the
    LLM was trained with it there; a piece that follows another prompt (`starts_prompt=False`: RSLLM's candidate list)
    has none. A module only so that `.to(device)` moves the cached ids.
    """

    def __init__(
        self,
        item_text: ItemTextTable,
        tokenizer,
        head: str,
        item_marker: str,
        item_separator: str,
        tail: str,
        max_prompt_items: int,
        n_prefix: int = 0,
        n_suffix: int = 0,
        use_slots: bool = False,
        starts_prompt: bool = True,
    ):
        super().__init__()
        self.max_prompt_items, self.n_prefix, self.n_suffix = max_prompt_items, n_prefix, n_suffix
        self.use_slots = use_slots
        self.pad_token_id = item_text.pad_token_id

        texts = [head, item_separator, tail] + [item_marker.format(index=k) for k in range(1, max_prompt_items + 1)]
        head_ids, separator_ids, tail_ids, *markers = tokenizer(texts, add_special_tokens=False)["input_ids"]
        bos_ids = [i for i in tokenizer("", add_special_tokens=True)["input_ids"] if i == tokenizer.bos_token_id]
        bos_ids = bos_ids if starts_prompt else []
        marker_lengths = torch.tensor([len(ids) for ids in markers])  # [P]
        marker_ids = torch.full((max_prompt_items, int(marker_lengths.max())), self.pad_token_id)  # [P, M]
        for k, ids in enumerate(markers):
            marker_ids[k, : len(ids)] = torch.tensor(ids)
        marker_valid = torch.arange(marker_ids.shape[1]) < marker_lengths[:, None]  # [P, M]
        item_token_valid = torch.arange(item_text.token_ids.shape[1]) < item_text.lengths[:, None]  # [n_items, Ti]
        self.slot_offset = marker_ids.shape[1] + item_text.token_ids.shape[1]  # the slot follows marker and text

        for name, tensor in [
            ("bos_ids", torch.tensor(bos_ids, dtype=torch.long)),  # [0 or 1]
            ("head_ids", torch.tensor(head_ids, dtype=torch.long)),  # [H]
            ("separator_ids", torch.tensor(separator_ids, dtype=torch.long)),  # [Sp]
            ("tail_ids", torch.tensor(tail_ids, dtype=torch.long)),  # [Tl]
            ("marker_ids", marker_ids),
            ("marker_valid", marker_valid),
            ("item_token_ids", item_text.token_ids),  # [n_items, Ti]
            ("item_token_valid", item_token_valid),
        ]:
            self.register_buffer(name, tensor, persistent=False)

    def longest_prompt_lengths(self) -> torch.LongTensor:
        """The token count of the longest prompt possible with 1, 2, ..., max_prompt_items history items: [P]."""
        n_items = torch.arange(1, self.max_prompt_items + 1)
        longest_text = int(self.item_token_valid.sum(1).max())
        per_item = self.marker_valid[: self.max_prompt_items].sum(1).cpu() + longest_text + int(self.use_slots)  # [P]
        fixed = len(self.bos_ids) + self.n_prefix + len(self.head_ids) + len(self.tail_ids) + self.n_suffix
        return fixed + per_item.cumsum(0) + (n_items - 1) * len(self.separator_ids)

    def item_only(self, items: torch.LongTensor) -> tuple[torch.LongTensor, torch.LongTensor]:
        """Items [N] as one-item histories (item_seq [N, 1], item_len [N]), to write an item with the user template."""
        return items[:, None], torch.ones_like(items)

    def assemble(
        self,
        item_seq: torch.LongTensor,
        item_len: torch.LongTensor,
        embed: nn.Embedding,
        prefix: torch.Tensor | None = None,
        suffix: torch.Tensor | None = None,
        slots: torch.Tensor | None = None,
    ) -> Prompt:
        """Prompts for histories item_seq [B, L] (right-padded, oldest first) of lengths item_len [B].

        prefix [B, n_prefix, d], suffix [n_suffix, d] or [B, n_suffix, d] and slots [B, L, d] (the vector of the
        item at item_seq[b, k]) replace the input embeddings at their positions.
        """
        self._check_vectors(prefix, suffix, slots)
        device = item_seq.device
        batch_size, max_len = item_seq.shape
        n_kept = item_len.clamp(max=self.max_prompt_items)  # [B]
        # sized by shapes, not by n_kept's values: no host sync (the few unused entries are masked out)
        window = torch.arange(min(self.max_prompt_items, max_len), device=device)  # [W]
        kept = window < n_kept[:, None]  # [B, W]
        columns = (item_len - n_kept)[:, None] + window  # [B, W] column in item_seq of the w-th kept item
        items = item_seq.gather(1, columns.clamp(max=max_len - 1)).masked_fill(~kept, 0)  # [B, W]
        segment_ids, segment_valid = self._segments(items, kept, n_kept)  # [B, W, S]

        # Left padding: every row ends at T, the longest prompt of the batch, so short histories pay nothing extra.
        n_bos = len(self.bos_ids)
        n_before, n_after = n_bos + self.n_prefix + len(self.head_ids), len(self.tail_ids) + self.n_suffix
        history_ids, history_valid = segment_ids.flatten(1), segment_valid.flatten(1)  # [B, W*S]
        lengths = n_before + history_valid.sum(1) + n_after  # [B]
        prompt_len = int(lengths.max())  # the one host sync: the padded length is a shape
        start = prompt_len - lengths  # [B] first real position
        # each real history token goes right after the real ones before it; the others to a column cut off below
        destination = torch.where(history_valid, start[:, None] + n_before + history_valid.cumsum(1) - 1, prompt_len)
        head_positions = start[:, None] + n_bos + self.n_prefix + torch.arange(len(self.head_ids), device=device)  # [B, H]
        input_ids = item_seq.new_full((batch_size, prompt_len + 1), self.pad_token_id)
        input_ids.scatter_(1, destination, history_ids)
        input_ids.scatter_(1, head_positions, self.head_ids.expand(batch_size, -1))
        input_ids.scatter_(1, start[:, None] + torch.arange(n_bos, device=device), self.bos_ids.expand(batch_size, -1))
        input_ids[:, prompt_len - n_after : prompt_len - self.n_suffix] = self.tail_ids
        input_ids = input_ids[:, :prompt_len]  # [B, T]
        attention_mask = (torch.arange(prompt_len, device=device) >= start[:, None]).long()  # [B, T]

        prefix_positions = start[:, None] + n_bos + torch.arange(self.n_prefix, device=device)  # [B, n_prefix]
        suffix_positions = torch.arange(prompt_len - self.n_suffix, prompt_len, device=device).expand(batch_size, -1)
        slot_positions = None
        if self.use_slots:
            slot_in_history = window * segment_ids.shape[2] + self.slot_offset  # [W] slot index in history_ids
            slot_destination = destination[:, slot_in_history].masked_fill(~kept, -1)  # [B, W]
            slot_positions = item_seq.new_full((batch_size, max_len + 1), -1)
            slot_positions.scatter_(1, columns.masked_fill(~kept, max_len), slot_destination)
            slot_positions = slot_positions[:, :max_len]  # [B, L]

        rows = torch.arange(batch_size, device=device)[:, None]
        learned = [  # (rows [B, n], positions [B, n], vectors [B, n, d]); prefix and suffix sit in every prompt
            (rows.expand_as(positions), positions, vectors.expand(batch_size, -1, -1))
            for positions, vectors in [(prefix_positions, prefix), (suffix_positions, suffix)]
            if vectors is not None
        ]
        if slots is not None:  # slots only of the items written: a history shorter than the window has fewer
            written = slot_positions >= 0
            learned.append((rows.expand_as(written)[written], slot_positions[written], slots[written]))
        return Prompt(
            inputs_embeds=_embed_with(embed(input_ids), learned),
            attention_mask=attention_mask,
            input_ids=input_ids,
            prefix_positions=prefix_positions if self.n_prefix else None,
            suffix_positions=suffix_positions if self.n_suffix else None,
            slot_positions=slot_positions,
            position_ids=(attention_mask.cumsum(1) - 1).clamp(min=0),
        )

    def _segments(self, items, kept, n_kept):
        """Per kept item the ids of its marker, text, slot and separator [B, W, S], and which of them are real."""
        batch_size, n_window = items.shape
        marker_ids = self.marker_ids[:n_window].expand(batch_size, -1, -1)  # [B, W, M]
        marker_valid = self.marker_valid[:n_window] & kept[..., None]
        slot_ids = items.new_full((batch_size, n_window, int(self.use_slots)), self.pad_token_id)  # [B, W, 0 or 1]
        slot_valid = kept[..., None].expand_as(slot_ids)
        separator_ids = self.separator_ids.expand(batch_size, n_window, -1)  # [B, W, Sp]
        has_next = torch.arange(n_window, device=items.device) + 1 < n_kept[:, None]  # [B, W]
        separator_valid = has_next[..., None].expand_as(separator_ids)
        segment_ids = torch.cat([marker_ids, self.item_token_ids[items], slot_ids, separator_ids], dim=2)
        segment_valid = torch.cat([marker_valid, self.item_token_valid[items], slot_valid, separator_valid], dim=2)
        return segment_ids, segment_valid

    def _check_vectors(self, prefix, suffix, slots):
        for name, vectors, expected in [("prefix", prefix, self.n_prefix), ("suffix", suffix, self.n_suffix)]:
            if vectors is not None and vectors.shape[-2] != expected:
                raise ValueError(f"{vectors.shape[-2]} {name} vectors given, but the assembler has n_{name}={expected}")
        if slots is not None and not self.use_slots:
            raise ValueError("slots given, but the assembler was built with use_slots=False")


def fit_to_context(assemblers, context_length, llm_name, reserved_tokens=0):
    """Lowers max_prompt_items of assemblers that write the same histories until their longest prompt, plus
    `reserved_tokens` that follow it (an answer), fits the LLM's context: histories then lose their oldest items.
    Warns once when it does; a prompt that cannot fit even one item is an error."""
    if context_length is None:
        return
    lengths = torch.stack([assembler.longest_prompt_lengths() for assembler in assemblers]).amax(0) + reserved_tokens
    asked, kept = len(lengths), int((lengths <= context_length).sum())  # lengths grow with the number of items
    what = f"beyond the {context_length} positions of {llm_name}"
    if kept == 0:
        raise RecBoleLLMError(
            f"a prompt of one history item can reach {int(lengths[0])} tokens{_with(reserved_tokens)}, {what}: "
            "shorten the prompt template or lower max_item_tokens (or n_query, n_candidates)"
        )
    if kept < asked:
        logging.getLogger().warning(
            f"prompts of max_prompt_items={asked} history items can reach {int(lengths[-1])} tokens"
            f"{_with(reserved_tokens)}, {what}: each prompt keeps the most recent {kept} items of its history "
            "(the oldest are left out); lower max_prompt_items or max_item_tokens to choose yourself"
        )
        for assembler in assemblers:
            assembler.max_prompt_items = kept


def _with(reserved_tokens):
    return f" with the {reserved_tokens} tokens that follow it" if reserved_tokens else ""


def _embed_with(inputs_embeds, learned):
    """inputs_embeds [B, T, d] with each (rows, positions, vectors [..., d]) triple written in one go.

    In place: the embedding lookup keeps only the ids for its backward, and a copy of [B, T, d] would double memory.
    """
    if not learned:
        return inputs_embeds
    rows = torch.cat([rows.flatten() for rows, _, _ in learned])  # [n_learned]
    positions = torch.cat([positions.flatten() for _, positions, _ in learned])  # [n_learned]
    vectors = torch.cat([vectors.reshape(-1, vectors.shape[-1]) for _, _, vectors in learned])  # [n_learned, d]
    vectors = vectors.to(inputs_embeds.dtype)
    if inputs_embeds.is_leaf and inputs_embeds.requires_grad:  # an input-grad hook (checkpointing) made it a leaf
        return inputs_embeds.index_put((rows, positions), vectors)
    return inputs_embeds.index_put_((rows, positions), vectors)
