"""Synthetic stand-in with the MovieLens schema, deterministic by seed, any size.

Items belong to latent topics and have Zipf popularity within and across topics; each user has
a Dirichlet mix over topics and an activity drawn from a log-normal; consecutive interactions of
a user stay on the same topic with probability ``stickiness`` (so order carries signal, as in real
logs). Ratings follow how well the item's topic fits the user. Generated in blocks of whole users
of about 65k rows, each from its own seeded generator: memory is bounded and any block can be
regenerated alone. Source URL: ``synthetic://recommendation?num_interactions=1000000``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator

import numpy as np

from trainflow.tasks.datasets.synthetic import ROWS_PER_BLOCK as _ROWS_PER_BLOCK


@dataclasses.dataclass(frozen=True)
class SyntheticRecommendationConfig:
    """Size and shape of a synthetic interaction log.

    Attributes:
        num_interactions: Approximate number of interactions (exact to within a few users'
            worth: activity is drawn per user and scaled to this total).
        num_users: Users; default scales with the interactions (one per 100).
        num_items: Items; default scales with the interactions (one per 60, at least 200).
        num_topics: Latent topics.
        stickiness: Probability that a user's next interaction stays on the current topic.
        seed: Seed of every random draw.
    """

    num_interactions: int = 100_000
    num_users: int = 0
    num_items: int = 0
    num_topics: int = 32
    stickiness: float = 0.6
    seed: int = 0

    def __post_init__(self) -> None:
        if self.num_interactions < 100:
            raise ValueError(f"num_interactions must be at least 100, got {self.num_interactions}")
        users = self.num_users or max(20, self.num_interactions // 100)
        items = self.num_items or max(200, self.num_interactions // 60)
        object.__setattr__(self, "num_users", users)
        object.__setattr__(self, "num_items", items)
        if self.num_interactions < 5 * users:
            raise ValueError(
                f"num_interactions ({self.num_interactions}) must be at least 5 per user (num_users={users})"
            )
        if items < 110:
            raise ValueError(f"num_items must be at least 110 (99 negatives + history), got {items}")
        if self.num_interactions > users * (items // 2):
            raise ValueError(
                f"num_interactions ({self.num_interactions}) exceeds num_users × num_items/2 "
                f"({users * (items // 2)}): a user interacts with at most half the items"
            )
        if not 0 <= self.stickiness < 1:
            raise ValueError(f"stickiness must be in [0, 1), got {self.stickiness}")
        if self.num_topics < 1:
            raise ValueError(f"num_topics must be at least 1, got {self.num_topics}")


class SyntheticRecommendation:
    """Deterministic synthetic interaction log; iterate with :meth:`iter_batches`."""

    def __init__(self, config: SyntheticRecommendationConfig) -> None:
        self.config = config
        rng = np.random.default_rng([config.seed, 0])
        c = config
        self.item_topic = rng.integers(0, c.num_topics, size=c.num_items)
        popularity = 1.0 / np.arange(1, c.num_items + 1) ** 0.9
        rng.shuffle(popularity)
        self.item_popularity = popularity
        # Per-topic item CDFs by popularity.
        self._topic_items = [np.flatnonzero(self.item_topic == t) for t in range(c.num_topics)]
        self._topic_cdf = []
        for items in self._topic_items:
            weights = popularity[items] if items.size else np.ones(1)
            self._topic_cdf.append(np.cumsum(weights) / weights.sum())
        topic_weight = np.array([popularity[i].sum() if i.size else 0.0 for i in self._topic_items])
        self.topic_prior = topic_weight / topic_weight.sum()
        activity = rng.lognormal(mean=0.0, sigma=0.9, size=c.num_users)
        # At most half the catalogue per user, so every user keeps items to sample negatives
        # from; what the cap removes from heavy users goes to the others, keeping the total.
        cap = c.num_items // 2
        counts = activity / activity.sum() * c.num_interactions
        for _ in range(20):
            counts = np.minimum(counts, cap)
            free = counts < cap
            deficit = c.num_interactions - counts.sum()
            if deficit < 0.5 or not free.any():
                break
            counts = np.where(free, counts * (1 + deficit / counts[free].sum()), counts)
        self.user_counts = np.clip(np.round(counts), 5, cap).astype(np.int64)

    @property
    def num_interactions(self) -> int:
        return int(self.user_counts.sum())

    def iter_batches(self) -> Iterator:
        """RecordBatches of (user_id, item_id, rating, timestamp), ids 1-based, by user block."""
        import pyarrow as pa

        from trainflow.trainers.recommendation.movielens import interaction_schema

        c = self.config
        block_of_user = np.cumsum(self.user_counts) // _ROWS_PER_BLOCK
        starts = np.flatnonzero(np.r_[True, block_of_user[1:] != block_of_user[:-1]]).tolist()
        for start, stop in zip(starts, starts[1:] + [c.num_users]):
            rng = np.random.default_rng([c.seed, 1, start])
            counts = self.user_counts[start:stop]
            total = int(counts.sum())
            users = np.repeat(np.arange(start, stop), counts)
            mixes = rng.dirichlet(np.full(c.num_topics, 0.3) + 3 * self.topic_prior, size=stop - start)
            # Topic per interaction: a fresh draw from the user's mix, or the previous topic.
            cdf = np.cumsum(mixes, axis=1)
            fresh = (cdf[users - start] < rng.random(total)[:, None]).sum(axis=1)
            fresh = np.minimum(fresh, c.num_topics - 1)
            first = np.zeros(total, dtype=bool)
            first[np.concatenate([[0], np.cumsum(counts)[:-1]])] = True
            new = first | (rng.random(total) >= c.stickiness)
            last_new = np.maximum.accumulate(np.where(new, np.arange(total), 0))
            topics = fresh[last_new]
            items = np.empty(total, dtype=np.int64)
            u = rng.random(total)
            for t in range(c.num_topics):
                rows = np.flatnonzero(topics == t)
                if rows.size == 0:
                    continue
                if self._topic_items[t].size == 0:
                    items[rows] = rng.integers(0, c.num_items, size=rows.size)
                    continue
                pick = np.searchsorted(self._topic_cdf[t], u[rows], side="right")
                items[rows] = self._topic_items[t][np.minimum(pick, self._topic_items[t].size - 1)]
            fit = mixes[users - start, self.item_topic[items]]
            rating = np.clip(np.round(2.5 + 6 * fit + rng.normal(0, 0.8, total)), 1, 5).astype(np.float32)
            start_time = 874_724_710 + rng.integers(0, 86_400 * 200, size=stop - start)
            gaps = rng.exponential(3_600.0, size=total).astype(np.int64) + 1
            gaps[first] = 0
            seg = np.cumsum(gaps)
            seg -= np.repeat(seg[first], counts)
            timestamps = start_time[users - start] + seg
            yield pa.RecordBatch.from_arrays(
                [
                    pa.array(users + 1, pa.int64()),
                    pa.array(items + 1, pa.int64()),
                    pa.array(rating, pa.float32()),
                    pa.array(timestamps, pa.int64()),
                ],
                schema=interaction_schema(),
            )
