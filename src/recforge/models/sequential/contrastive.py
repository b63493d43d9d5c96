"""Shared part of the contrastive SASRec variants (CL4SRec, DuoRec): the augmentation views.

``augment`` selects the view generator of :mod:`recforge.training.augment`: ``cl4srec``
(crop / mask / reorder) or ``ticoserec`` (the time-interval-aware operators; needs the
``timestamp`` column of the training data, which every dataset has, although a source without
real times only has positions and the operators then act at random), or ``none``. The rates
default (None) to the values of the chosen method's paper.

The contrastive term is ``cl_weight * InfoNCE`` (:func:`recforge.training.losses.info_nce`):
the sequence representations of a batch's paired views are compared all against all with
``similarity`` (``dot`` or ``cos``) divided by ``temperature``; only a view itself and its paired
view leave the negatives, as in the authors' ``mask_correlated_samples``.

**Authors' setting.** The CL4SRec and DuoRec code of Qiu et al. (RuihongQiu/DuoRec) computes the
similarity with ``sim`` and ``tau`` from its ``seq.yaml``::

    lmd: 0.1
    lmd_sem: 0.1
    tau: 1
    # choose from {dot, cos}
    sim: 'dot'

and runs both models with ``duorec.sh``: ``--sim='dot' --tau=1`` (``lmd: 0.1`` also in
``properties/model/CL4SRec.yaml`` and ``DuoRec.yaml``). ``similarity=dot temperature=1
cl_weight=0.1`` is that setting.

**Default: ``similarity=cos``, ``temperature=1``, not the authors' setting**, chosen for the
whole family (both models, every dataset) on validation NDCG@10 only. Runs: ``recforge train
<model> --data <data> threads=1 seed=0 similarity=<s> temperature=<t>``, the YAML defaults
otherwise; on MovieLens-100K (``--data movielens-100k``) with ``epochs=100`` (the YAML's 200 for
the two CL4SRec runs at temperature 1; no run there reached its cap, each stopped early after
10 epochs without gain); seed 0, leave-one-out,
full ranking; validation NDCG@10 at the best epoch (best epoch in brackets):

==============  ===========  ===========  ===========  ===========  ===========
MovieLens-100K  dot, 1       cos, 0.1     cos, 0.2     cos, 0.5     cos, 1
==============  ===========  ===========  ===========  ===========  ===========
CL4SRec         .0911 (69)   .0954 (22)   .0975 (18)   .0997 (18)   .1051 (25)
DuoRec          .0965 (76)   .0824 (27)   .0924 (25)   .1046 (23)   .1054 (23)
==============  ===========  ===========  ===========  ===========  ===========

Amazon Beauty (``--data amazon-beauty/Beauty.txt``, CL4SRec only, about 30 s an epoch):
cosine at temperature 1 .0709 (10; ``epochs=40``, stopped early); dot product at temperature 1
.0629 (21; ``epochs=25``, the cap reached, the figure flat at .062-.063 over epochs 20-25).

With the cosine, the lower the temperature (the stronger the contrastive term), the lower the
figure; the dot product learns much more slowly and ends below cosine at temperatures 0.5
and 1 for both models. Cosine at temperature 1 is the best setting for both models on
MovieLens-100K and ahead of the authors' dot product for CL4SRec on Beauty. A stronger term
does not close the gap to SASRec (``recforge train sasrec``, same data and seed, its own
defaults: validation NDCG@10 .1132 (33)). ``similarity=dot temperature=1`` restores the
authors' setting.
"""

from __future__ import annotations

import numpy as np
import torch

from recforge.errors import ConfigError
from recforge.models.sequential.sasrec import SASRec
from recforge.training.augment import (CL4SRecAugmenter, TiCoSeRecAugmenter, augment_batch, interval_variance,
                                       least_uniform, most_similar_items)

AUGMENTS = ("none", "cl4srec", "ticoserec")
RATE_DEFAULTS = {
    "cl4srec": {"crop_rate": 0.6, "mask_rate": 0.3, "reorder_rate": 0.6},
    "ticoserec": {"crop_rate": 0.4, "mask_rate": 0.7, "reorder_rate": 0.5, "substitute_rate": 0.2,
                  "insert_rate": 0.5},
}


class ContrastiveSASRec(SASRec):
    """SASRec with a mask token and augmented views; subclasses define ``extra_loss``."""

    extra_tokens = 1  # [MASK] = n_items + 1

    def __init__(self, augment: str = "cl4srec", cl_weight: float = 0.1, temperature: float = 1.0,
                 similarity: str = "cos",
                 crop_rate: float | None = None, mask_rate: float | None = None, reorder_rate: float | None = None,
                 substitute_rate: float | None = None, insert_rate: float | None = None,
                 aug_threshold: int = 12, keep_uniform: float = 0.15, **sasrec):
        super().__init__(**sasrec)
        if augment not in AUGMENTS:
            raise ConfigError(f"augment={augment!r}: choose one of {', '.join(AUGMENTS)}")
        if temperature <= 0:
            raise ConfigError(f"temperature={temperature}: must be > 0")
        if similarity not in ("dot", "cos"):
            raise ConfigError(f"similarity={similarity!r}: choose dot (the authors' code) or cos (the default)")
        self.augment, self.cl_weight, self.temperature = augment, cl_weight, temperature
        self.similarity = similarity
        self.crop_rate, self.mask_rate, self.reorder_rate = crop_rate, mask_rate, reorder_rate
        self.substitute_rate, self.insert_rate = substitute_rate, insert_rate
        self.aug_threshold, self.keep_uniform = aug_threshold, keep_uniform

    @property
    def needs_times(self) -> bool:
        return self.augment == "ticoserec"

    def _rate(self, name: str) -> float:
        value = getattr(self, name)
        return RATE_DEFAULTS[self.augment][name] if value is None else float(value)

    def protocol_notes(self) -> dict:
        notes = super().protocol_notes() | {"augment": self.augment, "cl_weight": self.cl_weight,
                                            "temperature": self.temperature, "similarity": self.similarity}
        if self.augment != "none":
            notes["augment_rates"] = {k: self._rate(k) for k in RATE_DEFAULTS[self.augment]}
        return notes

    def prepare_fit(self, split) -> None:
        super().prepare_fit(split)
        mask_id = self.n_items_ + 1
        self._augment_rows = None
        if self.augment == "cl4srec":
            self._augmenter = CL4SRecAugmenter(mask_id, **{k: self._rate(k) for k in RATE_DEFAULTS["cl4srec"]})
        elif self.augment == "ticoserec":
            indptr, items = split.train_sequences
            similar = most_similar_items(indptr, items, self.n_items_)
            self._augmenter = TiCoSeRecAugmenter(mask_id, similar, threshold=self.aug_threshold,
                                                 **{k: self._rate(k) for k in RATE_DEFAULTS["ticoserec"]})
            inputs = self._samples[:, :-1]
            var = interval_variance(self._times[:, :-1], (inputs > 0).sum(1))
            self._augment_rows = least_uniform(var, self.keep_uniform, np.random.default_rng(self.seed))
        else:
            self._augmenter = None

    def augmented_view(self, inp: np.ndarray, rows: np.ndarray, rng: np.random.Generator) -> torch.Tensor:
        """One augmented view (B, max_len) of the inputs ``inp`` of sample ``rows``."""
        times = self._times[rows][:, :-1] if self._times is not None else None
        which = self._augment_rows[rows] if self._augment_rows is not None else None
        return torch.from_numpy(augment_batch(self._augmenter, inp, times, rng, which, self.max_len))

    def last_state(self, seqs: torch.Tensor) -> torch.Tensor:
        """The sequence representation: the output at the last (most recent) position."""
        return self.encode(seqs)[:, -1]
