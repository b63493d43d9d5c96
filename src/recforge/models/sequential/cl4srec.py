"""CL4SRec: SASRec with a contrastive objective on augmented views of each sequence.

Xie et al., "Contrastive Learning for Sequential Recommendation", ICDE 2022.

For every training sequence of a batch, two views are drawn by random augmentation (crop, mask
or reorder, one chosen uniformly per view; :mod:`recforge.training.augment`), both are encoded
by the SASRec encoder and their sequence representations (the output at the last position) are
pulled together by InfoNCE against the other ``2N - 2`` views of the batch (``temperature``).
The loss is ``next-item loss + cl_weight * InfoNCE``.

``augment=ticoserec`` swaps in the time-interval-aware operators of TiCoSeRec (Dang et al.,
AAAI 2023), giving the CL4SRec framework with TiCoSeRec's views (the paper builds them into
CoSeRec, which differs from CL4SRec mostly by its extra insert/substitute operators, also
present here).

Deviations from the paper: the next-item loss is the selectable SASRec loss (default full-softmax
cross-entropy over all positions of the sequence); the views are built from the whole training
input sequence of a sample (with ``subseq=none``, one per user) rather than from each prefix;
the InfoNCE similarity is cosine by default instead of the dot product (see
:mod:`recforge.models.sequential.contrastive`); the augmentation rates default to mid-range
values (crop 0.6, mask 0.3, reorder 0.6) where the paper tunes them per dataset.
"""

from __future__ import annotations

import numpy as np

from recforge.models.sequential.contrastive import ContrastiveSASRec
from recforge.training.losses import info_nce


class CL4SRec(ContrastiveSASRec):
    name = "cl4srec"

    def make_batch(self, rows: np.ndarray, rng: np.random.Generator) -> dict:
        batch = super().make_batch(rows, rng)
        if self._augmenter is not None and self.cl_weight:
            inp = batch["inp"].numpy()
            batch["views"] = (self.augmented_view(inp, rows, rng), self.augmented_view(inp, rows, rng))
        return batch

    def extra_loss(self, batch, hidden):
        if "views" not in batch:
            return None
        v1, v2 = batch["views"]
        return self.cl_weight * info_nce(self.last_state(v1), self.last_state(v2), self.temperature,
                                        similarity=self.similarity)
