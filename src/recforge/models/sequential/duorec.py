"""DuoRec: contrastive regularisation with model-level dropout and supervised positives.

Qiu, Huang, Yin & Wang, "Contrastive Learning for Representation Degeneration Problem in
Sequential Recommendation", WSDM 2022.

Besides the next-item loss, each training sequence gets two views that are pulled together by
InfoNCE (weight ``cl_weight``, ``temperature``; cosine similarity by default instead of the
paper's dot product, see :mod:`recforge.models.sequential.contrastive`):

* the unsupervised view: the same input encoded again, so the two differ only by the dropout
  masks of the encoder ("model-level augmentation"); with ``augment=cl4srec`` or ``ticoserec``
  the input is also augmented first;
* the supervised view: another training sequence whose next item (the target at its last
  position) is the same, drawn at random (the sequence itself when no other one exists).

As in the paper, other sequences of the batch with the same next item are removed from the
negatives (false negatives).

Deviations from the paper: the next-item loss is the selectable SASRec loss (default full-softmax
cross-entropy at all positions of the sequence) and, with ``subseq=none``, a sample is a user's
whole training sequence, so the supervised positive is a user whose last training item is the
same; ``subseq=prefix`` gives the paper's setting where every prefix is a sample.
"""

from __future__ import annotations

import numpy as np
import torch

from recforge.models.sequential.contrastive import ContrastiveSASRec
from recforge.training.losses import info_nce


class DuoRec(ContrastiveSASRec):
    name = "duorec"

    def __init__(self, augment: str = "none", **contrastive):
        super().__init__(augment=augment, **contrastive)

    def prepare_fit(self, split) -> None:
        super().prepare_fit(split)
        last = self._samples[:, -1]
        order = np.argsort(last, kind="stable")
        sorted_last = last[order]
        first = np.searchsorted(sorted_last, sorted_last, side="left")
        size = np.searchsorted(sorted_last, sorted_last, side="right") - first
        self._by_target = order
        self._group_start = np.empty_like(first)
        self._group_size = np.empty_like(size)
        self._position = np.empty_like(first)
        self._group_start[order], self._group_size[order] = first, size
        self._position[order] = np.arange(len(order))

    def positives(self, rows: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        """For each sample row, another sample with the same last target (itself if alone)."""
        start, size, pos = self._group_start[rows], self._group_size[rows], self._position[rows]
        off = (rng.random(len(rows)) * np.maximum(size - 1, 1)).astype(np.int64)
        pick = start + off
        pick = np.where(pick >= pos, pick + 1, pick)  # skip the sample itself
        pick = np.where(size > 1, pick, pos)
        return self._by_target[pick]

    def make_batch(self, rows: np.ndarray, rng: np.random.Generator) -> dict:
        batch = super().make_batch(rows, rng)
        if not self.cl_weight:
            return batch
        inp = batch["inp"].numpy()
        batch["view"] = self.augmented_view(inp, rows, rng) if self._augmenter is not None else batch["inp"]
        pos_rows = self.positives(rows, rng)
        batch["positive"] = torch.from_numpy(self._samples[pos_rows, :-1])
        batch["label"] = torch.from_numpy(self._samples[rows, -1])
        return batch

    def extra_loss(self, batch, hidden):
        if "view" not in batch:
            return None
        z1 = self.last_state(batch["view"])
        z2 = self.last_state(batch["positive"])
        return self.cl_weight * info_nce(z1, z2, self.temperature, labels=batch["label"],
                                        similarity=self.similarity)
