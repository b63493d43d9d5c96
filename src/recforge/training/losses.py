"""Next-item losses and the contrastive loss shared by the sequential models.

Every next-item loss takes the hidden states of the *target positions only* (``h``: (P, d), the
valid positions of a batch gathered beforehand), the output item table (``table``:
(n_items + 1, d), row 0 the padding item) and the target items (``targets``: (P,)). Logits are
computed once for those P rows; padded positions never reach a matmul, which is what keeps the
full softmax affordable.

* ``ce``: softmax cross-entropy over the whole catalogue (row 0 excluded);
* ``bce``: binary cross-entropy with ``k`` sampled negatives per position (``negatives``: (P, k)),
  ``-log σ(s⁺) - Σ_j log(1 - σ(s⁻_j))`` averaged over positions (SASRec's original loss for k=1);
* ``sampled_softmax``: softmax over the target and ``k`` negatives shared by the whole batch
  (``negatives``: (k,)) drawn from a proposal ``Q``; every logit is corrected by ``- log Q(item)``
  (the log-Q correction of sampled softmax), and a negative equal to the position's target is
  removed (accidental hit);
* ``gbce``: gSASRec's generalised BCE (Petrov & Macdonald, "gSASRec: Reducing Overconfidence in
  Sequential Recommendation Trained with Negative Sampling", RecSys 2023):
  ``-β log σ(s⁺) - Σ_j log(1 - σ(s⁻_j))`` with ``β = α (t (1 - 1/α) + 1/α)``, ``α = k / (n_items - 1)``
  the negative sampling rate and ``t`` the calibration parameter (t=0: plain BCE; t=1: β=α).
  Negatives are shared by the batch as for sampled softmax (accidental hits removed).

:func:`info_nce` is the InfoNCE / NT-Xent loss of contrastive sequence models (CL4SRec, DuoRec).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

LOSSES = ("ce", "bce", "sampled_softmax", "gbce")

#: the number of negatives each loss uses when the model leaves ``n_negatives`` unset
DEFAULT_NEGATIVES = {"ce": 0, "bce": 1, "sampled_softmax": 256, "gbce": 256}


#: logits buffer of the fused cross-entropy on a GPU (on the CPU: ``chunk_bytes``, cache-sized)
ACCELERATOR_CHUNK_BYTES = 256 << 20


def ce_loss(h: torch.Tensor, table: torch.Tensor, targets: torch.Tensor, chunk_bytes: int = 2 << 20) -> torch.Tensor:
    """Full-softmax cross-entropy over items 1..n (column 0, the padding item, is excluded).

    When gradients are needed, the loss runs through :class:`FusedLinearCrossEntropy`, which
    never materialises the (P, n_items + 1) logits: it works on chunks of rows that fit in
    ``chunk_bytes`` and computes the gradients during the forward pass."""
    if torch.is_grad_enabled() and (h.requires_grad or table.requires_grad):
        if h.device.type != "cpu":  # a GPU wants few large chunks (one kernel launch each), not cache-sized ones
            chunk_bytes = max(chunk_bytes, ACCELERATOR_CHUNK_BYTES)
        rows = max(16, chunk_bytes // (4 * table.shape[0]))
        if torch.is_autocast_enabled(h.device.type):
            # mixed precision: the fused softmax works in place on its buffers, so it runs in fp32
            with torch.autocast(h.device.type, enabled=False):
                return FusedLinearCrossEntropy.apply(h.float(), table.float(), targets, rows)
        return FusedLinearCrossEntropy.apply(h, table, targets, rows)
    logits = h @ table.T
    logits[:, 0] = -torch.inf
    return F.cross_entropy(logits, targets)


class FusedLinearCrossEntropy(torch.autograd.Function):
    """``mean_p CE(softmax(h_p · tableᵀ), target_p)`` with column 0 excluded, chunk by chunk.

    For each chunk of rows the logits go into one reused buffer (small enough to stay in cache,
    and no fresh multi-megabyte allocation per batch, whose page faults cost more than the
    matmul on small machines); the chunk's softmax minus the one-hot target is its gradient of
    the logits, from which the gradients of ``h`` and ``table`` are accumulated right away.
    ``backward`` only scales them: three matmuls in all, as for the unfused loss."""

    @staticmethod
    def forward(ctx, h, table, targets, rows):
        p, n = h.shape[0], table.shape[0]
        grad_h = torch.empty_like(h)
        grad_t = torch.zeros_like(table)
        acc = torch.float32 if h.device.type == "mps" else torch.float64  # Apple GPUs have no float64
        total = torch.zeros((), dtype=acc, device=h.device)
        buf = torch.empty(min(rows, max(p, 1)), n, dtype=h.dtype, device=h.device)
        at = torch.arange(min(rows, max(p, 1)), device=h.device)
        for s in range(0, p, rows):
            hc, tc = h[s : s + rows], targets[s : s + rows]
            m = hc.shape[0]
            logits = torch.mm(hc, table.T, out=buf[:m])
            logits[:, 0] = -torch.inf
            picked = logits.gather(1, tc.unsqueeze(1))
            top = logits.amax(1, keepdim=True)
            logits.sub_(top).exp_()  # softmax, in place, one exp per logit
            norm = logits.sum(1, keepdim=True)
            total += (norm.log() + top - picked).sum(dtype=acc)
            logits.div_(norm)
            logits[at[:m], tc] -= 1.0
            torch.mm(logits, table, out=grad_h[s : s + m])
            grad_t.addmm_(logits.T, hc)
        ctx.save_for_backward(grad_h, grad_t)
        ctx.p = max(p, 1)
        return (total / ctx.p).to(h.dtype)

    @staticmethod
    def backward(ctx, grad_out):
        grad_h, grad_t = ctx.saved_tensors
        scale = grad_out / ctx.p
        return grad_h * scale, grad_t * scale, None, None


def bce_loss(h: torch.Tensor, table: torch.Tensor, targets: torch.Tensor,
             negatives: torch.Tensor) -> torch.Tensor:
    """Binary cross-entropy with per-position negatives ``negatives`` (P, k)."""
    pos = (h * table[targets]).sum(-1)
    neg = torch.einsum("pd,pkd->pk", h, table[negatives])
    return (F.softplus(-pos) + F.softplus(neg).sum(-1)).mean()


def sampled_softmax_loss(h: torch.Tensor, table: torch.Tensor, targets: torch.Tensor,
                         negatives: torch.Tensor, log_q: torch.Tensor) -> torch.Tensor:
    """Sampled softmax with log-Q correction; ``negatives`` (k,) shared by all positions,
    ``log_q`` (n_items + 1,) the log proposal probability of every item."""
    pos = (h * table[targets]).sum(-1, keepdim=True) - log_q[targets].unsqueeze(1)
    neg = h @ table[negatives].T - log_q[negatives].unsqueeze(0)
    neg = neg.masked_fill(negatives.unsqueeze(0) == targets.unsqueeze(1), -torch.inf)
    logits = torch.cat([pos, neg], 1)
    return (torch.logsumexp(logits, 1) - logits[:, 0]).mean()


def gbce_beta(n_negatives: int, n_items: int, t: float) -> float:
    """gSASRec's exponent ``β`` of the positive probability."""
    alpha = n_negatives / max(n_items - 1, 1)
    return alpha * (t * (1.0 - 1.0 / alpha) + 1.0 / alpha)


def gbce_loss(h: torch.Tensor, table: torch.Tensor, targets: torch.Tensor, negatives: torch.Tensor,
              n_items: int, t: float) -> torch.Tensor:
    """Generalised BCE; ``negatives`` (k,) shared by all positions."""
    beta = gbce_beta(int(negatives.numel()), n_items, t)
    pos = (h * table[targets]).sum(-1)
    neg = h @ table[negatives].T
    hit = negatives.unsqueeze(0) == targets.unsqueeze(1)
    neg_term = F.softplus(neg).masked_fill(hit, 0.0).sum(-1)
    return (beta * F.softplus(-pos) + neg_term).mean()


def next_item_loss(name: str, h: torch.Tensor, table: torch.Tensor, targets: torch.Tensor,
                   negatives: torch.Tensor | None = None, log_q: torch.Tensor | None = None,
                   gbce_t: float = 0.75) -> torch.Tensor:
    """Dispatch on the loss name (one of :data:`LOSSES`)."""
    if name == "ce":
        return ce_loss(h, table, targets)
    if name == "bce":
        return bce_loss(h, table, targets, negatives)
    if name == "sampled_softmax":
        return sampled_softmax_loss(h, table, targets, negatives, log_q)
    if name == "gbce":
        return gbce_loss(h, table, targets, negatives, table.shape[0] - 1, gbce_t)
    raise ValueError(f"unknown loss {name!r}; choose one of {', '.join(LOSSES)}")


SIMILARITIES = ("dot", "cos")


def info_nce(z1: torch.Tensor, z2: torch.Tensor, temperature: float = 1.0,
             labels: torch.Tensor | None = None, similarity: str = "dot") -> torch.Tensor:
    """InfoNCE over a batch of pairs (NT-Xent): row ``i`` of ``z1`` and row ``i`` of ``z2`` are
    positives; the other ``2N - 2`` views of the batch are negatives.

    The ``2N`` views ``z = [z1; z2]`` are compared all against all (``similarity``: ``"dot"``, the
    inner product, or ``"cos"``, the cosine), the similarities are divided by ``temperature``,
    and view ``i`` is classified among the ``2N - 1`` views other than itself, its paired view
    being the right class; the loss is the mean over the ``2N`` views. This is the ``info_nce``
    of the CL4SRec and DuoRec code of Qiu et al. (``recbole/model/sequential_recommender/
    duorec.py`` and ``cl4srec.py`` of RuihongQiu/DuoRec)::

        if sim == 'cos':
            sim = nn.functional.cosine_similarity(z.unsqueeze(1), z.unsqueeze(0), dim=2) / temp
        elif sim == 'dot':
            sim = torch.mm(z, z.T) / temp
        ...
        mask = mask.fill_diagonal_(0)
        for i in range(batch_size):
            mask[i, batch_size + i] = 0
            mask[batch_size + i, i] = 0

    i.e. only the view itself (the diagonal) and the paired view (the positive, kept apart as
    the class) leave the negatives.

    ``labels`` (N,), when given, also removes views of *other* rows with the same label (e.g.
    the same next item) from the negatives, as false negatives; this is an addition to the
    authors' loss, used only on request (DuoRec's ``negatives=other_targets``).
    """
    if similarity not in SIMILARITIES:
        raise ValueError(f"similarity={similarity!r}: choose one of {', '.join(SIMILARITIES)}")
    n = z1.shape[0]
    z = torch.cat([z1, z2], 0)
    if similarity == "cos":
        z = F.normalize(z, dim=-1)
    sim = (z @ z.T) / temperature
    idx = torch.arange(2 * n, device=z.device)
    pos_idx = (idx + n) % (2 * n)
    blocked = torch.eye(2 * n, dtype=torch.bool, device=z.device)
    if labels is not None:
        lab = torch.cat([labels, labels])
        same = lab.unsqueeze(0) == lab.unsqueeze(1)
        same[idx, pos_idx] = False
        blocked |= same
    sim = sim.masked_fill(blocked, -torch.inf)
    return F.cross_entropy(sim, pos_idx)


def log_proposal(popularity, smoothing: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """Popularity proposal over items 1..n: ``q ∝ count + smoothing`` (``q[0] = 0``).

    Returns ``(cdf over items 1..n, log q over 0..n)``; ``log q[0]`` is a large negative number."""
    counts = torch.as_tensor(popularity, dtype=torch.float64).clone()
    counts[0] = 0.0
    w = counts + smoothing
    w[0] = 0.0
    q = w / w.sum()
    log_q = torch.log(q.clamp_min(1e-30)).to(torch.float32)
    cdf = torch.cumsum(q[1:], 0)
    cdf[-1] = 1.0
    return cdf, log_q

