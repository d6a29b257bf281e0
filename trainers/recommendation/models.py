"""Recommendation models: GMF, MLP and NeuMF (He et al. 2017) and SASRec (Kang & McAuley 2018).

Every model scores candidate items; ``forward`` is the only entry point so that DDP and FSDP
hooks run for training and evaluation alike:

* NCF models: ``forward(users (B,), items (B, C)) -> (B, C)`` logits.
* SASRec: ``forward(seq (B, L), items (B, C)) -> (B, C)`` logits from the last position, or
  ``items (B, L, C) -> (B, L, C)`` logits at every position (training). Item ids are shifted
  by one (0 is padding). Given ``users`` instead of ``seq``, it reads the histories it holds
  in the ``histories`` buffer (set at build time), which is how an exported model serves.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from trainflow.trainers.parallel import lookup_embeddings


class GMF(nn.Module):
    """Generalized matrix factorisation: ``h^T (p_u * q_i)``."""

    def __init__(self, num_users: int, num_items: int, factors: int, with_output: bool = True) -> None:
        super().__init__()
        self.user_embedding = nn.Embedding(num_users, factors)
        self.item_embedding = nn.Embedding(num_items, factors)
        nn.init.normal_(self.user_embedding.weight, std=0.01)
        nn.init.normal_(self.item_embedding.weight, std=0.01)
        if with_output:
            self.output = nn.Linear(factors, 1)
            nn.init.kaiming_uniform_(self.output.weight, a=1, nonlinearity="sigmoid")
            nn.init.zeros_(self.output.bias)

    def lookups(self, users: torch.Tensor, items: torch.Tensor) -> list[tuple[nn.Module, torch.Tensor]]:
        return [(self.user_embedding, users), (self.item_embedding, items)]

    def combine(self, user: torch.Tensor, item: torch.Tensor) -> torch.Tensor:
        """The features from the looked-up rows: ``user`` (B, d), ``item`` (B, C, d)."""
        return user.unsqueeze(1) * item

    def features(self, users: torch.Tensor, items: torch.Tensor) -> torch.Tensor:
        return self.combine(*lookup_embeddings(self.lookups(users, items)))

    def forward(self, users: torch.Tensor, items: torch.Tensor) -> torch.Tensor:
        return self.output(self.features(users, items)).squeeze(-1)

    def embedding_modules(self) -> list[nn.Module]:
        return [self.user_embedding, self.item_embedding]


class MLP(nn.Module):
    """NCF's MLP tower over the concatenated user and item embeddings."""

    def __init__(
        self, num_users: int, num_items: int, layers: tuple[int, ...], dropout: float = 0.0, with_output: bool = True
    ) -> None:
        super().__init__()
        dim = layers[0] // 2
        self.user_embedding = nn.Embedding(num_users, dim)
        self.item_embedding = nn.Embedding(num_items, dim)
        tower: list[nn.Module] = []
        for width_in, width_out in zip(layers[:-1], layers[1:], strict=False):
            tower += [nn.Linear(width_in, width_out), nn.ReLU()]
            if dropout:
                tower.append(nn.Dropout(dropout))
        self.tower = nn.Sequential(*tower)
        nn.init.normal_(self.user_embedding.weight, std=0.01)
        nn.init.normal_(self.item_embedding.weight, std=0.01)
        for module in self.tower:
            if isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight)
                nn.init.zeros_(module.bias)
        if with_output:
            self.output = nn.Linear(layers[-1], 1)
            nn.init.kaiming_uniform_(self.output.weight, a=1, nonlinearity="sigmoid")
            nn.init.zeros_(self.output.bias)

    def lookups(self, users: torch.Tensor, items: torch.Tensor) -> list[tuple[nn.Module, torch.Tensor]]:
        return [(self.user_embedding, users), (self.item_embedding, items)]

    def combine(self, user: torch.Tensor, item: torch.Tensor) -> torch.Tensor:
        """The tower's features from the looked-up rows: ``user`` (B, d), ``item`` (B, C, d)."""
        user = user.unsqueeze(1).expand(-1, item.shape[1], -1)
        return self.tower(torch.cat([user, item], dim=-1))

    def features(self, users: torch.Tensor, items: torch.Tensor) -> torch.Tensor:
        return self.combine(*lookup_embeddings(self.lookups(users, items)))

    def forward(self, users: torch.Tensor, items: torch.Tensor) -> torch.Tensor:
        return self.output(self.features(users, items)).squeeze(-1)

    def embedding_modules(self) -> list[nn.Module]:
        return [self.user_embedding, self.item_embedding]


class NeuMF(nn.Module):
    """GMF and MLP paths with separate embeddings, fused by one output layer (NCF §3.4)."""

    def __init__(self, num_users: int, num_items: int, factors: int, layers: tuple[int, ...], dropout: float = 0.0) -> None:
        super().__init__()
        # Without their own output layers: every parameter takes part in the loss (DDP).
        self.gmf = GMF(num_users, num_items, factors, with_output=False)
        self.mlp = MLP(num_users, num_items, layers, dropout, with_output=False)
        self.output = nn.Linear(factors + layers[-1], 1)
        nn.init.kaiming_uniform_(self.output.weight, a=1, nonlinearity="sigmoid")
        nn.init.zeros_(self.output.bias)

    def forward(self, users: torch.Tensor, items: torch.Tensor) -> torch.Tensor:
        # all four tables in one lookup: one exchange when they are row-sharded (lookup_embeddings)
        gmf_user, gmf_item, mlp_user, mlp_item = lookup_embeddings(
            self.gmf.lookups(users, items) + self.mlp.lookups(users, items))
        fused = torch.cat([self.gmf.combine(gmf_user, gmf_item), self.mlp.combine(mlp_user, mlp_item)], dim=-1)
        return self.output(fused).squeeze(-1)

    def load_pretrained(self, gmf_state: dict, mlp_state: dict, alpha: float = 0.5) -> None:
        """Initialise from trained GMF and MLP models; the output layer is
        ``[alpha * h_gmf, (1 - alpha) * h_mlp]`` as in the paper."""
        gmf_state, mlp_state = dict(gmf_state), dict(mlp_state)
        gmf_w, gmf_b = gmf_state.pop("output.weight"), gmf_state.pop("output.bias")
        mlp_w, mlp_b = mlp_state.pop("output.weight"), mlp_state.pop("output.bias")
        self.gmf.load_state_dict(gmf_state)
        self.mlp.load_state_dict(mlp_state)
        with torch.no_grad():
            self.output.weight.copy_(torch.cat([alpha * gmf_w, (1 - alpha) * mlp_w], dim=1))
            self.output.bias.copy_(alpha * gmf_b + (1 - alpha) * mlp_b)

    def embedding_modules(self) -> list[nn.Module]:
        return self.gmf.embedding_modules() + self.mlp.embedding_modules()


class _SelfAttentionBlock(nn.Module):
    """Pre-LN causal self-attention + point-wise feed-forward, as in SASRec."""

    def __init__(self, hidden: int, heads: int, dropout: float) -> None:
        super().__init__()
        self.heads = heads
        self.attn_norm = nn.LayerNorm(hidden, eps=1e-8)
        self.qkv = nn.Linear(hidden, 3 * hidden)
        self.proj = nn.Linear(hidden, hidden)
        self.ffn_norm = nn.LayerNorm(hidden, eps=1e-8)
        self.ffn = nn.Sequential(nn.Linear(hidden, hidden), nn.ReLU(), nn.Dropout(dropout), nn.Linear(hidden, hidden))
        self.dropout = nn.Dropout(dropout)
        self.attn_dropout = dropout

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        b, length, hidden = x.shape
        q, k, v = self.qkv(self.attn_norm(x)).view(b, length, 3, self.heads, hidden // self.heads).permute(2, 0, 3, 1, 4)
        attn = F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, dropout_p=self.attn_dropout if self.training else 0.0
        )
        x = x + self.dropout(self.proj(attn.transpose(1, 2).reshape(b, length, hidden)))
        return x + self.dropout(self.ffn(self.ffn_norm(x)))


class SASRec(nn.Module):
    """Self-attentive sequential recommender with shared input/output item embeddings.

    Args:
        num_users: Rows of the ``histories`` buffer.
        num_items: Items (indices ``0..num_items-1``; stored shifted by one, 0 is padding).
        max_seq_len: Longest history attended to.
        hidden: Width.
        blocks: Self-attention blocks.
        heads: Attention heads.
        dropout: Dropout rate.
    """

    def __init__(
        self, num_users: int, num_items: int, max_seq_len: int, hidden: int, blocks: int, heads: int, dropout: float
    ) -> None:
        super().__init__()
        self.max_seq_len = max_seq_len
        self.item_embedding = nn.Embedding(num_items + 1, hidden, padding_idx=0)
        self.position_embedding = nn.Embedding(max_seq_len, hidden)
        self.embedding_dropout = nn.Dropout(dropout)
        self.blocks = nn.ModuleList(_SelfAttentionBlock(hidden, heads, dropout) for _ in range(blocks))
        self.final_norm = nn.LayerNorm(hidden, eps=1e-8)
        self.register_buffer("histories", torch.zeros(num_users, max_seq_len, dtype=torch.int32))
        for param in self.parameters():
            if param.dim() > 1:
                nn.init.xavier_normal_(param)
        with torch.no_grad():
            self.item_embedding.weight[0].zero_()

    def encode(self, seq: torch.Tensor) -> torch.Tensor:
        """Hidden state at every position of left-padded ``seq`` (B, L) -> (B, L, hidden)."""
        length = seq.shape[1]
        valid = seq > 0
        x = self.item_embedding(seq) * self.item_embedding.embedding_dim**0.5
        positions = torch.arange(length, device=seq.device)
        x = self.embedding_dropout(x + self.position_embedding(positions)) * valid.unsqueeze(-1)
        causal = torch.ones(length, length, dtype=torch.bool, device=seq.device).tril()
        # Attend to earlier real items; a padding row attends to itself only (no empty rows).
        mask = (causal & valid.unsqueeze(1)) | torch.eye(length, dtype=torch.bool, device=seq.device)
        mask = mask.unsqueeze(1)
        for block in self.blocks:
            x = block(x, mask) * valid.unsqueeze(-1)
        return self.final_norm(x)

    def forward(
        self,
        seq: torch.Tensor | None = None,
        items: torch.Tensor | None = None,
        users: torch.Tensor | None = None,
        shared: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Scores of ``items`` after the history ``seq`` (or the stored history of ``users``).

        ``items`` (B, C): C candidates scored at the last position (serving, evaluation);
        (B, L, C): C candidates at each position (training). With ``shared`` (B, K), ``items``
        (B, L) is one candidate a position and the K items of ``shared`` are scored at every
        position of their row too: (B, L, 1 + K), one embedding lookup for both.
        """
        if items is None:
            raise ValueError("SASRec.forward needs items")
        if seq is None:
            if users is None:
                raise ValueError("SASRec.forward needs seq or users")
            seq = self.histories[users].long()
        hidden = self.encode(seq)
        if shared is not None:
            rows = self.item_embedding(torch.cat([items.reshape(-1), shared.reshape(-1)]))
            width = rows.shape[-1]
            own, others = rows[: items.numel()].view(*items.shape, width), rows[items.numel():].view(*shared.shape, width)
            return torch.cat([(hidden * own).sum(-1, keepdim=True), torch.bmm(hidden, others.transpose(1, 2))], dim=-1)
        if items.dim() == 2:
            hidden = hidden[:, -1:, :]
            return (hidden * self.item_embedding(items)).sum(-1)
        return (hidden.unsqueeze(2) * self.item_embedding(items)).sum(-1)

    def embedding_modules(self) -> list[nn.Module]:
        return [self.item_embedding]


def build_model(config: Any, num_users: int, num_items: int) -> nn.Module:
    """The one builder of a recommendation model, for training and for serving.

    Args:
        config: A :class:`~trainflow.trainers.recommendation.config.RecommendationConfig` or the same
            fields as a dict (an exported ``config.json``'s ``family_config``).
        num_users: Rows of the user table.
        num_items: Rows of the item table.

    Raises:
        ValueError: an unknown ``model``.
    """
    c = config if not isinstance(config, dict) else _Fields(config)
    if c.model == "gmf":
        return GMF(num_users, num_items, c.gmf_factors)
    if c.model == "mlp":
        return MLP(num_users, num_items, tuple(c.mlp_layers), c.dropout)
    if c.model == "neumf":
        return NeuMF(num_users, num_items, c.gmf_factors, tuple(c.mlp_layers), c.dropout)
    if c.model == "sasrec":
        return SASRec(num_users, num_items, c.max_seq_len, c.hidden_size, c.num_blocks, c.num_heads, c.dropout)
    raise ValueError(f"unknown recommendation model {c.model!r}")


class _Fields:
    def __init__(self, data: dict[str, Any]) -> None:
        self.__dict__.update(data)
