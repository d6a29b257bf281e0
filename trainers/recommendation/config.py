"""Configuration of the recommendation family (NCF models and SASRec)."""

from __future__ import annotations

import dataclasses
from typing import Any

MODELS = ("gmf", "mlp", "neumf", "sasrec")
LOSSES = ("bce", "softmax")


@dataclasses.dataclass(frozen=True)
class RecommendationConfig:
    """What the recommendation family builds and how it samples, trains and evaluates.

    The optimizer, learning rate, batch size and number of epochs belong to the generic loop's
    config; this holds what is specific to the recommender.
    """

    model: str = "sasrec"
    """``gmf``, ``mlp``, ``neumf`` (He et al. 2017) or ``sasrec`` (Kang & McAuley 2018)."""

    gmf_factors: int = 32
    """Embedding size of the GMF path (``gmf`` and ``neumf``)."""

    mlp_layers: tuple[int, ...] = (64, 32, 16, 8)
    """Widths of the MLP tower (``mlp`` and ``neumf``); the first is the concatenated
    user+item embedding, so each embedding has ``mlp_layers[0] // 2`` factors (as in NCF)."""

    num_negatives: int = 4
    """Negatives sampled per positive (NCF: per interaction; SASRec: per sequence position, or
    with ``loss="softmax"`` per window, shared by its positions), uniformly among the items the
    user has no training positive with, resampled every epoch."""

    loss: str = "bce"
    """Training loss over each positive and its ``num_negatives`` sampled items: ``bce`` (binary
    cross-entropy, each candidate scored on its own; NCF and the SASRec paper) or ``softmax``
    (cross-entropy of the positive against its negatives: a sampled softmax, which ranks the
    positive above the negatives jointly; use it with tens of negatives or more). SASRec with
    ``softmax`` draws its negatives once a window (among the user's non-positives, as always) and
    scores them at every position of the window: one matrix product, so hundreds are cheap."""

    max_seq_len: int = 200
    """SASRec: longest history the model attends to; longer histories are cut into windows
    so that every training positive is still seen once per epoch."""

    history_windows: int = 16
    """SASRec: windows of ``max_seq_len`` targets trained per user and epoch at most: the family
    keeps each user's latest ``history_windows * max_seq_len + 2`` train items (a table of
    ``num_users`` rows, whatever the number of interactions); older interactions of longer
    histories are not training targets. 16 x 50 covers every ML-100K history (at most 736
    targets) and the median ML-25M one."""

    hidden_size: int = 64
    """SASRec: item/position embedding and transformer width."""

    num_blocks: int = 2
    """SASRec: self-attention blocks."""

    num_heads: int = 1
    """SASRec: attention heads (must divide ``hidden_size``)."""

    dropout: float = 0.2
    """Dropout rate (SASRec embeddings/attention/FFN; NCF MLP tower)."""

    train_on_valid: bool = False
    """Use the ``is_valid`` train rows as training positives. Keep ``False`` while choosing
    hyper-parameters or epochs on ``valid`` (they are its targets); ``True`` refits on
    train+valid for a fixed, already chosen number of epochs (``valid`` metrics then leak)."""

    pretrained_gmf: str | None = None
    """NeuMF only: path of a saved GMF ``state_dict`` to initialise the GMF path (NCF §3.4.1)."""

    pretrained_mlp: str | None = None
    """NeuMF only: path of a saved MLP ``state_dict`` to initialise the MLP path."""

    pretrain_alpha: float = 0.5
    """NeuMF with pre-training: weight of the GMF head in the combined output layer."""

    row_sparse_updates: bool = False
    """Embedding tables get sparse gradients and :class:`~trainflow.trainers.parallel.RowSparseAdamW`:
    each step exchanges (between ranks) and updates only the rows it looked up, so its cost
    follows the batch, not the table ("lazy" Adam: untouched rows keep their moments). Under
    DDP the tables are left out of DDP's all-reduce. Not with ``fsdp`` / ``sharded_embeddings``."""

    eval_k: int = 10
    """Cut-off K of HR@K and NDCG@K (metric keys ``hr_at_K``, ``ndcg_at_K``)."""

    eval_batch_size: int = 512
    """Users scored per forward pass during evaluation."""

    seed: int = 0
    """Seed of model initialisation, epoch shuffles and negative sampling."""

    def __post_init__(self) -> None:
        if self.model not in MODELS:
            raise ValueError(f"model must be one of {', '.join(MODELS)}, got {self.model!r}")
        object.__setattr__(self, "mlp_layers", tuple(int(v) for v in self.mlp_layers))
        for name in ("gmf_factors", "max_seq_len", "history_windows", "hidden_size", "num_blocks", "num_heads", "eval_k", "eval_batch_size"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}")
        if self.loss not in LOSSES:
            raise ValueError(f"loss must be one of {', '.join(LOSSES)}, got {self.loss!r}")
        if self.num_negatives < 1:
            raise ValueError(f"num_negatives must be at least 1, got {self.num_negatives}")
        if len(self.mlp_layers) < 1 or any(v < 1 for v in self.mlp_layers):
            raise ValueError(f"mlp_layers must be positive widths, got {self.mlp_layers}")
        if self.mlp_layers[0] % 2:
            raise ValueError(f"mlp_layers[0] must be even (user and item halves), got {self.mlp_layers[0]}")
        if self.hidden_size % self.num_heads:
            raise ValueError(f"num_heads ({self.num_heads}) must divide hidden_size ({self.hidden_size})")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout}")
        if not 0.0 <= self.pretrain_alpha <= 1.0:
            raise ValueError(f"pretrain_alpha must be in [0, 1], got {self.pretrain_alpha}")
        if (self.pretrained_gmf or self.pretrained_mlp) and self.model != "neumf":
            raise ValueError(f"pretrained_gmf/pretrained_mlp apply to model='neumf' only, got model={self.model!r}")
        if bool(self.pretrained_gmf) != bool(self.pretrained_mlp):
            raise ValueError("pretrained_gmf and pretrained_mlp must be given together")

    def to_dict(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        data["mlp_layers"] = list(self.mlp_layers)
        return data
