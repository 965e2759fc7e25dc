"""Laser: Bi-Tuning with M-Former (arXiv 2409.01605).

A frozen LLM reads each user's history as a prompt, between a learned **prefix** made by the M-Former from a frozen
CF encoder's states and a learned **suffix** token. The LLM's last-layer output at the suffix is the user's
embedding; an item's embedding is the same for the item written as a one-item history. Users score every item by
cosine / tau. Training runs in two stages: (1) the item matrix is recomputed at the start of every epoch while the
user side trains against it (with ``item_grad_negatives``, the batch's next items and sampled ones are written again
with gradient, so the item side trains too: the authors' stage "2-1"), (2) the best item matrix is frozen and
training goes on.

Beyond the paper, for small LLMs whose outputs all point one way (SmolLM2-135M: items' mean pairwise cosine 0.976,
so cosine / tau cannot tell items apart): ``center_embeddings`` compares users and items after subtracting the mean
item row, and ``embedding_head: linear`` maps both through one trainable linear layer (identity at the start), the
one path by which the item side gets gradient (``separate``: one such layer for each side). Input tokens barely
steer so small an LLM (moving the prefix by its own scale turns the output by a cosine of 0.009), so ``deep_prefix``
gives every layer the prefix as keys and values (P-tuning v2), made by that layer's own frozen norm and key/value
maps. All three are off in properties/laser_paper.yaml.
"""

from logging import getLogger

import torch
import torch.nn.functional as F
from torch import nn

import recbole_llm.environment as environment
from recbole_llm.errors import is_int, require
from recbole_llm.llm.backbone import last_hidden_states, llm_decoder, llm_from_config, load_llm
from recbole_llm.llm.item_text import ItemTextTable, item_texts_from_config
from recbole_llm.llm.prompt import PromptAssembler, fit_to_context
from recbole_llm.model.abstract_recommender import LLMSequentialRecommender, TrainingStage, count_parameters
from recbole_llm.model.collaborative import CollaborativeEncoder
from recbole_llm.model.layers import MFormer

PREFIX_MODES = ("mformer", "free", "none")
ITEM_PREFIXES = ("mformer", "none", "warm_items")
EMBEDDING_HEADS = ("none", "linear", "separate")
ITEM_GRAD_SCORES = ("sampled", "matrix")
REFRESHED_ITEMS, FROZEN_ITEMS = "refreshed_items", "frozen_items"


class Laser(LLMSequentialRecommender):
    """Laser over a frozen LLM (``llm_path``) and a frozen CF encoder (``cf_model``); keys in model/Laser.yaml."""

    def __init__(self, config, dataset):
        super().__init__(config, dataset)
        self.prefix_mode = config["prefix_mode"]
        self.item_prefix = config["item_prefix"]
        self.n_query = config["n_query"]
        self.n_experts = config["n_experts"]
        self.router_top_k = config["router_top_k"]
        self.n_suffix = config["n_suffix"]
        self.tau = config["tau"]
        self.center_embeddings = config["center_embeddings"]
        self.deep_prefix = bool(config["deep_prefix"])  # None: a checkpoint from before the setting, input tokens
        self.moe_balance_weight = config["moe_balance_weight"]
        self.item_grad_negatives = config["item_grad_negatives"] or 0  # None: a checkpoint from before the setting
        self.item_grad_scores = config["item_grad_scores"] or "sampled"
        self.stage_epochs = (config["stage1_epochs"], config["stage2_epochs"])
        item_texts = item_texts_from_config(config, dataset)
        if self.reads_cf_model(config):  # first: a checkpoint that does not fit fails before the LLM loads
            self.cf_encoder = CollaborativeEncoder(config, dataset)

        # 1. The frozen LLM. Shared per process by load_llm, so it is held beside the modules, not inside them: it
        # is never part of a state dict and never switched to train mode.
        self.llm = llm_from_config(config)
        self.run_decoder = llm_decoder(self.llm, config["llm_layers"]).__call__  # a call, so not a submodule either
        self.run_no_grad_decoder = self._no_grad_decoder(config)
        llm_size = self.llm.hidden_size

        # 2. One prompt template for users and items: instruction, then the numbered history with item attributes.
        item_text = ItemTextTable.from_config(config, item_texts, self.llm.tokenizer)
        n_user_prefix = 0 if self.prefix_mode == "none" or self.deep_prefix else self.n_query  # input tokens
        n_item_prefix = n_user_prefix if self.item_prefix != "none" else 0
        self.user_prompt = self._prompt_assembler(config, item_text, n_user_prefix)
        self.item_prompt = self._prompt_assembler(config, item_text, n_item_prefix)
        # an item without a prefix (item_prefix warm_items: the cold ones)
        self.text_item_prompt = self._prompt_assembler(config, item_text, 0) if n_item_prefix else self.item_prompt
        # long histories lose their oldest items; an item prompt (one item, no longer a prefix) fits when this does
        fit_to_context([self.user_prompt], self.llm.context_length(), self.llm.name)

        # 3. The prefix: the M-Former over the frozen CF encoder's states, free vectors, or nothing.
        token_scale = self.input_embeddings().weight.float().std().item()  # learned inputs start at this scale
        if self.prefix_mode == "mformer":
            self.mformer = MFormer(
                cf_size=self.cf_encoder.hidden_size,
                llm_size=llm_size,
                n_experts=self.n_experts,
                n_query=self.n_query,
                hidden_size=config["mformer_hidden"],
                n_layers=config["n_mformer_layers"],
                n_heads=config["mformer_heads"],
                cross_attention_freq=config["cross_attention_freq"],
                top_k=self.router_top_k,
                dropout=config["mformer_dropout"],
                prefix_scale=token_scale,
            )
        elif self.prefix_mode == "free":
            self.free_prefix = nn.Parameter(torch.randn(self.n_query, llm_size) * token_scale)  # [n_query, d_llm]

        # 4. The suffix: learned tokens after the prompt; the LLM's output at the last one is the embedding.
        self.suffix_tokens = nn.Parameter(torch.randn(self.n_suffix, llm_size) * token_scale)  # [n_suffix, d_llm]

        # 5. Beyond the paper: one linear map over user and item embeddings (identity at the start), one map for
        # each side (separate: any bilinear score between the two kinds of prompt), or none.
        self.embedding_head = identity_map(llm_size) if config["embedding_head"] in ("linear", "separate") else None
        self.user_head = identity_map(llm_size) if config["embedding_head"] == "separate" else None

        # 6. The item matrix: refreshed in stage 1, frozen in stage 2.
        self.register_item_matrix(llm_size, item_text.lengths)
        self.register_buffer("evaluation_routed_users", torch.zeros(self.n_experts), persistent=False)  # [K]

        trainable, _ = count_parameters(self)
        _, llm_parameters = count_parameters(self.llm.model)
        getLogger().info(
            f"Laser trains {trainable:,} parameters (M-Former, experts, router, prefix map, suffix), "
            f"{100 * trainable / llm_parameters:.2f}% of the LLM's {llm_parameters:,}"
        )

    @classmethod
    def check_settings(cls, config, dataset):
        super().check_settings(config, dataset)
        choices_of = (("prefix_mode", PREFIX_MODES), ("item_prefix", ITEM_PREFIXES), ("embedding_head", EMBEDDING_HEADS))
        for key, choices in choices_of:
            require(config, key, config[key] in choices, f"use one of {', '.join(choices)}")
        require(config, "n_query", config["n_query"] >= 1, "the prefix needs at least 1 query token")
        require(config, "n_experts", config["n_experts"] >= 1, "the M-Former needs at least 1 query expert")
        require(config, "router_top_k", 1 <= config["router_top_k"] <= config["n_experts"],
                f"it must be between 1 and n_experts ({config['n_experts']})")
        require(config, "mformer_hidden", config["mformer_hidden"] % config["mformer_heads"] == 0,
                f"it must be divisible by mformer_heads ({config['mformer_heads']}): change one of them")
        require(config, "n_mformer_layers", config["n_mformer_layers"] >= 1, "use at least 1 block")
        require(config, "cross_attention_freq", config["cross_attention_freq"] >= 1, "use at least 1")
        require(config, "n_suffix", config["n_suffix"] >= 1, "embeddings are read at a suffix, use 1 or more")
        require(config, "tau", config["tau"] > 0, "the cosine temperature must be positive")
        require(config, "center_embeddings", isinstance(config["center_embeddings"], bool), "use True or False")
        require(config, "deep_prefix", config["deep_prefix"] in (True, False, None), "use True or False")
        require(config, "no_grad_bf16", config["no_grad_bf16"] in (True, False, None), "use True or False")
        negatives = config["item_grad_negatives"]
        require(config, "item_grad_negatives", negatives is None or is_int(negatives) and negatives >= 0,
                "use 0 (no item written with gradient) or a number of sampled items")
        require(config, "item_grad_scores", config["item_grad_scores"] in (*ITEM_GRAD_SCORES, None),
                f"use one of {', '.join(ITEM_GRAD_SCORES)}")

    @classmethod
    def reads_cf_model(cls, config):
        return config["prefix_mode"] == "mformer"

    def _prompt_assembler(self, config, item_text, n_prefix):
        return PromptAssembler(
            item_text,
            self.llm.tokenizer,
            head=config["prompt_head"],
            item_marker=config["prompt_item_marker"],
            item_separator=config["prompt_item_separator"],
            tail=config["prompt_tail"],
            max_prompt_items=config["max_prompt_items"],
            n_prefix=n_prefix,
            n_suffix=self.n_suffix,
        )

    def frozen_modules(self):
        return [self.cf_encoder] if self.prefix_mode == "mformer" else []

    # ---- The frozen LLM's pieces: input embeddings, decoder ------------------------------------------------------

    def input_embeddings(self):
        return self.llm.input_embeddings()

    def _no_grad_decoder(self, config):
        """With no_grad_bf16, on a CPU with bf16 matrix units and an fp32 LLM: the same decoder over a copy of the
        LLM held in bf16, cast once (autocast would cast every weight at every call, which costs what the bf16
        products save on short prompts). None otherwise."""
        if not (config["no_grad_bf16"] and self.llm.device.type == "cpu" and self.llm.dtype == torch.float32
                and environment.cpu_computes_bf16()):
            return None
        bf16_llm = load_llm(config["llm_path"], config["device"], "bfloat16", False, config["llm_device_map"])
        getLogger().info("no_grad_bf16: item matrices and evaluation through a copy of the LLM held in bf16")
        return llm_decoder(bf16_llm, config["llm_layers"]).__call__

    def last_hidden_states(self, inputs_embeds, attention_mask, position_ids, layer_prefix=None):
        """The decoder's states [B, T, d_llm] (layer llm_layers when set). Without gradient (item matrices,
        evaluation), through the bf16 copy of no_grad_bf16 where there is one, its states returned in fp32."""
        if self.run_no_grad_decoder is None or torch.is_grad_enabled():
            return last_hidden_states(self.run_decoder, inputs_embeds, attention_mask, position_ids, layer_prefix)
        return last_hidden_states(  # a deep prefix is cast by each layer's key/value maps
            self.run_no_grad_decoder, inputs_embeds.bfloat16(), attention_mask, position_ids, layer_prefix
        ).float()

    # ---- Prefix: the M-Former over the CF encoder's states C_u -------------------------------------------------

    def history_prefix(self, item_seq, item_len):
        """The prefix of each history [B, n_query, d_llm] (None without one) and its routing (None without M-Former)."""
        if self.prefix_mode == "none":
            return None, None
        if self.prefix_mode == "free":
            return self.free_prefix.expand(len(item_seq), -1, -1), None
        cf_states, valid, _ = self.cf_encoder.encode(item_seq, item_len)  # [B, L, d_cf], [B, L]
        return self.mformer(cf_states, valid)

    # ---- Bi-Tuning: the LLM's output at the suffix of [prefix ; prompt ; suffix] -------------------------------

    def suffix_output(self, prompt_assembler, item_seq, item_len, prefix):
        """The LLM's last-layer output (layer llm_layers when set) at each prompt's last suffix token: [B, d_llm]."""
        input_prefix, layer_prefix = (None, prefix) if self.deep_prefix else (prefix, None)
        prompt = prompt_assembler.assemble(
            item_seq, item_len, self.input_embeddings(), prefix=input_prefix, suffix=self.suffix_tokens
        )
        hidden = self.last_hidden_states(prompt.inputs_embeds, prompt.attention_mask, prompt.position_ids, layer_prefix)
        rows = torch.arange(len(hidden), device=hidden.device)
        return hidden[rows, prompt.suffix_positions[:, -1]].float()

    def user_embedding(self, item_seq, item_len):
        """Each user's embedding [B, d_llm] from the history, and the routing of the M-Former (or None)."""
        prefix, routing = self.history_prefix(item_seq, item_len)
        return self.suffix_output(self.user_prompt, item_seq, item_len, prefix), routing

    def item_embedding(self, items):
        """Items [N] written as one-item histories with the user template: [N, d_llm]. With item_prefix warm_items,
        a cold item (cold_item_ratio) is written without the prefix, which would come from a CF row never trained
        on it; the other items with it."""
        if self.item_prefix != "warm_items":
            return self.written_items(items, prefixed=self.item_prefix == "mformer")
        cold = self.is_cold_item[items]
        if not cold.any() or cold.all():  # a batch of one kind (the item matrix batches items by text length)
            return self.written_items(items, prefixed=not cold.any())
        parts = [self.written_items(items[~cold], prefixed=True), self.written_items(items[cold], prefixed=False)]
        order = torch.cat([(~cold).nonzero().squeeze(1), cold.nonzero().squeeze(1)])
        return torch.cat(parts)[order.argsort()]

    def written_items(self, items, prefixed):
        """The LLM's output at the suffix of each item [N] written alone, with the M-Former's prefix or none."""
        if not prefixed:
            return self.suffix_output(self.text_item_prompt, *self.text_item_prompt.item_only(items), None)
        item_seq, item_len = self.item_prompt.item_only(items)
        return self.suffix_output(self.item_prompt, item_seq, item_len, self.history_prefix(item_seq, item_len)[0])

    # ---- Scores: cosine / tau, in the space the switches beyond the paper make ---------------------------------

    def compared(self, unit_rows, head=None):
        """Unit-norm item embeddings [N, d] as they are compared: centred on the mean item row and mapped by the
        embedding head (or `head`) when those switches are on, renormalised. The paper's Laser: unchanged."""
        head = self.embedding_head if head is None else head
        if not self.center_embeddings and head is None:
            return unit_rows
        if self.center_embeddings:
            unit_rows = unit_rows - self.item_matrix[1:].mean(0)
        if head is not None:
            unit_rows = head(unit_rows)
        return F.normalize(unit_rows, dim=-1)

    def compared_users(self, user_embedding):
        """User embeddings [B, d_llm] as they are compared with the item rows: unit norm, fp32, then `compared`
        through the users' own head where embedding_head is separate."""
        return self.compared(F.normalize(user_embedding.float(), dim=-1), head=self.user_head)

    def scores(self, user_embedding, item_rows=None):
        """cos(h_u, h_i) / tau [B, n_items] over all items of the held item matrix, whose padding row is never a
        candidate; or [B, N] over the unit-norm `item_rows` [N, d] given. In fp32, also under bf16 autocast (whose
        steps at |logit| ~ 20 are 0.125)."""
        rows = self.item_matrix if item_rows is None else item_rows
        with torch.autocast(user_embedding.device.type, enabled=False):
            scores = self.compared_users(user_embedding) @ self.compared(rows).T / self.tau  # [B, N]
        if item_rows is None:
            scores[:, 0] = float("-inf")
        return scores

    # ---- Two-stage training ----------------------------------------------------------------------------------

    def training_stages(self):
        return [
            TrainingStage(REFRESHED_ITEMS, self.stage_epochs[0]),
            TrainingStage(FROZEN_ITEMS, self.stage_epochs[1]),
        ]

    def begin_stage(self, name):
        super().begin_stage(name)
        if name == FROZEN_ITEMS:
            self.refresh_item_matrix()  # the matrix of the best weights so far, frozen from here on

    def begin_epoch(self, epoch_idx):
        if self.stage == REFRESHED_ITEMS:
            self.refresh_item_matrix()

    def item_side_trains(self):
        """Whether the batch's items are written with gradient: in stage 1 with item_grad_negatives > 0."""
        return self.stage == REFRESHED_ITEMS and self.item_grad_negatives > 0

    def items_written_now(self, next_items):
        """The batch's next items [B] and item_grad_negatives warm items drawn for the batch, each once [N] (sorted),
        and their unit-norm rows written by the LLM now, with gradient [N, d_llm]: the item side -- the items' prefix,
        the suffix -- learns (the authors' stage "2-1")."""
        warm_items = (~self.is_cold_item[1:]).nonzero().squeeze(1) + 1  # [n_warm], id 0 is padding
        drawn = warm_items[torch.randint(len(warm_items), (self.item_grad_negatives,), device=warm_items.device)]
        items = torch.unique(torch.cat([next_items, drawn]))  # [N]
        return items, F.normalize(self.item_embedding(items).float(), dim=-1)

    def scores_with_items_written_now(self, user_embedding, next_items):
        """Training scores and targets when the item side trains. item_grad_scores sampled (the authors'): each
        user's next item against the batch's other next items and the drawn ones, every row written now [B, N].
        matrix: the written rows replace theirs among all items of the held matrix, which keeps them [B, n_items];
        its positives are always fresh rows and most negatives stale ones, which a model can learn to tell apart."""
        items, rows = self.items_written_now(next_items)
        if self.item_grad_scores == "sampled":
            return self.scores(user_embedding, rows), torch.searchsorted(items, next_items)
        self.item_matrix.index_copy_(0, items, rows.detach())
        scores = self.scores(user_embedding, self.item_matrix.index_copy(0, items, rows))  # gradient through rows
        scores[:, 0] = float("-inf")
        return self.without_cold_items(scores), next_items

    def begin_evaluation(self):
        if self.stage != FROZEN_ITEMS:
            super().begin_evaluation()
        self.evaluation_routed_users.zero_()

    def end_evaluation(self):
        n_routed = self.evaluation_routed_users.sum()
        if self.prefix_mode == "mformer" and n_routed > 0:
            shares = " ".join(f"{share:.3f}" for share in (self.evaluation_routed_users / n_routed).tolist())
            n_users = int(n_routed) // self.router_top_k
            getLogger().info(
                f"routing shares of the {self.n_experts} query experts over {n_users} evaluated users: {shares}"
            )

    # ---- RecBole's model contract ------------------------------------------------------------------------------

    def calculate_loss(self, interaction):
        """Cross-entropy of the next item over all items but the cold ones, and lambda * the load-balancing term."""
        self.item_matrix_outdated()  # an optimizer step follows
        item_seq, item_len = interaction[self.ITEM_SEQ], interaction[self.ITEM_SEQ_LEN]
        user_embedding, routing = self.user_embedding(item_seq, item_len)
        next_items = interaction[self.POS_ITEM_ID]  # [B]
        if self.item_side_trains():
            scores, targets = self.scores_with_items_written_now(user_embedding, next_items)
        else:
            scores, targets = self.without_cold_items(self.scores(user_embedding)), next_items  # [B, n_items]
        next_item_loss = F.cross_entropy(scores, targets)
        balance_loss = routing.balance_loss() if routing is not None else next_item_loss.new_zeros(())
        return next_item_loss, self.moe_balance_weight * balance_loss

    def predict(self, interaction):
        user_embedding, _ = self.user_embedding(interaction[self.ITEM_SEQ], interaction[self.ITEM_SEQ_LEN])
        with torch.autocast(user_embedding.device.type, enabled=False):
            item_rows = self.compared(self.item_matrix[interaction[self.ITEM_ID]])  # [B, d]
            return (self.compared_users(user_embedding) * item_rows).sum(-1) / self.tau  # [B]

    def full_sort_predict(self, interaction):
        user_embedding, routing = self.user_embedding(interaction[self.ITEM_SEQ], interaction[self.ITEM_SEQ_LEN])
        if routing is not None:
            self.evaluation_routed_users += routing.chosen.sum(0)
        return self.scores(user_embedding)  # [B, n_items]


def identity_map(width):
    """A trainable linear map [width -> width] that starts as the identity."""
    linear = nn.Linear(width, width)
    nn.init.eye_(linear.weight)
    nn.init.zeros_(linear.bias)
    return linear
