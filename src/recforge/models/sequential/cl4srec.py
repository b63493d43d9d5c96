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

Reference code: the CL4SRec of Qiu et al.'s DuoRec repository (RuihongQiu/DuoRec,
``recbole/model/sequential_recommender/cl4srec.py`` and the ``cl4srec_aug`` of
``recbole/data/dataloader/sequential_dataloader.py``), which this model follows:

* the contrastive term, ``nce_logits, nce_labels = self.info_nce(seq_output1, seq_output2,
  temp=self.tau, batch_size=aug_len1.shape[0], sim=self.sim)`` and ``return loss + self.lmd *
  nce_loss``: InfoNCE between the two views' last-position outputs, every other view of the
  batch a negative (only the diagonal and the paired view are masked), weight ``lmd: 0.1``
  (``cl_weight``);
* the rates, ``item_crop(seq, length, eta=0.6)``, ``item_mask(seq, length, gamma=0.3)``,
  ``item_reorder(seq, length, beta=0.6)`` (crop 0.6, mask 0.3, reorder 0.6 here; the paper tunes
  them per dataset);
* the mask token, a new id after the catalogue (``masked_item_seq[mask_index] =
  self.dataset.item_num``).

The similarity is the one fidelity choice where the default is not the authors': their
``seq.yaml`` has ``sim: 'dot'`` and ``tau: 1``; the default here is cosine at temperature 1,
chosen for CL4SRec and DuoRec together on validation data (figures and commands in
:mod:`recforge.models.sequential.contrastive`); ``similarity=dot temperature=1`` is the
authors' setting.

Deviations from the reference code: the next-item loss is the selectable SASRec loss (default
full-softmax cross-entropy over all positions of the sequence, where the authors' code, on
RecBole's prefix samples, scores the last position only; ``subseq=prefix`` gives their
samples); the views are built from the whole training input sequence of a sample (with
``subseq=none``, one per user) rather than from each prefix; each view draws its operator
independently (the authors draw two different operators per sequence, ``switch =
random.sample(range(3), k=2)``, and leave sequences of one item unchanged); dropout defaults
to 0.2 (the authors' ``seq.yaml``: ``hidden_dropout_prob: 0.5``, ``attn_dropout_prob: 0.5``).
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
