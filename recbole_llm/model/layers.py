"""Trainable layers between the frozen backbones: Laser's M-Former."""

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn


@dataclass
class Routing:
    """How a batch of users was routed to the M-Former's query experts."""

    probs: torch.Tensor  # [B, K] router probabilities, averaged over each user's valid positions
    weights: torch.Tensor  # [B, K] the chosen experts' renormalised weights, 0 for experts not chosen
    chosen: torch.Tensor  # [B, K] bool, the router_top_k experts of each user

    def balance_loss(self):
        """Switch Transformer's load-balancing term K * sum_j f_j * P_j; 1 when users spread evenly."""
        n_experts = self.probs.shape[1]
        return n_experts * (self.routed_share() * self.probs.mean(0)).sum()

    def routed_share(self):
        """f_j [K]: the share of the batch's routing choices that went to each expert (sums to 1)."""
        choices = self.chosen.float()  # [B, K]
        return choices.sum(0) / choices.sum()


class MFormerBlock(nn.Module):
    """Pre-LN transformer block over the query tokens: self-attention, cross-attention to the CF states (in some
    blocks), feed-forward."""

    def __init__(self, hidden_size, n_heads, has_cross_attention, dropout):
        super().__init__()
        self.self_attention_norm = nn.LayerNorm(hidden_size)
        self.self_attention = nn.MultiheadAttention(hidden_size, n_heads, dropout=dropout, batch_first=True)
        self.has_cross_attention = has_cross_attention
        if has_cross_attention:
            self.cross_attention_norm = nn.LayerNorm(hidden_size)
            self.cross_attention = nn.MultiheadAttention(hidden_size, n_heads, dropout=dropout, batch_first=True)
        self.feed_forward_norm = nn.LayerNorm(hidden_size)
        self.feed_forward = nn.Sequential(
            nn.Linear(hidden_size, 4 * hidden_size),
            nn.GELU(),
            nn.Dropout(dropout),
            nn.Linear(4 * hidden_size, hidden_size),
        )
        self.dropout = nn.Dropout(dropout)

    def forward(self, queries, cf_states, cf_padding):
        """queries [B, L, d_m], cf_states [B, N, d_m], cf_padding [B, N] (True: padding) -> [B, L, d_m]."""
        normed = self.self_attention_norm(queries)
        queries = queries + self.dropout(self.self_attention(normed, normed, normed, need_weights=False)[0])
        if self.has_cross_attention:
            normed = self.cross_attention_norm(queries)
            read, _ = self.cross_attention(
                normed, cf_states, cf_states, key_padding_mask=cf_padding, need_weights=False
            )
            queries = queries + self.dropout(read)
        return queries + self.dropout(self.feed_forward(self.feed_forward_norm(queries)))


class MFormer(nn.Module):
    """BLIP-2's Q-Former with a mixture of query experts (Laser's M-Former).

    A router reads the CF encoder's per-position states C_u and picks `top_k` of `n_experts` query experts (each
    `n_query` learnable tokens); their tokens read C_u through `n_layers` blocks, and a linear map to the LLM's
    width makes the prefix. With top_k > 1 the chosen experts' query tokens are summed with renormalised router
    weights before the blocks: one pass through the blocks whatever k is, and with k = 1 exactly the paper's top-1.
    `prefix_scale` is the std the prefix entries start with (the LLM's token-embedding scale).
    """

    def __init__(
        self, cf_size, llm_size, n_experts, n_query, hidden_size, n_layers, n_heads, cross_attention_freq, top_k,
        dropout, prefix_scale=1.0,
    ):
        super().__init__()
        self.top_k = top_k
        self.query_experts = nn.Parameter(torch.randn(n_experts, n_query, hidden_size) * 0.02)  # [K, L, d_m]
        self.router = nn.Linear(cf_size, n_experts)
        self.cf_projection = nn.Linear(cf_size, hidden_size)
        self.blocks = nn.ModuleList(
            MFormerBlock(hidden_size, n_heads, index % cross_attention_freq == 0, dropout) for index in range(n_layers)
        )
        self.output_norm = nn.LayerNorm(hidden_size)
        self.prefix_map = nn.Linear(hidden_size, llm_size)
        nn.init.normal_(self.prefix_map.weight, std=prefix_scale / hidden_size**0.5)
        nn.init.zeros_(self.prefix_map.bias)

    def route(self, cf_states, valid_mask):
        """Router probabilities of every valid position, averaged per user; the top_k experts with their weights."""
        position_probs = F.softmax(self.router(cf_states), dim=-1)  # [B, N, K]
        valid = valid_mask.unsqueeze(-1).to(position_probs.dtype)  # [B, N, 1]
        probs = (position_probs * valid).sum(1) / valid.sum(1).clamp(min=1)  # [B, K]
        top_probs, top_experts = probs.topk(self.top_k, dim=-1)  # [B, k]
        # Detached normaliser: the weights sum to 1 (top-1: exactly 1) yet the router still gets the task's
        # gradient, as Switch Transformer's gate scaling gives it.
        top_weights = top_probs / top_probs.sum(-1, keepdim=True).detach()
        weights = torch.zeros_like(probs).scatter(1, top_experts, top_weights)  # [B, K]
        chosen = torch.zeros_like(probs, dtype=torch.bool).scatter(1, top_experts, True)  # [B, K]
        return Routing(probs, weights, chosen)

    def forward(self, cf_states, valid_mask):
        """cf_states [B, N, d_cf], valid_mask [B, N] -> prefix [B, n_query, d_llm] and the routing."""
        routing = self.route(cf_states, valid_mask)
        queries = torch.einsum("bk,kld->bld", routing.weights, self.query_experts)  # [B, L, d_m]
        memory = self.cf_projection(cf_states)  # [B, N, d_m]
        for block in self.blocks:
            queries = block(queries, memory, ~valid_mask)
        prefix = self.prefix_map(self.output_norm(queries))  # [B, n_query, d_llm]
        return prefix, routing


class Projector(nn.Module):
    """RSLLM's projector: an MLP d_cf -> d_llm -> d_llm (GELU) from CF item embeddings into the LLM's input space."""

    def __init__(self, cf_size, llm_size):
        super().__init__()
        self.layers = nn.Sequential(nn.Linear(cf_size, llm_size), nn.GELU(), nn.Linear(llm_size, llm_size))

    def forward(self, item_embeddings):
        """[..., d_cf] -> [..., d_llm]"""
        return self.layers(item_embeddings)
