"""RSLLM: recommendation as a new language in a large model (arXiv 2412.16933), as DESIGN.md §6 specifies it.

A frozen CF model's item ID embeddings are projected into the LLM's input space and written into the prompt beside
each item's title (the unified prompt), so the user's behaviour reads as a language of its own. The LLM is tuned
with LoRA on a language-modeling loss (write the next item's title) plus two InfoNCE losses: user state vs. next
item, and projected ID vs. title. As LLaRA trains, a training prompt lists candidates (the next item among others)
after the history, and the LM loss teaches the LLM to answer with the next item's title; beyond the paper, L_rank
(rank_candidates) ranks the next item's title above listed ones by their likelihood as the answer, or teaches the CF
model's ranking of them (rank_target). Stage 1 trains on text-only prompts, stage 2 on unified prompts. The model
ranks all items with its user state against an item tower (RecBole's full ranking), and picks one of 20 candidates by
writing its title (LLaRA's protocol, recbole_llm.candidate_evaluation).
"""

import copy
from dataclasses import dataclass
from logging import getLogger

import torch
import torch.nn.functional as F
from peft import LoraConfig, get_peft_model
from peft.tuners.lora import LoraLayer
from torch import nn
from transformers.modeling_layers import GradientCheckpointingLayer

from recbole_llm.errors import RecBoleLLMError, is_int, is_number, require
from recbole_llm.llm.backbone import (
    blockwise_attention_mask, cut_layers, decoder_cache_argument, last_hidden_states, llm_from_config,
)
from recbole_llm.llm.item_text import ItemTextTable, item_texts_from_config, template_fields
from recbole_llm.llm.prompt import Prompt, PromptAssembler, fit_to_context
from recbole_llm.model.abstract_recommender import LLMSequentialRecommender, TrainingStage, count_parameters
from recbole_llm.model.candidates import sample_candidates
from recbole_llm.model.collaborative import CollaborativeEncoder
from recbole_llm.model.layers import Projector

TEXT_ONLY, UNIFIED = "text_only", "unified"  # the two stages, and the two kinds of prompt they train on
IGNORED = -100  # cross_entropy's ignore_index: label of every position that is not scored


class RSLLM(LLMSequentialRecommender):
    """RSLLM over a frozen LLM (``llm_path``, tuned with LoRA) and a frozen CF encoder (``cf_model``); see
    properties/model/RSLLM.yaml."""

    def __init__(self, config, dataset):
        super().__init__(config, dataset)
        item_texts = item_texts_from_config(config, dataset, title_only=config["item_title_only"])
        user_head, user_tail = template_parts(config, "prompt_template", "history")
        item_head, item_tail = template_parts(config, "item_prompt_template", "item")
        listing_head, listing_tail = template_parts(config, "candidate_template", "candidates")
        self.alpha, self.beta, self.tau = config["alpha"], config["beta"], config["tau"]
        self.rank_candidates, self.gamma = config["rank_candidates"], config["gamma"]
        self.rank_target, self.rank_per_token = config["rank_target"], config["rank_per_token"]
        self.n_candidates, self.candidate_share = config["n_candidates"], config["candidate_train_share"]
        self.slot_gate_lr, self.center_states = config["slot_gate_lr"], config["center_states"]
        self.length_groups = config["length_groups"]
        self.item_tower_frozen = config["item_tower"] == "frozen"
        self.cf_encoder = CollaborativeEncoder(config, dataset)  # first: a misfit checkpoint fails before the LLM loads

        # 3. The LLM, tuned with LoRA; its base weights stay frozen.
        backbone = llm_from_config(config)
        self.tokenizer = backbone.tokenizer
        self.llm = with_lora(backbone.model, config)

        # 2. Prompts: each item as its title followed by one ID slot (unified) or by nothing (text-only); a candidate
        # list follows a user prompt, so the user state at the prompt's end reads the history alone.
        item_text = ItemTextTable.from_config(config, item_texts, self.tokenizer)
        self.user_prompts = self.prompt_pair(config, item_text, user_head, user_tail, config["max_prompt_items"])
        self.item_prompts = self.prompt_pair(config, item_text, item_head, item_tail, 1)
        self.candidate_lists = self.prompt_pair(
            config, item_text, listing_head, listing_tail, self.n_candidates, config["candidate_item_marker"],
            starts_prompt=False,
        )
        self.register_buffer("title_ids", item_text.token_ids, persistent=False)  # [n_items, max_item_tokens]
        titles = [ids[:n] for ids, n in zip(item_text.token_ids.tolist(), item_text.lengths.tolist())]
        self.item_names = [name.strip() for name in self.tokenizer.batch_decode(titles)]  # as the LLM reads them
        self.max_answer_tokens = int(item_text.lengths.max()) + 1  # the longest title and the end token
        self.fit_prompts_to_context(config, backbone)

        # 1. Projector: the frozen CF encoder's item embeddings -> the LLM's input space. The ID slots enter the
        # prompts through a learned gate: open (1, the paper's prompts) or closed (0: stage 2 starts from stage 1's
        # function, but for the attention the empty slots draw); L_id_text trains the projector from its first step.
        self.projector = Projector(self.cf_encoder.hidden_size, backbone.hidden_size)
        self.slot_gate = nn.Parameter(torch.tensor(float(config["slot_gate_init"])))

        # 4. Heads: LLM states -> the user/item space of L_user_item, and a title's state -> the projected-ID space.
        self.state_head = nn.Linear(backbone.hidden_size, backbone.hidden_size)
        self.title_head = nn.Linear(backbone.hidden_size, backbone.hidden_size)

        # 6a. The item matrix of full ranking: the item tower of every item, once per evaluation.
        self.register_item_matrix(backbone.hidden_size, item_text.lengths)
        self.set_stage(TEXT_ONLY)  # usable before any training stage ran, e.g. right after loading a checkpoint
        lora_parameters, _ = count_parameters(self.llm)
        getLogger().info(f"RSLLM: LoRA adapters with {lora_parameters:,} parameters on {config['lora_target_modules']}")

    @classmethod
    def check_settings(cls, config, dataset):
        super().check_settings(config, dataset)
        require(config, "lora_r", is_int(config["lora_r"]) and config["lora_r"] > 0,
                "it must be a positive integer (the LoRA rank)")
        require(config, "lora_alpha", is_number(config["lora_alpha"]) and config["lora_alpha"] > 0,
                "it must be positive")
        dropout = config["lora_dropout"]
        require(config, "lora_dropout", is_number(dropout) and 0 <= dropout < 1, "it must be in [0, 1)")
        require(config, "lora_target_modules", bool(config["lora_target_modules"]),
                "name LLM modules, e.g. [q_proj, v_proj]")
        for key in ("alpha", "beta", "gamma"):
            require(config, key, is_number(config[key]) and config[key] >= 0, "it must be a loss weight >= 0")
        require(config, "tau", is_number(config["tau"]) and config["tau"] > 0, "it must be a positive temperature")
        require(config, "slot_gate_lr", is_number(config["slot_gate_lr"]) and config["slot_gate_lr"] > 0,
                "it must be a positive learning rate")
        require(config, "slot_gate_init", is_number(config["slot_gate_init"]),
                "it must be a number: 1 lets the ID slots in whole from stage 2's start, 0 keeps them out")
        require(config, "item_tower", config["item_tower"] in ("trained", "frozen"), "use trained (the paper) or frozen")
        require(config, "center_states", isinstance(config["center_states"], bool), "it must be True or False")
        require(config, "n_candidates", is_int(config["n_candidates"]) and config["n_candidates"] >= 2,
                "it must be an integer >= 2")
        users = config["n_candidate_users"]
        require(config, "n_candidate_users", users is None or is_int(users) and users > 0,
                "it must be a positive integer, or None for every test user")
        require(config, "length_groups", is_int(config["length_groups"]) and config["length_groups"] > 0,
                "it must be a positive integer: 1 runs each training batch as one padded pass")
        share = config["candidate_train_share"]
        require(config, "candidate_train_share", is_number(share) and 0 <= share <= 1, "it must be a share in [0, 1]")
        ranked = config["rank_candidates"]
        require(config, "rank_candidates", is_int(ranked) and (ranked == 0 or 2 <= ranked <= config["n_candidates"]),
                f"it must be 0 (no L_rank) or an integer in [2, n_candidates = {config['n_candidates']}]")
        require(config, "rank_candidates", ranked == 0 or share > 0,
                "L_rank ranks the candidates a training prompt lists: set candidate_train_share > 0, or 0 here")
        require(config, "rank_target", config["rank_target"] in ("next_item", "cf_model"),
                "use next_item (the next item's cross-entropy) or cf_model (the CF model's softmax over the answers)")
        require(config, "rank_per_token", isinstance(config["rank_per_token"], bool), "it must be True or False")
        template_parts(config, "prompt_template", "history")
        template_parts(config, "item_prompt_template", "item")
        template_parts(config, "candidate_template", "candidates")
        marker = config["candidate_item_marker"]
        require(config, "candidate_item_marker", isinstance(marker, str) and set(template_fields(marker)) <= {"index"},
                "it must be a string, with no placeholder but {index}: e.g. '' or ' {index}.'")

    @classmethod
    def reads_cf_model(cls, config):
        return True

    def prompt_pair(self, config, item_text, head, tail, max_items, item_marker=None, starts_prompt=True):
        """The text-only and the unified assembler of one template: the same words, without and with ID slots; items
        marked with prompt_item_marker unless item_marker is given."""
        return nn.ModuleDict({
            stage: PromptAssembler(
                item_text,
                self.tokenizer,
                head=head,
                item_marker=config["prompt_item_marker"] if item_marker is None else item_marker,
                item_separator=config["prompt_item_separator"],
                tail=tail,
                max_prompt_items=max_items,
                use_slots=stage == UNIFIED,
                starts_prompt=starts_prompt,
            )
            for stage in (TEXT_ONLY, UNIFIED)
        })

    def fit_prompts_to_context(self, config, backbone):
        """Long histories lose their oldest items where a prompt and what follows it (a candidate list where there
        is one, then the answer) would not fit the context."""
        context, name = backbone.context_length(), backbone.name
        lists_candidates = config["candidate_eval"] or self.candidate_share > 0
        listing = max(int(prompt.longest_prompt_lengths()[-1]) for prompt in self.candidate_lists.values())
        reserved = self.max_answer_tokens + (listing if lists_candidates else 0)
        fit_to_context(self.user_prompts.values(), context, name, reserved_tokens=reserved)
        fit_to_context(self.item_prompts.values(), context, name)

    def frozen_modules(self):
        return [self.cf_encoder, self.llm]  # the LLM's LoRA weights require grad, so checkpoints keep them

    def optimizer_groups(self):
        """The slot gate learns at slot_gate_lr: at the run's learning rate, Adam's ~lr a step would open it from 0
        to ~0.004 in a 20-step stage, and the ID slots would never enter the prompts."""
        trainable = [weight for weight in self.parameters() if weight.requires_grad and weight is not self.slot_gate]
        gate = [self.slot_gate] if self.slot_gate.requires_grad else []
        return [{"params": trainable}, {"params": gate, "lr": self.slot_gate_lr}]

    def train(self, mode=True):
        super().train(mode)  # the LLM, a frozen module, is now in eval mode ...
        for module in self.llm.modules():
            if isinstance(module, LoraLayer):
                module.lora_dropout.train(mode)  # ... but its LoRA adapters train, with their dropout
            if isinstance(module, GradientCheckpointingLayer) and module.gradient_checkpointing:
                module.training = mode  # transformers recomputes a layer's activations only in training mode
        return self

    # ---- The LLM's pieces: input embeddings, decoder, LM head ------------------------------------------------

    def input_embeddings(self):
        return self.llm.get_input_embeddings()

    def decoder(self):
        return self.llm.get_base_model().get_decoder()

    def last_hidden_states(self, inputs_embeds, attention_mask, position_ids):
        """The decoder's last-layer states [B, T, d_llm], without the LM head's vocabulary logits."""
        return last_hidden_states(self.decoder(), inputs_embeds, attention_mask, position_ids)

    def prompt_state(self, prompt):
        """The LLM's state at the last prompt position [B, d_llm] (prompts are left-padded, so column -1)."""
        return self.last_hidden_states(prompt.inputs_embeds, prompt.attention_mask, prompt.position_ids)[:, -1].float()

    # ---- 1. + 2. Projected IDs in the prompts ------------------------------------------------------------------

    def id_slots(self, item_seq, stage):
        """The projected ID embedding of every item of item_seq [B, L] -> [B, L, d_llm]; None for text-only prompts."""
        if stage == TEXT_ONLY:
            return None
        return self.slot_gate * self.projector(self.cf_encoder.item_embeddings[item_seq])

    def user_prompt(self, item_seq, item_len):
        """The stage's prompt of each history: titles, with ID slots in the unified stage."""
        return self.user_prompts[self.stage].assemble(
            item_seq, item_len, self.input_embeddings(), slots=self.id_slots(item_seq, self.stage)
        )

    def item_states(self, items, stage):
        """The LLM's state of each item [N, d_llm], written alone as `<title> [ITEM]` (unified) or `<title>`."""
        item_seq, item_len = self.item_prompts[stage].item_only(items)  # [N, 1], [N]
        slots = self.id_slots(item_seq, stage)
        prompt = self.item_prompts[stage].assemble(item_seq, item_len, self.input_embeddings(), slots=slots)
        return self.prompt_state(prompt)

    def item_embedding(self, items):
        """The item tower [N, d_llm], which user states are scored against: the stage's item prompt -> state head."""
        return self.state_head(self.item_states(items, self.stage))

    # ---- 4. Losses: L = L_lm + alpha * L_user_item + beta * L_id_text (+ gamma * L_rank) -------------------------

    def calculate_loss(self, interaction):
        """(L_lm, alpha * L_user_item) in stage 1; (L_lm, alpha * L_user_item, beta * L_id_text) in stage 2; with
        rank_candidates, gamma * L_rank last in both."""
        self.item_matrix_outdated()  # an optimizer step follows
        item_seq, item_len = interaction[self.ITEM_SEQ], interaction[self.ITEM_SEQ_LEN]
        next_items = interaction[self.POS_ITEM_ID]  # [B]
        prompt, user_positions, answers, listed = self.training_prompt(item_seq, item_len, next_items)
        lm_loss, user_prompt_states, answer_log_likelihoods = self.answered(prompt, answers, user_positions)
        ranking = (self.gamma * self.ranking_loss(item_seq, item_len, answers, answer_log_likelihoods, listed),) \
            if self.rank_candidates else ()
        user_states = self.state_head(user_prompt_states)
        # the keys are the batch's next items: never a cold item (its training rows are gone), and the candidate lists
        # of training prompts leave them out, so no loss of RSLLM has a cold item among its candidates
        # (abstract_recommender: without_cold_items)
        items, next_index = torch.unique(next_items, return_inverse=True)  # a repeated target is one key, no negative
        if self.item_tower_frozen:  # every item, as the held item matrix writes it
            scores = self.without_cold_items(self.scores(self.compared(user_states)))
            user_item_loss = F.cross_entropy(scores, next_items)
        else:  # the batch's next items, written by the item tower now
            keys = self.compared(self.item_embedding(items))
            user_item_loss = info_nce(self.compared(user_states), keys, next_index, self.tau)
        if self.stage == TEXT_ONLY:
            return lm_loss, self.alpha * user_item_loss, *ranking

        projected_ids = self.projector(self.cf_encoder.item_embeddings[items])  # [U, d_llm], before the slot gate
        title_states = self.title_head(self.item_states(items, TEXT_ONLY))  # [U, d_llm]
        id_text_loss = info_nce(projected_ids, title_states, torch.arange(len(items), device=items.device), self.tau)
        return lm_loss, self.alpha * user_item_loss, self.beta * id_text_loss, *ranking

    def ranking_loss(self, item_seq, item_len, answers, answer_log_likelihoods, listed):
        """L_rank over the K answers [B, K] of the listed rows: each answer scored by its log-likelihood, summed or
        per token (rank_per_token: the sum favours short titles), against the next item (rank_target: next_item) or
        the frozen CF model's softmax over the same answers (cf_model: every answer gets the CF model's judgement)."""
        scores = answer_log_likelihoods
        if self.rank_per_token:
            scores = scores / (self.item_text_lengths[answers] + 1)  # the title's tokens and the end token
        targets = None
        if self.rank_target == "cf_model":
            targets = self.cf_encoder.item_scores(item_seq, item_len, answers).float().softmax(-1)
        return rank_loss(scores, listed, targets)

    def training_prompt(self, item_seq, item_len, next_items):
        """Each history's user prompt, followed for a share (candidate_train_share) of them by a list of
        n_candidates candidates: the next item and warm items outside the history, drawn afresh for every batch.
        Returns the prompt, where each user prompt ends [B], the answers to score [B, K] (the next item, then with
        rank_candidates K - 1 of the listed others) and which rows list candidates [B]."""
        prompt = self.user_prompt(item_seq, item_len)
        listed = torch.rand(len(item_seq), device=item_seq.device) < self.candidate_share  # [B] rows that list some
        if not listed.any():
            return prompt, torch.full_like(item_len, prompt.attention_mask.shape[1] - 1), next_items[:, None], listed
        candidates, _ = sample_candidates(  # never a cold item: no loss teaches that it is a wrong answer
            item_seq, next_items, self.n_items, self.n_candidates, excluded=self.is_cold_item
        )
        listing = self.candidate_list(candidates)
        listing.attention_mask[~listed] = 0  # the other rows' lists become padding
        prompt = joined(prompt, listing)
        answers = next_items[:, None]
        if self.rank_candidates:  # the listed order is random, so the first K - 1 others are a uniform draw of them
            others = candidates[candidates != next_items[:, None]].view(len(candidates), -1)  # [B, C - 1]
            answers = torch.cat([answers, others[:, : self.rank_candidates - 1]], dim=1)
        return prompt, prompt.attention_mask.shape[1] - 1 - listing.attention_mask.sum(1), answers, listed

    def candidate_list(self, candidates):
        """The stage's list of candidates [B, C] that follows a user prompt (with ID slots in the unified stage)."""
        return self.candidate_lists[self.stage].assemble(
            candidates, torch.full_like(candidates[:, 0], candidates.shape[1]), self.input_embeddings(),
            slots=self.id_slots(candidates, self.stage),
        )

    def with_answers(self, prompt, answers):
        """The prompt followed by K answers [B, K] side by side, each item's title and the end token in a block of A
        columns that continues the prompt (the same positions in every block). Returns inputs_embeds
        [B, T + K * A, d], attention_mask, position_ids, labels (-100 everywhere but on the answers' tokens), the
        block of each column [T + K * A] (0: the prompt) and the column whose state predicts it (an answer's first
        token: the prompt's last; each other: the one before it)."""
        n_rows, n_answers = answers.shape
        answer_ids, in_answer = self.answer_tokens(answers.reshape(-1))  # [B * K, A]
        answer_length = answer_ids.shape[1]
        answer_ids, in_answer = answer_ids.view(n_rows, -1), in_answer.view(n_rows, -1)  # [B, K * A], block by block
        inputs_embeds = torch.cat([prompt.inputs_embeds, self.input_embeddings()(answer_ids)], dim=1)
        attention_mask = torch.cat([prompt.attention_mask, in_answer.long()], dim=1)
        positions = answer_positions(prompt, answer_length).repeat(1, n_answers)
        position_ids = torch.cat([prompt.position_ids, positions], dim=1)
        prompt_labels = torch.full_like(prompt.attention_mask, IGNORED)
        labels = torch.cat([prompt_labels, answer_ids.masked_fill(~in_answer, IGNORED)], dim=1)
        prompt_length, columns = prompt.attention_mask.shape[1], torch.arange(labels.shape[1], device=labels.device)
        blocks = ((columns - prompt_length).div(answer_length, rounding_mode="floor") + 1).clamp(min=0)
        starts_answer = (columns >= prompt_length) & ((columns - prompt_length) % answer_length == 0)
        predictors = torch.where(starts_answer, prompt_length - 1, columns - 1)
        return inputs_embeds, attention_mask, position_ids, labels, blocks, predictors

    def answer_tokens(self, items):
        """Each item's title and the end token as an answer: ids [N, A] (padded) and which are the answer's [N, A]."""
        answer_length = int(self.item_text_lengths[items].max()) + 1
        title_lengths = self.item_text_lengths[items, None]  # [N, 1]
        answer_ids = F.pad(self.title_ids[items, : answer_length - 1], (0, 1), value=self.tokenizer.pad_token_id)
        answer_ids = answer_ids.scatter(1, title_lengths, self.tokenizer.eos_token_id)  # [N, A] title, end, padding
        return answer_ids, torch.arange(answer_length, device=items.device) <= title_lengths

    def answered(self, prompt, answers, user_positions):
        """The LLM on each training prompt followed by its answers [B, K] (the next item first): L_lm, the mean over
        the next items' answer tokens; the state where each user prompt ends [B, d_llm] (the causal LLM's state there
        ignores the candidates and the answers that follow it); and each answer's log-likelihood [B, K], summed over
        its tokens. The rows run in length_groups groups of similar length, each cut to its own longest row
        (length_groups in RSLLM.yaml says how much padding that saves)."""
        inputs_embeds, attention_mask, position_ids, labels, blocks, predictors = self.with_answers(prompt, answers)
        n_labels = (labels[:, blocks == 1] != IGNORED).sum()
        order = attention_mask.sum(1).argsort()
        groups = order.chunk(self.length_groups)
        first = attention_mask.argmax(1)  # each row's first token (left padding before it) ...
        last = attention_mask.shape[1] - 1 - attention_mask.flip(1).argmax(1)  # ... and its last (answer padding after)
        spans = torch.stack([torch.stack([first[rows].min(), last[rows].max() + 1]) for rows in groups]).tolist()
        log_likelihoods, states = [], []
        for rows, (start, end) in zip(groups, spans):  # one host sync for the groups' spans, above
            mask = attention_mask[rows, start:end]
            if answers.shape[1] > 1:  # answers side by side: each reads the prompt and itself alone
                mask = blockwise_attention_mask(self.decoder(), mask, blocks[start:end], inputs_embeds.dtype)
            hidden = self.last_hidden_states(  # [rows, end - start, d_llm]
                inputs_embeds[rows, start:end], mask, position_ids[rows, start:end]
            )
            token_log_likelihoods = self.label_log_likelihoods(  # [rows, end - start]
                hidden, labels[rows, start:end], predictors[start:end] - start
            )
            answer_columns = F.pad(token_log_likelihoods, (start, labels.shape[1] - end))[:, blocks > 0]
            log_likelihoods.append(answer_columns.view(len(rows), answers.shape[1], -1).sum(-1))  # [rows, K]
            states.append(hidden[torch.arange(len(rows), device=hidden.device), user_positions[rows] - start])
        restored = order.argsort()
        log_likelihoods = torch.cat(log_likelihoods)[restored]
        return -log_likelihoods[:, 0].sum() / n_labels, torch.cat(states)[restored], log_likelihoods

    def label_log_likelihoods(self, hidden, labels, predictors):
        """Each labelled token's log-likelihood [B, T] (0 elsewhere), read from the LLM's state at its predictor
        column; the LM head runs only at the states that predict a label."""
        rows, columns = (labels != IGNORED).nonzero(as_tuple=True)
        logits = self.llm.get_output_embeddings()(hidden[rows, predictors[columns]])  # [n_labelled, vocab]
        token_log_likelihoods = -F.cross_entropy(logits.float().to(labels.device), labels[rows, columns],
                                                 reduction="none")
        return torch.zeros(labels.shape, device=labels.device).index_put((rows, columns), token_log_likelihoods)

    # ---- 5. Two stages: text-only prompts, then unified prompts --------------------------------------------------

    def training_stages(self):
        return [
            TrainingStage(TEXT_ONLY, self.config["stage1_epochs"]),
            TrainingStage(UNIFIED, self.config["stage2_epochs"]),
        ]

    def begin_stage(self, name):
        super().begin_stage(name)
        if self.item_tower_frozen:
            self.refresh_item_matrix()  # once, when training starts: later stages find it current

    def begin_epoch(self, epoch_idx):
        if self.center_states:
            self.refresh_item_matrix()  # the centre of training's scores: the mean item row of this epoch's weights

    def item_matrix_outdated(self):
        if not self.item_tower_frozen:  # frozen: the matrix stays the one user states learn against, in every stage
            super().item_matrix_outdated()

    def set_stage(self, name):
        if name not in (TEXT_ONLY, UNIFIED):
            raise RecBoleLLMError(
                f"RSLLM has no stage '{name}' (its stages: {TEXT_ONLY}, {UNIFIED}): the checkpoint is not RSLLM's"
            )
        if name != self.stage:
            self.item_matrix_outdated()  # the item tower reads the stage's prompts
        super().set_stage(name)
        # text-only prompts have no ID slots and L_id_text is off: projector, slot gate and title head get no update
        for weights in (self.projector, self.slot_gate, self.title_head):
            weights.requires_grad_(name == UNIFIED)

    # ---- 6a. Full ranking: user state . item tower of all items --------------------------------------------------

    def compared(self, states):
        """User or item-tower states [N, d] as scores compare them: unit norm, in fp32; with center_states, the mean
        item row subtracted (the LLM's states share one direction: items' mean pairwise cosine 0.89) and
        renormalised."""
        with torch.autocast(states.device.type, enabled=False):
            unit_rows = F.normalize(states.float(), dim=-1)
            if not self.center_states:
                return unit_rows
            return F.normalize(unit_rows - self.item_matrix[1:].mean(0), dim=-1)

    def user_states(self, interaction):
        """User states [B, d_llm] of the histories of a batch as scores compare them (`compared`)."""
        prompt = self.user_prompt(interaction[self.ITEM_SEQ], interaction[self.ITEM_SEQ_LEN])
        return self.compared(self.state_head(self.prompt_state(prompt)))

    def predict(self, interaction):
        user_states = self.user_states(interaction)
        with torch.autocast(user_states.device.type, enabled=False):  # fp32 scores, as info_nce
            return (user_states * self.compared(self.item_matrix[interaction[self.ITEM_ID]])).sum(-1) / self.tau

    def full_sort_predict(self, interaction):
        return self.scores(self.user_states(interaction))

    def scores(self, user_states):
        """Compared user states [B, d] . every compared item row / tau [B, n_items], in fp32 also under autocast;
        the padding item is never a candidate."""
        with torch.autocast(user_states.device.type, enabled=False):
            scores = user_states @ self.compared(self.item_matrix).T / self.tau
        scores[:, 0] = float("-inf")
        return scores

    # ---- 6b. LLaRA's protocol: pick the next item among candidates by writing its title -------------------------

    @torch.no_grad()
    def read_candidates(self, item_seq, item_len, candidates):
        """Each history's [B, L] user prompt followed by its candidates [B, C], read in one pass of the LLM: the
        greedy answers (LLaRA's protocol), how likely each candidate's title is as the answer (BIGRec's and
        TALLRec's ranking) and the full ranking's scores of the candidates (the user state, where the user prompt
        ends, against the item tower). The answers and the titles continue from the pass's keys and values."""
        user_prompt, listing = self.user_prompt(item_seq, item_len), self.candidate_list(candidates)
        prompt = joined(user_prompt, listing)
        decoder = self.decoder()
        cache_argument = decoder_cache_argument(decoder)
        prompt_output = decoder(inputs_embeds=prompt.inputs_embeds, attention_mask=prompt.attention_mask,
                                position_ids=prompt.position_ids, use_cache=True)
        cache = prompt_output[cache_argument]  # the output names its cache as the argument does
        user_ends = prompt.attention_mask.shape[1] - 1 - listing.attention_mask.sum(1)  # [B]
        users = torch.arange(len(candidates), device=candidates.device)
        user_states = self.compared(self.state_head(prompt_output.last_hidden_state[users, user_ends].float()))
        log_likelihoods, lengths = self.answer_log_likelihoods(prompt, prompt_output.last_hidden_state[:, -1:],
                                                               cache, candidates)
        return CandidateReading(
            answers=self.greedy_answers(prompt, cache),
            log_likelihoods=log_likelihoods,
            lengths=lengths,
            scores=self.scores(user_states).gather(1, candidates),
        )

    def greedy_answers(self, prompt, cache):
        """The greedy answers (strings) to the prompts, generated on from their keys and values (cache), which they
        extend."""
        cache.crop(-1)  # generation computes the prompt's last token again, for its first answer token
        answer_ids = self.llm.generate(
            inputs_embeds=prompt.inputs_embeds,
            attention_mask=prompt.attention_mask,
            max_new_tokens=self.max_answer_tokens,
            do_sample=False,
            eos_token_id=self.tokenizer.eos_token_id,
            pad_token_id=self.tokenizer.pad_token_id,
            **{decoder_cache_argument(self.decoder()): cache},
        )  # [B, <= max_answer_tokens]: only the new tokens, as the prompt was given as embeddings
        return self.tokenizer.batch_decode(answer_ids, skip_special_tokens=True)

    def answer_log_likelihoods(self, prompt, last_prompt_state, cache, candidates):
        """Each candidate's title, then the end token, as the answer to the prompt [B, T] whose keys and values
        (cache) and last state [B, 1, d_llm] are known: the log-likelihood summed over the answer's tokens [B, C] and
        their number [B, C]. One candidate of every user at a time continues from the cache, which is cut back to the
        prompt after each (a copy per candidate would hold C times the prompt's cache: 15 GB for 64 users of
        SmolLM2's 30 layers in fp32). Each user's answers go shortest first, each pass cut to its longest: on
        ml-100k 7.3 tokens a pass for 20 candidates of 64 users, where the longest title of all would make 15-17."""
        n_users, n_candidates = candidates.shape
        prompt_length = cache.get_seq_length()
        answer_ids, in_answer = self.answer_tokens(candidates.reshape(-1))
        answer_ids, in_answer = answer_ids.view(n_users, n_candidates, -1), in_answer.view(n_users, n_candidates, -1)
        lengths = in_answer.sum(-1)  # [B, C]
        by_length = lengths.argsort(dim=1)  # [B, C] pass j answers each user's j-th shortest
        longest = lengths.gather(1, by_length).amax(0).tolist()  # [C] one host sync for every pass's length
        positions = answer_positions(prompt, answer_ids.shape[-1])  # [B, A]
        users = torch.arange(n_users, device=candidates.device)
        decoder = self.decoder()
        cache_argument = decoder_cache_argument(decoder)
        sums = torch.zeros(n_users, n_candidates, device=candidates.device)
        for answering, length in zip(by_length.T, longest):  # [B] each user's candidate of this pass
            ids, answered = answer_ids[users, answering, :length], in_answer[users, answering, :length]  # [B, A']
            answer_states = decoder(
                inputs_embeds=self.input_embeddings()(ids),
                attention_mask=torch.cat([prompt.attention_mask, answered.long()], 1),
                position_ids=positions[:, :length], use_cache=False, **{cache_argument: cache},
            ).last_hidden_state  # [B, A', d_llm]
            answer_tokens = cache.get_seq_length() - prompt_length
            if answer_tokens:  # the answer's keys and values go: the next pass follows the prompt
                cache.crop(-answer_tokens)
            # an answer's first token is predicted where the prompt ends, each other token where the one before it is
            predicting = torch.cat([last_prompt_state, answer_states[:, :-1]], dim=1)
            labels, predictors = ids.masked_fill(~answered, IGNORED), torch.arange(length, device=ids.device)
            sums[users, answering] = self.label_log_likelihoods(predicting, labels, predictors).sum(1)
        return sums, lengths


@dataclass
class CandidateReading:
    """What RSLLM makes of each user's candidates [B, C] (read_candidates)."""

    answers: list  # [B] greedy answers (strings)
    log_likelihoods: torch.Tensor  # [B, C] each title and end token as the answer, summed over its tokens
    lengths: torch.Tensor  # [B, C] their tokens
    scores: torch.Tensor  # [B, C] the full ranking's scores (user state . item tower / tau)


def rank_loss(answer_scores, listed, targets=None):
    """L_rank: the cross-entropy of the answers' scores [B, K] against the next item (column 0), or against targets
    [B, K] (a distribution over each row's answers), over the rows whose prompt listed candidates (listed [B]); 0
    where none did."""
    if answer_scores.shape[1] < 2 or not listed.any():
        return answer_scores.new_zeros(())
    listed_rows = answer_scores[listed]
    if targets is None:  # the next item
        return F.cross_entropy(listed_rows, listed_rows.new_zeros(len(listed_rows), dtype=torch.long))
    return F.cross_entropy(listed_rows, targets[listed])


def info_nce(queries, keys, positives, tau):
    """InfoNCE of queries [N, d] against keys [K, d] by cosine / tau: query n's positive is keys[positives[n]], the
    other keys are its negatives. In fp32 under autocast too: bf16's steps are 0.125 at |logit| ~ 20."""
    with torch.autocast(queries.device.type, enabled=False):
        logits = F.normalize(queries.float(), dim=-1) @ F.normalize(keys.float(), dim=-1).T / tau  # [N, K]
        return F.cross_entropy(logits, positives)


def answer_positions(prompt, answer_length):
    """The positions [B, A] of an answer that follows the prompt."""
    return prompt.position_ids[:, -1:] + 1 + torch.arange(answer_length, device=prompt.position_ids.device)


def joined(first, second):
    """Two left-padded prompts one after the other, padded on the left again so generation continues at the right
    end: a Prompt of inputs_embeds [B, T1 + T2, d], attention_mask and position_ids (no learned positions)."""
    inputs_embeds = torch.cat([first.inputs_embeds, second.inputs_embeds], dim=1)
    attention_mask = torch.cat([first.attention_mask, second.attention_mask], dim=1)
    order = attention_mask.argsort(dim=1, stable=True)  # padding (0) first, then the tokens in their order
    attention_mask = attention_mask.gather(1, order)
    return Prompt(
        inputs_embeds=inputs_embeds.gather(1, order[..., None].expand_as(inputs_embeds)),
        attention_mask=attention_mask,
        input_ids=torch.cat([first.input_ids, second.input_ids], dim=1).gather(1, order),
        prefix_positions=None,
        suffix_positions=None,
        slot_positions=None,
        position_ids=(attention_mask.cumsum(1) - 1).clamp(min=0),
    )


def with_lora(model, config):
    """The shared frozen LLM wrapped with LoRA adapters (peft), cut to its first `llm_layers` blocks when set.
    peft edits the model it wraps, so it wraps a copy of the modules that shares the weight tensors: the cached
    backbone stays whole and adapter-free, and no second copy of the weights is made."""
    shared_tensors = {id(tensor): tensor for tensor in (*model.parameters(), *model.buffers())}
    modules = copy.deepcopy(model, memo=shared_tensors)
    if config["llm_layers"]:
        cut_layers(modules, config["llm_layers"], config["llm_path"])
    target_modules = config["lora_target_modules"]
    lora = LoraConfig(
        r=config["lora_r"],
        lora_alpha=config["lora_alpha"],
        lora_dropout=config["lora_dropout"],
        target_modules=[target_modules] if isinstance(target_modules, str) else list(target_modules),
        task_type="CAUSAL_LM",
    )
    try:
        tuned = get_peft_model(modules, lora)
    except ValueError as error:
        raise RecBoleLLMError(
            f"lora_target_modules {lora.target_modules} do not fit {config['llm_path']}: {' '.join(str(error).split())}"
        ) from None
    # an adapter sits beside its layer: on that layer's GPU, or nowhere ("meta") where llm_device_map offloads it
    offloaded = [name for name, weight in tuned.named_parameters() if weight.requires_grad and weight.is_meta]
    if offloaded:
        raise RecBoleLLMError(
            f"llm_device_map offloads layers that get LoRA adapters to the CPU or disk ({len(offloaded)} adapter "
            f"weights, e.g. {offloaded[0]}): adapters train only on a device that computes; add GPUs to gpu_id"
        )
    return tuned


def template_parts(config, key, *placeholders):
    """The text around the placeholders of a prompt template, which must hold each once and in this order:
    ('A{history}B{candidates}C', history, candidates) -> ['A', 'B', 'C']."""
    template, parts = config[key], []
    rest = template if isinstance(template, str) else ""
    for name in placeholders:
        placeholder = "{" + name + "}"
        if rest.count(placeholder) != 1:
            expected = " then ".join("{" + p + "}" for p in placeholders)
            raise RecBoleLLMError(f"{key} {template!r} must contain {expected}, once each: it says where the items go")
        before, rest = rest.split(placeholder)
        parts.append(before)
    return [*parts, rest]
