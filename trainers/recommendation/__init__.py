"""Recommendation family: NCF (GMF, MLP, NeuMF) and SASRec over the dataset manifests."""

from trainers.recommendation.config import RecommendationConfig
from trainers.recommendation.family import RecommendationFamily

__all__ = ["RecommendationConfig", "RecommendationFamily"]
