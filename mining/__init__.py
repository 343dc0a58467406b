"""Hard-sample miners and samplers: difficulty scores, easy/hard sampler, PK sampler."""

from mining.difficulty import DifficultyScores, EasyHardSampler, top_negative_classes
from mining.pk_sampler import PKSampler

__all__ = ["DifficultyScores", "EasyHardSampler", "PKSampler", "top_negative_classes"]
