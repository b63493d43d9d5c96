"""Most popular items: the baseline every model must beat."""

from __future__ import annotations

import numpy as np
import torch

from recforge.models.base import Recommender


class Pop(Recommender):
    """Scores every item by its number of training interactions."""

    name = "pop"

    def __init__(self, seed: int = 0):
        self.seed = seed

    def fit(self, split, valid=None):
        self.popularity_ = torch.from_numpy(split.item_popularity.astype(np.float32))
        return self

    def score(self, hist):
        return self.popularity_.unsqueeze(0).expand(len(hist), -1)
