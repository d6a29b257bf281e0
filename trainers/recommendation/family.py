"""The recommendation model family: NCF (GMF, MLP, NeuMF) and SASRec on implicit feedback.

Training (what :class:`RecommendationFamily` gives the generic loop):

* NCF: a sample is one training interaction (user, item); its batch row holds the positive
  and ``num_negatives`` sampled items (``items[:, 0]`` is the positive), BCE over all.
* SASRec: a sample is a window of up to ``max_seq_len`` consecutive interactions of one user
  in time order (long histories are cut into windows from the end, so each interaction but
  the user's first, which has no history, is a target exactly once per epoch); at each
  position the next item is the positive, with
  ``num_negatives`` sampled items, BCE over the real (non-padding) positions.

Samples are shuffled by (seed, epoch), identically on every rank, then dealt to ranks by
:func:`~trainflow.trainers.recommendation.data.rank_batches`: every positive is covered exactly once
per epoch across the world and every rank yields the same number of batches. Negatives are
drawn per batch from a generator seeded by (seed, epoch, rank, batch index), so resuming
with ``skip_batches`` reproduces the rest of the epoch without replaying it.

Evaluation follows the NCF protocol: each user's held-out item is ranked among its 99
sampled negatives (the split's ``neg_item_idx``); ties count against the positive
(see :func:`~trainflow.trainers.recommendation.metrics.rank_of_positive`). SASRec reads the user's
history up to the target: for ``valid`` the train rows without the ``is_valid`` one, for
``eval`` all train rows (the valid interaction is earlier than the eval one).

Valid rows and model selection: by default (``train_on_valid=False``) the ``is_valid`` rows are
not training positives, so epochs and hyper-parameters can be chosen on ``valid``. The model we
ship is then refit with ``train_on_valid=True`` for the epoch count chosen on ``valid``, keeping
the last epoch (the loop's ``keep_best=False``): ``valid`` metrics of such a run are leaked.
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
from trainflow.trainers.recommendation.data import Interactions, rank_batches, sample_negatives

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
        interactions: The train split already in memory (tests); read from ``manifest`` if
            omitted.

    Raises:
        ValueError: the manifest is not a recommendation dataset.
    """

    name = "recommendation"

    def __init__(
        self,
        config: RecommendationConfig,
        manifest: Manifest | None,
        world: World,
        interactions: Interactions | None = None,
        holdouts: dict[str, dict[str, np.ndarray]] | None = None,
    ) -> None:
        super().__init__(config, manifest, world)
        if manifest is not None and manifest.kind != "recommendation":
            raise ValueError(f"manifest {manifest.uri} is a {manifest.kind!r} dataset, expected 'recommendation'")
        if interactions is None and manifest is None:
            raise ValueError("RecommendationFamily needs a manifest or interactions")
        self.config: RecommendationConfig = config
        self.all_interactions = interactions if interactions is not None else Interactions.from_manifest(manifest)
        self.num_users = self.all_interactions.num_users
        self.num_items = self.all_interactions.num_items
        self.train = self.all_interactions.select(config.train_on_valid)
        self._keys = self.train.positive_keys()
        self._holdouts: dict[str, dict[str, np.ndarray]] = dict(holdouts or {})
        self._histories: dict[str, np.ndarray] = {}
        if config.model == "sasrec":
            self._windows = self._make_windows(self.train, config.max_seq_len)
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

    # --- training data -------------------------------------------------------------------
    @staticmethod
    def _make_windows(train: Interactions, max_len: int) -> np.ndarray:
        """``(n, 3)`` (user, start, end): targets are the user's interactions [start, end)."""
        off = train.user_offsets
        rows = []
        for user in range(train.num_users):
            end = int(off[user + 1] - off[user])
            while end > 1:
                start = max(1, end - max_len)
                rows.append((user, start, end))
                end = start
        return np.asarray(rows, dtype=np.int64).reshape(-1, 3)

    def num_train_samples(self, epoch: int) -> int:
        """Training interactions (NCF) or history windows (SASRec) per epoch, world-wide."""
        return len(self._windows) if self.is_sequential else len(self.train.users)

    def train_batches(self, epoch: int, batch_size: int, skip_batches: int = 0) -> Iterator[dict[str, torch.Tensor]]:
        """This rank's batches of ``epoch`` (see the module docstring for the layout).

        NCF batches: ``users`` (B,) and ``items`` (B, 1 + num_negatives), positive first.
        SASRec batches: ``seq`` (B, L), ``pos`` (B, L) and ``neg`` (B, L, num_negatives),
        item ids shifted by one, 0 for padding.
        """
        import torch

        num = self.num_train_samples(epoch)
        order = np.random.default_rng([self.config.seed, epoch]).permutation(num)
        batches = rank_batches(num, batch_size, self.world.world_size, self.world.rank, order)
        for index in range(skip_batches, len(batches)):
            rng = np.random.default_rng([self.config.seed, epoch, self.world.rank, index])
            arrays = self._sequence_batch(batches[index], rng) if self.is_sequential else self._pair_batch(batches[index], rng)
            yield {key: torch.from_numpy(value) for key, value in arrays.items()}

    def _pair_batch(self, idx: np.ndarray, rng: np.random.Generator) -> dict[str, np.ndarray]:
        users = self.train.users[idx]
        negatives = sample_negatives(rng, users, self.config.num_negatives, self._keys, self.num_items)
        return {"users": users, "items": np.concatenate([self.train.items[idx][:, None], negatives], axis=1)}

    def _sequence_batch(self, idx: np.ndarray, rng: np.random.Generator) -> dict[str, np.ndarray]:
        length, k = self.config.max_seq_len, self.config.num_negatives
        windows = self._windows[idx]
        off = self.train.user_offsets
        seq = np.zeros((len(idx), length), dtype=np.int64)
        pos = np.zeros((len(idx), length), dtype=np.int64)
        for row, (user, start, end) in enumerate(windows):
            items = self.train.items[off[user] : off[user + 1]]
            n = end - start
            seq[row, length - n :] = items[start - 1 : end - 1] + 1
            pos[row, length - n :] = items[start:end] + 1
        users = np.repeat(windows[:, 0], length)
        neg = sample_negatives(rng, users, k, self._keys, self.num_items).reshape(len(idx), length, k) + 1
        neg[pos == 0] = 0
        return {"seq": seq, "pos": pos, "neg": neg}

    def loss(self, model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """Mean binary cross-entropy over the positives and their sampled negatives."""
        import torch
        import torch.nn.functional as F

        if self.is_sequential:
            items = torch.cat([batch["pos"].unsqueeze(-1), batch["neg"]], dim=-1)
            logits = model(seq=batch["seq"], items=items)
            mask = (batch["pos"] > 0).unsqueeze(-1).expand_as(logits)
            labels = torch.zeros_like(logits)
            labels[..., 0] = 1.0
            if not bool(mask.any()):
                return logits.sum() * 0.0
            return F.binary_cross_entropy_with_logits(logits[mask], labels[mask])
        logits = model(batch["users"], batch["items"])
        if logits.numel() == 0:
            return logits.sum() * 0.0
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
        if split not in self._histories:
            known = self.all_interactions.select(include_valid=split == "eval")
            self._histories[split] = known.histories(self.config.max_seq_len)
        return self._histories[split]

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

        Every rank scores every user (the splits hold one row per user), so the numbers are
        identical on all ranks and the forward passes stay in step under DDP/FSDP.
        """
        data = self.holdout(split)
        scores = self.score(model, split, data["users"], data["candidates"])
        ranks = rank_of_positive(scores[:, 0], scores[:, 1:])
        metrics = ranking_metrics(ranks, self.config.eval_k)
        labels = np.zeros_like(scores, dtype=np.float64)
        labels[:, 0] = 1.0
        x = scores.astype(np.float64)
        bce = np.maximum(x, 0) - x * labels + np.log1p(np.exp(-np.abs(x)))
        metrics["loss"] = float(bce.mean())
        metrics["num_users"] = float(len(ranks))
        return metrics

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
