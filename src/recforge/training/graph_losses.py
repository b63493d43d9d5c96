"""Pairwise ranking and contrastive losses for embedding models (graph or not).

All functions take scores or embeddings already gathered for a batch and return a scalar.

* :func:`bpr_loss` — Rendle et al., "BPR: Bayesian Personalized Ranking from Implicit
  Feedback", UAI 2009: ``mean(-log σ(s⁺ - s⁻))``.
* :func:`cpr_loss` — Wan et al., "Cross Pairwise Ranking for Unbiased Item Recommendation",
  WWW 2022. ``k`` observed pairs ``(u_1, i_1) .. (u_k, i_k)`` with distinct users and items form a
  group whose *cross* pairs ``(u_1, i_2), (u_2, i_3), .., (u_k, i_1)`` (a cyclic shift) are all
  unobserved; the loss is ``-log σ(mean_j s(u_j, i_j) - mean_j s(u_j, i_{j+1}))`` averaged over
  groups. The authors' code (``Qcactus/CPR``, ``recq/recommenders/cpr.py``) averages both sides
  over the ``k`` pairs (``tf.reduce_mean(..., axis=0)`` over the list of the ``k`` score vectors)::

      pos_scores.append(
          tf.reduce_mean(
              [inner_product(u, i) for u, i in zip(u_list, i_list)], axis=0
      ...
      neg_scores.append(
          tf.reduce_mean(
              [
                  inner_product(u, i)
                  for u, i in zip(u_list, i_list[1:] + [i_list[0]])

  and ``recq/utils/loss.py``: ``cpr_obj = pos_scores - neg_scores`` ...
  ``loss = tf.reduce_mean(tf.nn.softplus(cpr_obj_neg))`` with ``cpr_obj_neg = -cpr_obj``.
  ``reduce="mean"`` (default) follows that code; ``reduce="sum"`` is the unnormalised form
  ``Σ_j s(u_j, i_j) - Σ_j s(u_j, i_{j+1})`` (for ``k = 2``: ``s_{u1 i1} + s_{u2 i2} - s_{u1 i2} -
  s_{u2 i1}``), whose logit is ``k`` times larger; it is what this library computed before and is
  kept to reproduce those runs. User and item biases in the scores cancel between the two sides
  either way, which is the paper's argument for unbiasedness. :func:`sample_cpr_groups` builds
  groups from a batch of observed pairs by rejection (a group with an observed cross pair, or a
  repeated user or item, is redrawn). Deviations from the authors' code: one ``k`` per model (their
  default draws a mixture of ``k = 2`` and ``k = 3`` groups, ``--max_k_interact 3 --sample_ratio
  3``) and no "dynamic sampling" of the hardest groups (their ``--sample_rate`` > 1, ``tf.math.top_k``
  over ``-cpr_obj``).
* :func:`info_nce` — InfoNCE between two views with in-batch negatives: row ``r`` of view 1 and
  row ``r`` of view 2 are the positive pair, the other rows of view 2 the negatives; cosine
  similarity divided by a temperature ``τ``: ``L = mean_r [-s_rr/τ + log Σ_c exp(s_rc/τ)]``.
* :func:`info_nce_all` — the same with *every* node of the view as a candidate (SGL's code, see
  :mod:`recforge.models.graph.sgl`): the anchors are the batch's rows of view 1, the candidates
  all rows of view 2, ``L = mean_r [-s_{r,p(r)}/τ + log Σ_{c ∈ all} exp(s_rc/τ)]``.
* :func:`symmetric_contrastive_loss` — the symmetric contrastive loss of SGCL (Zhao et al.,
  "Symmetric Graph Contrastive Learning against Noisy Views for Recommendation", arXiv 2408.02691,
  2024; ACM TOIS 2025). Our reading: a view pair that shares little with the original graph is a
  *mislabelled* positive pair, and a loss is robust to such label noise when it is *symmetric*
  (Ghosh et al., AAAI 2017): its sum over every possible choice of the positive is a constant, so
  it cannot be lowered by fitting the wrong positive at the expense of the right one. The family
  runs from InfoNCE to a symmetric loss with an exponent ``q`` (robust InfoNCE, "RINCE", Chuang et
  al., CVPR 2022). The SGCL authors' code (``user683/SGCL``, ``util/loss_torch.py``)::

      similarity = torch.exp(torch.mm(out_1, out_2.t()) / temperature)
      neg = torch.sum(similarity, 1)
      pos = torch.exp(torch.sum(out_1 * out_2, dim=-1) / temperature)
      neg = ((lam * (pos + neg)) ** p) / p
      pos = -(pos ** p) / p

  i.e. ``L_r = [-(e_rr)^q + (λ (e_rr + Σ_c e_rc))^q] / q`` with ``e_rc = exp(cos_rc / τ)``: the
  positive is counted twice in the normaliser (once on its own, once inside the row sum).
  ``double_positive=True`` computes exactly that (the SGCL model's setting); the default
  ``False`` counts it once, as RINCE, which is the form with the symmetry property below:

  * ``q = 1`` and ``λ = 1/n`` (``n`` columns, ``lam=None``): ``L_r = -e_rr + mean_c e_rc``;
    summed over the ``n`` choices of the positive column it is exactly 0 whatever the
    embeddings, i.e. symmetric. Its gradient on a positive pair is proportional to ``e_rr``, so
    a dissimilar (noisy) pair pulls weakly, where InfoNCE pulls hardest on exactly those pairs;
  * ``q → 0`` tends to InfoNCE ``+ log λ``.

  ``scl_loss(view1, view2, 0.1, 0.01, self.temp)`` in the authors' ``model/graph/SGCL.py`` fixes
  ``λ = 0.1`` and ``q = 0.01``, close to the InfoNCE end. :mod:`recforge.models.graph.sgcl` is the
  authors' model; the same loss is also available inside SGL and SimGCL (``cl_loss=symmetric``,
  "SimGCL + symmetric loss"), a combination of ours that the SGCL authors did not publish. An
  earlier version of ours shifted the cosine by 1 (``exp((cos - 1)/τ)``) and defaulted to
  ``q = 1``: at ``τ = 0.2`` that scaled the term by ``e^{-5}`` and it learned far more slowly than
  SimGCL on Gowalla (BENCHMARKS.md).
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

CL_LOSSES = ("infonce", "symmetric")


def bpr_loss(pos: torch.Tensor, neg: torch.Tensor) -> torch.Tensor:
    """``mean(-log σ(pos - neg))``; ``neg`` may have an extra trailing axis (several negatives per
    positive), in which case every (positive, negative) pair counts once."""
    if neg.dim() == pos.dim() + 1:
        pos = pos.unsqueeze(-1)
    return F.softplus(neg - pos).mean()


CPR_REDUCTIONS = ("mean", "sum")


def cpr_loss(pos: torch.Tensor, cross: torch.Tensor, reduce: str = "mean") -> torch.Tensor:
    """Cross pairwise ranking: ``pos`` (G, k) scores of the observed pairs of each group,
    ``cross`` (G, k) scores of its cross (unobserved) pairs; ``mean(softplus(r(cross) - r(pos)))``
    with ``r`` the mean over the ``k`` pairs (the authors' code) or, ``reduce="sum"``, their sum."""
    if reduce == "mean":
        return F.softplus(cross.mean(-1) - pos.mean(-1)).mean()
    if reduce == "sum":
        return F.softplus(cross.sum(-1) - pos.sum(-1)).mean()
    raise ValueError(f"unknown CPR reduction {reduce!r}; choose one of {', '.join(CPR_REDUCTIONS)}")


def cross_items(items: np.ndarray) -> np.ndarray:
    """The item of each cross pair: row ``g`` of ``items`` (G, k) shifted cyclically by one, so
    user ``j`` of a group meets the item of user ``j + 1``."""
    return np.roll(items, -1, axis=1)


def sample_cpr_groups(pairs: np.ndarray, batch: np.ndarray, k: int, seen, rng: np.random.Generator,
                      max_rounds: int = 20) -> tuple[np.ndarray, np.ndarray]:
    """Groups of ``k`` observed pairs for :func:`cpr_loss`.

    ``pairs`` (P, 2) are all observed (user, item) pairs, ``batch`` the indices of this batch's
    pairs (cut to a multiple of ``k`` and reshaped into groups), ``seen`` a
    :class:`~recforge.training.samplers.SeenPairs`. A group is valid when its users are distinct,
    its items are distinct and every cross pair is unobserved; invalid groups are redrawn from all
    pairs up to ``max_rounds`` times and then dropped. Returns users and items, both (G, k)."""
    g = len(batch) // k
    idx = np.array(batch[: g * k], dtype=np.int64).reshape(g, k)  # a copy: redrawn in place
    for _ in range(max_rounds + 1):
        bad = _bad_groups(pairs, idx, seen)
        if not bad.any():
            break
        if _ == max_rounds:
            idx = idx[~bad]
            break
        idx[bad] = rng.integers(0, len(pairs), size=(int(bad.sum()), k))
    return pairs[idx, 0], pairs[idx, 1]


def _bad_groups(pairs: np.ndarray, idx: np.ndarray, seen) -> np.ndarray:
    users, items = pairs[idx, 0], pairs[idx, 1]
    k = idx.shape[1]
    if len(idx) == 0:
        return np.zeros(0, dtype=bool)
    obs = seen.contains(users.ravel(), cross_items(items).ravel()).reshape(users.shape).any(1)
    su, si = np.sort(users, 1), np.sort(items, 1)
    dup = np.zeros(len(idx), dtype=bool)
    if k > 1:
        dup = (np.diff(su, axis=1) == 0).any(1) | (np.diff(si, axis=1) == 0).any(1)
    return obs | dup


def _cosine_logits(z1: torch.Tensor, z2: torch.Tensor) -> torch.Tensor:
    return F.normalize(z1, dim=-1) @ F.normalize(z2, dim=-1).T


def info_nce(z1: torch.Tensor, z2: torch.Tensor, temperature: float = 0.2) -> torch.Tensor:
    """InfoNCE between two views (N, d): positives on the diagonal, the other rows of ``z2``
    negatives; cosine similarity over ``temperature``."""
    logits = _cosine_logits(z1, z2) / temperature
    return (torch.logsumexp(logits, 1) - logits.diagonal()).mean()


def info_nce_all(anchors: torch.Tensor, candidates: torch.Tensor, positive: torch.Tensor,
                 temperature: float = 0.2) -> torch.Tensor:
    """InfoNCE against every candidate: ``anchors`` (B, d) rows of view 1, ``candidates`` (N, d)
    all rows of view 2, ``positive`` (B,) the candidate row of each anchor's own node;
    ``mean_r [logsumexp_c(cos_rc / τ) - cos_{r,p(r)} / τ]``."""
    logits = _cosine_logits(anchors, candidates) / temperature
    pos = logits.gather(1, positive.view(-1, 1).long()).squeeze(1)
    return (torch.logsumexp(logits, 1) - pos).mean()


def symmetric_contrastive_loss(z1: torch.Tensor, z2: torch.Tensor, temperature: float = 0.2,
                               q: float = 1.0, lam: float | None = None,
                               double_positive: bool = False) -> torch.Tensor:
    """The symmetric contrastive loss (module docstring): ``[-(e_rr)^q + (λ Σ_c e_rc)^q] / q``
    averaged over rows, ``e_rc = exp(cos_rc / τ)``, ``q`` in (0, 1], ``λ`` 1/n when None;
    ``double_positive`` adds ``e_rr`` once more to the sum, as the SGCL authors' code."""
    if not 0.0 < q <= 1.0:
        raise ValueError(f"q={q} must be in (0, 1]")
    t = _cosine_logits(z1, z2) / temperature
    lam = 1.0 / t.shape[1] if lam is None else float(lam)
    if double_positive:
        total = torch.logaddexp(torch.logsumexp(t, 1), t.diagonal())
    else:
        total = torch.logsumexp(t, 1)
    pos = torch.exp(q * t.diagonal())
    neg = torch.exp(q * (np.log(lam) + total))
    return ((neg - pos) / q).mean()


def contrastive_loss(kind: str, z1: torch.Tensor, z2: torch.Tensor, temperature: float,
                     q: float = 1.0, lam: float | None = None) -> torch.Tensor:
    """Dispatch on ``kind`` (one of :data:`CL_LOSSES`)."""
    if kind == "infonce":
        return info_nce(z1, z2, temperature)
    if kind == "symmetric":
        return symmetric_contrastive_loss(z1, z2, temperature, q, lam)
    raise ValueError(f"unknown contrastive loss {kind!r}; choose one of {', '.join(CL_LOSSES)}")
