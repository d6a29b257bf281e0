"""Synthetic stand-ins with the schemas of the real data, deterministic by seed, any size.

Recommendation (MovieLens schema): items belong to latent topics and have Zipf popularity
within and across topics; each user has a Dirichlet mix over topics and an activity drawn
from a log-normal; consecutive interactions of a user stay on the same topic with
probability ``stickiness`` (so order carries signal, as in real logs). Ratings follow how
well the item's topic fits the user. Generated in blocks of whole users of about 65k rows,
each from its own seeded generator: memory is bounded and any block can be regenerated alone.

Driving (Argoverse schema): scenarios of vehicles following a kinematic unicycle model with
smooth speed and yaw-rate changes (lane keeping, turns, braking), 10 Hz, 50 frames; track 0
is the focal AGENT, track 1 the AV, then OTHERS with partial tracks.

Both are reachable as source URLs: ``synthetic://recommendation?num_interactions=1000000``
and ``synthetic://driving?num_sequences=1000``.
"""

from __future__ import annotations

import dataclasses
import urllib.parse
from collections.abc import Iterator
from typing import Any

import numpy as np

READER_VERSION = "1"
_ROWS_PER_BLOCK = 65_536


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

        from tasks.datasets.movielens import interaction_schema

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


@dataclasses.dataclass(frozen=True)
class SyntheticDrivingConfig:
    """Size of a synthetic driving set.

    Attributes:
        num_sequences: Scenarios to generate.
        max_others: Most surrounding vehicles per scenario.
        seed: Seed of every random draw.
    """

    num_sequences: int = 1000
    max_others: int = 8
    seed: int = 0

    def __post_init__(self) -> None:
        if self.num_sequences < 1:
            raise ValueError(f"num_sequences must be at least 1, got {self.num_sequences}")
        if self.max_others < 0:
            raise ValueError(f"max_others must be >= 0, got {self.max_others}")


def _simulate_track(rng: np.random.Generator, x0: float, y0: float, heading: float, speed: float) -> np.ndarray:
    """50 frames of a unicycle with smooth acceleration and yaw-rate processes (10 Hz)."""
    dt = 0.1
    n = 50
    accel = np.cumsum(rng.normal(0, 0.35, n)) * 0.3 + rng.normal(0, 0.8)
    manoeuvre = rng.choice([0.0, 0.0, 0.0, 1.0, -1.0])  # mostly straight, some turns
    turn_start = rng.integers(0, 40)
    yaw = np.where(np.arange(n) >= turn_start, manoeuvre * rng.uniform(0.05, 0.35), 0.0)
    yaw = yaw + np.cumsum(rng.normal(0, 0.004, n))
    xy = np.empty((n, 2))
    for t in range(n):
        xy[t] = (x0, y0)
        speed = max(0.0, speed + accel[t] * dt)
        heading += yaw[t] * dt
        x0 += speed * np.cos(heading) * dt
        y0 += speed * np.sin(heading) * dt
    return xy + rng.normal(0, 0.05, xy.shape)


class SyntheticDriving:
    """Deterministic synthetic scenarios; iterate with :meth:`iter_records`."""

    def __init__(self, config: SyntheticDrivingConfig) -> None:
        self.config = config

    def record(self, index: int) -> dict[str, Any]:
        """Scenario ``index`` as a sequence record (see :mod:`tasks.datasets.argoverse`)."""
        c = self.config
        rng = np.random.default_rng([c.seed, 2, index])
        origin = rng.uniform(-2000, 2000, 2)
        heading = rng.uniform(-np.pi, np.pi)
        tracks = [_simulate_track(rng, origin[0], origin[1], heading, rng.uniform(0, 18))]
        types = [0]
        num_others = int(rng.integers(1, c.max_others + 2))
        for k in range(num_others):
            offset = rng.normal(0, 25, 2)
            lane_heading = heading + rng.choice([0.0, 0.0, np.pi, np.pi / 2])
            xy = _simulate_track(rng, origin[0] + offset[0], origin[1] + offset[1], lane_heading, rng.uniform(0, 15))
            if k > 0 and rng.random() < 0.5:  # partial track: appears late or leaves early
                cut = int(rng.integers(5, 45))
                if rng.random() < 0.5:
                    xy[:cut] = np.nan
                else:
                    xy[cut:] = np.nan
            tracks.append(xy)
            types.append(1 if k == 0 else 2)
        return {
            "seq_id": f"syn-{c.seed}-{index}",
            "city": "SYN",
            "timestamps": 315_967_376.0 + index * 10.0 + np.arange(50) * 0.1,
            "tracks_xy": np.stack(tracks).astype(np.float32),
            "track_types": np.asarray(types, dtype=np.int8),
        }

    def iter_records(self) -> Iterator[dict[str, Any]]:
        for index in range(self.config.num_sequences):
            yield self.record(index)


def parse_synthetic_url(url: str) -> tuple[str, dict[str, Any]]:
    """``synthetic://recommendation?num_interactions=1000`` → ("recommendation", {...}).

    Raises:
        ValueError: unknown generator or parameter, or a parameter that is not a number.
    """
    parsed = urllib.parse.urlparse(url)
    kind = parsed.netloc or parsed.path.lstrip("/")
    config_cls = {"recommendation": SyntheticRecommendationConfig, "driving": SyntheticDrivingConfig}.get(kind)
    if config_cls is None:
        raise ValueError(f"source_url {url!r}: unknown synthetic generator {kind!r} (recommendation, driving)")
    fields = {f.name: f.type for f in dataclasses.fields(config_cls)}
    params: dict[str, Any] = {}
    for key, values in urllib.parse.parse_qs(parsed.query, keep_blank_values=True).items():
        if key not in fields:
            raise ValueError(f"source_url {url!r}: unknown parameter {key!r} (known: {', '.join(fields)})")
        raw = values[-1]
        try:
            params[key] = float(raw) if fields[key] == "float" else int(raw)
        except ValueError:
            raise ValueError(f"source_url {url!r}: parameter {key}={raw!r} is not a number") from None
    return kind, params
