"""DuoRec: contrastive regularisation with model-level dropout and supervised positives.

Qiu, Huang, Yin & Wang, "Contrastive Learning for Representation Degeneration Problem in
Sequential Recommendation", WSDM 2022.

Besides the next-item loss, each training sequence gets two views that are pulled together by
InfoNCE (weight ``cl_weight``, ``similarity``, ``temperature``; see
:mod:`recforge.models.sequential.contrastive` for the default similarity, which is not the
authors'):

* the unsupervised view: the same input encoded again, so the two differ only by the dropout
  masks of the encoder ("model-level augmentation"); with ``augment=cl4srec`` or ``ticoserec``
  the input is also augmented first;
* the supervised view: another training sequence whose next item (the target at its last
  position) is the same, drawn at random (the sequence itself when no other one exists).

Reference code: RuihongQiu/DuoRec, ``recbole/model/sequential_recommender/duorec.py``, with the
repository's ``duorec.sh`` (``--contrast='us_x' --sim='dot' --tau=1``, ``lmd_sem=0.1``):

* the pair, ``sem_nce_logits, sem_nce_labels = self.info_nce(aug_seq_output,
  sem_aug_seq_output, ...)`` under ``if self.ssl == 'us_x':``, with ``aug_seq_output =
  self.forward(item_seq, item_seq_len)`` (a second dropout pass over the input) and
  ``sem_aug_seq_output = self.forward(sem_aug, sem_aug_lengths)`` (the same-target sequence),
  weighted by ``self.lmd_sem`` (``cl_weight``, 0.1);
* the same-target sequence, ``sample_pos.append(np.random.choice(targets))`` over the other
  sequences with the same target (``all_index_same_id_wo_self``), the sequence itself when
  there is none (``sem_pos_seqs[null_index] = cur_data['item_id_list'][null_index]``);
* the negatives, ``mask_correlated_samples``: ``mask.fill_diagonal_(0)`` and ``mask[i,
  batch_size + i] = 0`` / ``mask[batch_size + i, i] = 0`` only, so every other view of the
  batch is a negative, including views of other sequences with the same next item.

``negatives`` selects the negatives: ``batch`` (default), the authors' code as quoted;
``other_targets`` also removes from the negatives the views of other sequences of the batch
whose next item is the same (they are positives of the supervised view in all but name). The
paper's abstract describes the sampling only as "sequences having the same target item are
chosen hard positive samples"; ``other_targets`` is an addition, offered because such views
are false negatives. On MovieLens-100K (seed 0, the other parameters the defaults, ``recforge
train duorec --data movielens-100k threads=1 seed=0 negatives=<n>``) validation NDCG@10 was
.1054 with ``batch`` and .1053 with ``other_targets`` (both best at epoch 23): in a batch of 128 users there,
about 18% of the sequences share their next item with another one, but each of them loses only
a few of its 254 negatives.

Deviations from the reference code: the next-item loss is the selectable SASRec loss (default
full-softmax cross-entropy at all positions of the sequence) and, with ``subseq=none``, a
sample is a user's whole training sequence, so the supervised positive is a user whose last
training item is the same; ``subseq=prefix`` gives the authors' setting where every prefix is
a sample; dropout defaults to 0.2 (the authors' ``seq.yaml``: ``hidden_dropout_prob: 0.5``,
``attn_dropout_prob: 0.5``; ``dropout=0.5`` restores it, which also strengthens the dropout
view).
"""

from __future__ import annotations

import numpy as np
import torch

from recforge.errors import ConfigError
from recforge.models.sequential.contrastive import ContrastiveSASRec
from recforge.training.losses import info_nce


NEGATIVES = ("batch", "other_targets")


class DuoRec(ContrastiveSASRec):
    name = "duorec"

    def __init__(self, augment: str = "none", negatives: str = "batch", **contrastive):
        super().__init__(augment=augment, **contrastive)
        if negatives not in NEGATIVES:
            raise ConfigError(f"negatives={negatives!r}: choose batch (every other view of the batch, the authors' "
                              f"code) or other_targets (also drop views whose next item is the same)")
        self.negatives = negatives

    def protocol_notes(self) -> dict:
        return super().protocol_notes() | {"negatives": self.negatives}

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
        if self.negatives == "other_targets":
            batch["label"] = torch.from_numpy(self._samples[rows, -1])
        return batch

    def extra_loss(self, batch, hidden):
        if "view" not in batch:
            return None
        z1 = self.last_state(batch["view"])
        z2 = self.last_state(batch["positive"])
        return self.cl_weight * info_nce(z1, z2, self.temperature, labels=batch.get("label"),
                                        similarity=self.similarity)
