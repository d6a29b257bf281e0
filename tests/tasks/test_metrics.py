from __future__ import annotations

import math

import numpy as np
import pytest

from trainflow.tasks import metrics as M


def test_ranks_are_pessimistic_on_ties_and_ignore_masked_negatives():
    pos = np.array([0.9, 0.5, 0.5, np.nan])
    neg = np.array([[0.1, 0.2, 0.3], [0.5, 0.6, 0.1], [0.5, 0.5, 0.5], [0.1, 0.1, 0.1]])
    assert M.rank_of_positive(pos, neg).tolist() == [0, 2, 3, 3]
    valid = np.array([[1, 1, 1], [0, 1, 1], [1, 1, 1], [1, 1, 1]], bool)
    assert M.rank_of_positive(pos, neg, valid).tolist() == [0, 1, 3, 3]


def test_hr_and_ndcg_values():
    ranks = np.array([0, 1, 9, 10, 50])
    assert M.hit_ratio(ranks, 10) == pytest.approx(3 / 5)
    expected = (1 / math.log2(2) + 1 / math.log2(3) + 1 / math.log2(11)) / 5
    assert M.ndcg(ranks, 10) == pytest.approx(expected)
    assert M.ranking_metrics(ranks, 1) == pytest.approx({"hr_at_1": 0.2, "ndcg_at_1": 0.2, "mrr": np.mean(1 / (ranks + 1))})


def test_list_diversity():
    top = np.array([[0, 1], [0, 2]])
    out = M.list_diversity(top, np.array([10, 5, 1, 0]), 4)
    assert out["coverage"] == 0.75
    assert out["avg_popularity"] == pytest.approx(np.mean([1, 2 / 3, 1, 1 / 3]))
    assert 0 < out["gini"] < 1
    assert M.list_diversity(np.array([[0], [1], [2], [3]]), np.ones(4), 4)["gini"] == pytest.approx(0.0)


def test_displacement_metrics_and_constant_velocity():
    t = np.arange(50, dtype=np.float64)
    track = np.stack([t * 1.5, t * -0.5], axis=1)[None]  # straight line, constant speed
    cv = M.constant_velocity_forecast(track[:, :20], 30)
    assert np.allclose(cv, track[:, 20:])
    out = M.displacement_metrics(cv + np.array([3.0, 4.0]), track[:, 20:])
    assert out["ade"] == pytest.approx(5.0) and out["fde"] == pytest.approx(5.0)
    assert out["miss_rate"] == 1.0 and out["ade_1s"] == pytest.approx(5.0)
    with pytest.raises(ValueError, match="must both be"):
        M.displacement_metrics(cv[:, :10], track[:, 20:])
