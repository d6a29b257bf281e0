"""The recommendation model family: NCF (GMF, MLP, NeuMF) and SASRec on implicit feedback.

Training (what :class:`RecommendationFamily` gives the generic loop). No rank holds the train
split: what the models need beyond a batch is kept in memory bounded by the number of users
(:mod:`trainflow.trainers.recommendation.data`, built by one streaming pass when the family starts).

* NCF: a sample is one training interaction (user, item), streamed by
  :class:`~trainflow.trainers.loader.ShardLoader` (its dealing rule, its shuffle by (seed, epoch), its
  resumable position); the loader's transform drops the padding and, unless
  ``train_on_valid``, the ``is_valid`` rows, and adds ``num_negatives`` items sampled among
  those the user has no positive with (a fixed-size Bloom filter of the training pairs):
  ``items[:, 0]`` is the positive; the loss is BCE over all, or (``loss="softmax"``) the
  cross-entropy of the positive against its negatives.
* SASRec: a sample is a window of up to ``max_seq_len`` consecutive interactions of one user
  in time order, cut from the end of the user's latest ``history_windows * max_seq_len + 1``
  train items (a table of ``num_users`` rows): each of those interactions but the first,
  which has no history, is a target exactly once per epoch; older ones of very long
  histories are not trained on. At each position the next item is the positive, with
  ``num_negatives`` sampled items (with ``loss="softmax"``: drawn once a window and shared by
  its positions, so many negatives cost one matrix product), the loss (``config.loss``: BCE,
  or a softmax over the positive and its negatives) over the real (non-padding) positions. The windows are
  shuffled by (seed, epoch) and dealt by the loader's rule
  (:func:`~trainflow.trainers.loader.rank_rows`, the tail padded: smaller last batches).

Every positive is covered exactly once per epoch across the world and every rank yields the
same number of batches. Negatives are drawn per batch from a generator seeded by (seed, epoch,
rank, batch index), so resuming with ``skip_batches`` reproduces the rest of the epoch without
replaying it.

Evaluation follows the NCF protocol: each user's held-out item is ranked among its 99
sampled negatives (the split's ``neg_item_idx``); ties count against the positive
(see :func:`~trainflow.trainers.recommendation.metrics.rank_of_positive`). SASRec reads the user's
history up to the target: for ``valid`` the train rows without the ``is_valid`` one, for
``eval`` all train rows (the valid interaction is earlier than the eval one).

Valid rows and model selection: by default (``train_on_valid=False``) the ``is_valid`` rows are
not training positives, so epochs and hyper-parameters can be chosen on ``valid``. The model we
ship is then refit with ``train_on_valid=True`` for the epoch count chosen on ``valid``; the loop
keeps its last epoch (``trains_on_valid``: no choice on ``valid``, whose metrics then leak).
See ``docs/quality.md`` ("Recommendation") for the commands and measured numbers.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

import numpy as np

from trainflow.tasks.metrics import rank_of_positive, ranking_metrics
from trainflow.trainers.family import ModelFamily
from trainflow.trainers.recommendation.config import RecommendationConfig
from trainflow.trainers.recommendation.data import (
    UserHistories,
    history_windows,
    sample_negatives,
    scan_train,
    table_sizes,
)

if TYPE_CHECKING:
    import torch

    from trainflow.tasks.manifest import Manifest
    from trainflow.trainers.distributed import World

log = logging.getLogger(__name__)

EVAL_SPLITS = ("valid", "eval")


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The model inside a DDP / compile wrapper (FSDP2 wraps in place)."""
    while hasattr(model, "module") or hasattr(model, "_orig_mod"):
        model = getattr(model, "module", None) or model._orig_mod
    return model


class RecommendationFamily(ModelFamily):
    """NCF and SASRec recommenders for the generic loop (see the module docstring).

    Args:
        config: The family's config.
        manifest: A committed ``recommendation`` dataset version.
        world: This process's rank information.

    Raises:
        ValueError: the manifest is not a recommendation dataset.
    """

    name = "recommendation"

    def __init__(self, config: RecommendationConfig, manifest: Manifest, world: World) -> None:
        super().__init__(config, manifest, world)
        if manifest is None:
            raise ValueError("RecommendationFamily needs a manifest")
        if manifest.kind != "recommendation":
            raise ValueError(f"manifest {manifest.uri} is a {manifest.kind!r} dataset, expected 'recommendation'")
        self.config: RecommendationConfig = config
        self.num_users, self.num_items = table_sizes(manifest)
        keep = config.history_windows * config.max_seq_len + 2 if config.model == "sasrec" else 0
        scan = scan_train(manifest, include_valid=config.train_on_valid, history_keep=keep)
        self.positives = scan.positives
        self.histories: UserHistories | None = scan.histories
        self.scan_rows = scan.rows_read
        self._holdouts: dict[str, dict[str, np.ndarray]] = {}
        self._history_tables: dict[str, np.ndarray] = {}
        if config.model == "sasrec":
            self._sequences = self.histories.sequences(config.train_on_valid)
            self._windows = history_windows((self._sequences > 0).sum(axis=1), config.max_seq_len)
        if config.train_on_valid:
            log.warning("train_on_valid=True: the valid items are training positives, so 'valid' metrics leak")

    # --- model ---------------------------------------------------------------------------
    @property
    def is_sequential(self) -> bool:
        return self.config.model == "sasrec"

    def build_model(self) -> torch.nn.Module:
        import torch

        from trainflow.trainers.recommendation.models import build_model

        c = self.config
        torch.manual_seed(c.seed)
        model = build_model(c, self.num_users, self.num_items)
        if c.model == "neumf" and c.pretrained_gmf and c.pretrained_mlp:
            model.load_pretrained(_load_state(c.pretrained_gmf), _load_state(c.pretrained_mlp), c.pretrain_alpha)
        if c.row_sparse_updates:
            from trainflow.trainers.parallel import mark_row_sparse

            mark_row_sparse(model.embedding_modules())
        if c.model != "sasrec":
            return model
        # What an exported model serves from: every known interaction, the valid one included.
        model.histories.copy_(torch.from_numpy(self._history_table("eval")))
        return model

    def fsdp_modules(self, model: torch.nn.Module) -> list[torch.nn.Module]:
        """The embedding tables (the bulk of the parameters), each sharded on its own."""
        return list(unwrap(model).embedding_modules())

    def embedding_tables(self, model: torch.nn.Module) -> list[torch.nn.Module]:
        """The user/item tables (SASRec: the item table), split row-wise under
        ``parallelism='sharded_embeddings'``."""
        return list(unwrap(model).embedding_modules())

    def ddp_ignored(self, model: torch.nn.Module) -> list[str]:
        """The row-sparse tables (their rows are exchanged by :class:`~trainflow.trainers.parallel.RowSparseAdamW`)
        and SASRec's ``histories`` buffer (the same on every rank: DDP would broadcast all
        ``num_users x max_seq_len`` of it before every training step)."""
        from trainflow.trainers.parallel import is_row_sparse

        names = [name for name, p in unwrap(model).named_parameters() if is_row_sparse(p)]
        return names + [name for name, _ in unwrap(model).named_buffers() if name.endswith("histories")]

    # --- training data -------------------------------------------------------------------
    def num_train_samples(self, epoch: int) -> int:
        """Training interactions (NCF) or history windows (SASRec) per epoch, world-wide."""
        if self.is_sequential:
            return len(self._windows)
        valid_rows = 0 if self.config.train_on_valid else self.manifest.num_rows("valid")
        return self.manifest.num_rows("train") - valid_rows

    def train_loader(self, batch_size: int):
        """NCF: the :class:`~trainflow.trainers.loader.ShardLoader` of this rank's training batches (the
        train split streamed, ``remainder='pad'`` so every interaction is covered exactly once;
        padding and, unless ``train_on_valid``, the ``is_valid`` rows are dropped from the batch
        in the transform, which also samples the negatives)."""
        from trainflow.trainers.loader import ShardLoader

        return ShardLoader(self.manifest, "train", batch_size, world=self.world,
                           columns=["user_idx", "item_idx", "is_valid"], seed=self.config.seed,
                           remainder="pad", transform=self._pair_transform)

    def train_batches(self, epoch: int, batch_size: int, skip_batches: int = 0) -> Iterator[dict[str, torch.Tensor]]:
        """This rank's batches of ``epoch`` (see the module docstring for the layout).

        NCF batches: ``users`` (B,) and ``items`` (B, 1 + num_negatives), positive first.
        SASRec batches: ``seq`` (B, L), ``pos`` (B, L) and ``neg`` (B, L, num_negatives), or
        with ``loss="softmax"`` ``neg`` (B, num_negatives), a window's negatives shared by its
        positions; item ids shifted by one, 0 for padding.
        """
        import torch

        if not self.is_sequential:
            loader = self.train_loader(batch_size)
            loader.load_state_dict({"epoch": epoch, "position": skip_batches})
            yield from loader
            return
        from trainflow.trainers.loader import batches_per_rank, rank_rows

        num = len(self._windows)
        order = np.random.default_rng([self.config.seed, epoch]).permutation(num)
        world, rank = self.world.world_size, self.world.rank
        for index in range(skip_batches, batches_per_rank(num, batch_size, world, "pad")):
            lo, hi = rank_rows(index, batch_size, world, rank)
            rng = np.random.default_rng([self.config.seed, epoch, rank, index])
            arrays = self._sequence_batch(order[lo:min(hi, num)], rng)
            yield {key: torch.from_numpy(value) for key, value in arrays.items()}

    def _pair_transform(self, batch: dict[str, Any], info) -> dict[str, torch.Tensor]:
        import torch

        keep = batch["sample_mask"].numpy()
        if not self.config.train_on_valid:
            keep = keep & ~batch["is_valid"].numpy()
        users = batch["user_idx"].numpy()[keep].astype(np.int64)
        rng = np.random.default_rng(int(info.generator.initial_seed()))
        negatives = sample_negatives(rng, users, self.config.num_negatives, self.positives, self.num_items)
        items = np.concatenate([batch["item_idx"].numpy()[keep].astype(np.int64)[:, None], negatives], axis=1)
        return {"users": torch.from_numpy(users), "items": torch.from_numpy(items)}

    def _sequence_batch(self, idx: np.ndarray, rng: np.random.Generator) -> dict[str, np.ndarray]:
        length, k = self.config.max_seq_len, self.config.num_negatives
        windows = self._windows[idx]
        users, start, end = windows[:, 0], windows[:, 1], windows[:, 2]
        table = self._sequences
        width = table.shape[1]
        n = (table[users] > 0).sum(axis=1)
        cols = np.arange(length)[None, :]
        real = cols >= (length - (end - start))[:, None]
        pos_cols = (width - n + end - length)[:, None] + cols  # output column c <- sequence position end-L+c
        pos = np.where(real, table[users[:, None], np.clip(pos_cols, 0, width - 1)], 0).astype(np.int64)
        seq = np.where(real, table[users[:, None], np.clip(pos_cols - 1, 0, width - 1)], 0).astype(np.int64)
        if self.config.loss == "softmax":  # k negatives a window, scored at each of its positions
            neg = sample_negatives(rng, users, k, self.positives, self.num_items) + 1
            return {"seq": seq, "pos": pos, "neg": neg}
        flat_users = np.repeat(users, length)
        neg = sample_negatives(rng, flat_users, k, self.positives, self.num_items).reshape(len(idx), length, k) + 1
        neg[pos == 0] = 0
        return {"seq": seq, "pos": pos, "neg": neg}

    def loss(self, model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """Mean loss over the positives and their sampled negatives (``config.loss``): binary
        cross-entropy over every candidate, or the cross-entropy of the positive (candidate 0)
        against its negatives."""
        import torch

        if self.is_sequential:
            if batch["neg"].dim() == 2:  # softmax: the window's negatives, shared by its positions
                logits = model(seq=batch["seq"], items=batch["pos"], shared=batch["neg"])
            else:
                logits = model(seq=batch["seq"], items=torch.cat([batch["pos"].unsqueeze(-1), batch["neg"]], dim=-1))
            real = batch["pos"] > 0
            if not bool(real.any()):
                return logits.sum() * 0.0
            return self._candidate_loss(logits[real])
        logits = model(batch["users"], batch["items"])
        if logits.numel() == 0:
            return logits.sum() * 0.0
        return self._candidate_loss(logits)

    def _candidate_loss(self, logits: torch.Tensor) -> torch.Tensor:
        """``logits`` (n, 1 + negatives), the positive first."""
        import torch
        import torch.nn.functional as F

        if self.config.loss == "softmax":
            return F.cross_entropy(logits, torch.zeros(len(logits), dtype=torch.long, device=logits.device))
        labels = torch.zeros_like(logits)
        labels[:, 0] = 1.0
        return F.binary_cross_entropy_with_logits(logits, labels)

    # --- evaluation ----------------------------------------------------------------------
    def holdout(self, split: str) -> dict[str, np.ndarray]:
        """``users`` (n,), ``candidates`` (n, 1 + negatives) of ``split``, positive first."""
        if split not in EVAL_SPLITS:
            raise ValueError(f"split must be one of {', '.join(EVAL_SPLITS)}, got {split!r}")
        if split not in self._holdouts:
            if self.manifest is None:
                raise ValueError(f"no {split!r} holdout: the family was built without a manifest or holdouts")
            table = self.manifest.read_table(split, columns=["user_idx", "item_idx", "neg_item_idx"])
            negatives = np.asarray(table.column("neg_item_idx").to_pylist(), dtype=np.int64)
            positives = table.column("item_idx").to_numpy().astype(np.int64)
            self._holdouts[split] = {
                "users": table.column("user_idx").to_numpy().astype(np.int64),
                "candidates": np.concatenate([positives[:, None], negatives], axis=1),
            }
        return self._holdouts[split]

    def _history_table(self, split: str) -> np.ndarray:
        """``(num_users, max_seq_len)`` int32 histories as of ``split``'s time (``eval``: the
        valid item included)."""
        if split not in self._history_tables:
            self._history_tables[split] = self.histories.latest(self.config.max_seq_len, include_valid=split == "eval")
        return self._history_tables[split]

    def score(self, model: torch.nn.Module, split: str, users: np.ndarray, candidates: np.ndarray) -> np.ndarray:
        """Scores (n, C) of ``candidates`` (item_idx) for ``users`` as of ``split``'s time."""
        import torch

        out = []
        was_training = model.training
        device = _model_device(model)
        model.eval()
        try:
            with torch.no_grad():
                for lo in range(0, len(users), self.config.eval_batch_size):
                    batch_users = users[lo : lo + self.config.eval_batch_size]
                    u = torch.from_numpy(batch_users).to(device)
                    c = torch.from_numpy(candidates[lo : lo + self.config.eval_batch_size]).to(device)
                    if self.is_sequential:
                        seq = torch.from_numpy(self._history_table(split)[batch_users].astype(np.int64)).to(device)
                        logits = model(seq=seq, items=c + 1)
                    else:
                        logits = model(u, c)
                    out.append(logits.float().cpu().numpy())
        finally:
            model.train(was_training)
        return np.concatenate(out) if out else np.zeros(candidates.shape, dtype=np.float32)

    def evaluate(self, model: torch.nn.Module, split: str) -> dict[str, float]:
        """``hr_at_K``, ``ndcg_at_K``, ``mrr`` and ``loss`` (BCE over the candidates) on ``split``.

        The users are split across the ranks (contiguous slices of ``ceil(n / world)`` rows,
        the last padded by repeating its last user so every rank runs the same forward passes,
        which FSDP's gathers need); each rank scores its slice and the per-user rank of the
        positive and BCE are all-gathered, so the numbers are identical on all ranks.
        """
        data = self.holdout(split)
        n = len(data["users"])
        world, rank = self.world.world_size, self.world.rank
        split_ranks = world > 1 and _process_group_ready() and n > 0
        if split_ranks:
            per = -(-n // world)
            rows = np.minimum(np.arange(rank * per, (rank + 1) * per), n - 1)
        else:
            rows = np.arange(n)
        scores = self.score(model, split, data["users"][rows], data["candidates"][rows])
        ranks = rank_of_positive(scores[:, 0], scores[:, 1:]).astype(np.float64)
        x = scores.astype(np.float64)
        labels = np.zeros_like(x)
        labels[:, 0] = 1.0
        bce = (np.maximum(x, 0) - x * labels + np.log1p(np.exp(-np.abs(x)))).mean(axis=1) if x.size else x[:, 0]
        if split_ranks:
            import torch
            import torch.distributed as dist

            mine = torch.from_numpy(np.stack([ranks, bce], axis=1))
            parts = [torch.empty_like(mine) for _ in range(world)]
            dist.all_gather(parts, mine)
            both = torch.cat(parts).numpy()[:n]
            ranks, bce = both[:, 0], both[:, 1]
        metrics = ranking_metrics(ranks.astype(np.int64), self.config.eval_k)
        metrics["loss"] = float(bce.mean()) if n else float("nan")
        metrics["num_users"] = float(n)
        return metrics

    @property
    def trains_on_valid(self) -> bool:
        return self.config.train_on_valid

    def selection_metric(self) -> tuple[str, str]:
        return f"ndcg_at_{self.config.eval_k}", "max"

    def export_config(self) -> dict[str, Any]:
        """Model kind and sizes, the family config and how ids map to the model's inputs.

        ``user_idx``/``item_idx`` are the rows of the manifest's ``users``/``items`` files;
        SASRec takes ``item_idx + 1`` (0 is padding) and reads histories from its
        ``histories`` buffer when called as ``model(users=..., items=...)``.
        """
        return {
            "family": self.name,
            "model": self.config.model,
            "num_users": self.num_users,
            "num_items": self.num_items,
            "item_index_offset": 1 if self.is_sequential else 0,
            "manifest_uri": self.manifest.uri if self.manifest is not None else None,
            "config": self.config.to_dict(),
        }


def _process_group_ready() -> bool:
    import torch.distributed as dist

    return dist.is_available() and dist.is_initialized()


def _model_device(model: torch.nn.Module) -> torch.device:
    import torch

    for param in model.parameters():
        return param.device
    return torch.device("cpu")


def _load_state(url: str) -> dict:
    import fsspec
    import torch

    with fsspec.open(url, "rb") as handle:
        return torch.load(handle, map_location="cpu", weights_only=True)
