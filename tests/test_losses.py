"""Next-item and contrastive losses against formulas worked by hand on tiny cases."""

import math

import pytest
import torch
import torch.nn.functional as F

from recforge.training.losses import (FusedLinearCrossEntropy, bce_loss, ce_loss, gbce_beta, gbce_loss, info_nce,
                                      log_proposal, next_item_loss, sampled_softmax_loss)

# Two positions, a catalogue of two items plus padding (column 0): with an identity item table
# the hidden states are the logits themselves.
LOGITS = torch.tensor([[0.3, 1.0, -0.5], [2.0, 0.2, 0.7]])
TABLE = torch.eye(3)
TARGETS = torch.tensor([1, 2])


def sig(x):
    return 1.0 / (1.0 + math.exp(-x))


def test_ce_by_hand():
    # row 0: items 1, 2 have logits 1.0, -0.5; target 1. Row 1: 0.2, 0.7; target 2. Column 0 ignored.
    r0 = -math.log(math.exp(1.0) / (math.exp(1.0) + math.exp(-0.5)))
    r1 = -math.log(math.exp(0.7) / (math.exp(0.2) + math.exp(0.7)))
    with torch.no_grad():
        got = ce_loss(LOGITS, TABLE, TARGETS)
    assert got.item() == pytest.approx((r0 + r1) / 2, rel=1e-6)
    h = LOGITS.clone().requires_grad_()
    assert ce_loss(h, TABLE, TARGETS).item() == pytest.approx((r0 + r1) / 2, rel=1e-6)  # fused path


def test_fused_ce_matches_autograd_over_chunks():
    torch.manual_seed(0)
    h = torch.randn(37, 8, requires_grad=True)
    t = torch.randn(50, 8, requires_grad=True)
    y = torch.randint(1, 50, (37,))
    loss = FusedLinearCrossEntropy.apply(h, t, y, 5)  # 8 chunks, the last one short
    (2.0 * loss).backward()
    gh, gt = h.grad.clone(), t.grad.clone()
    h.grad = t.grad = None
    logits = (h @ t.T).masked_fill(torch.arange(50) == 0, -torch.inf)
    ref = F.cross_entropy(logits, y)
    (2.0 * ref).backward()
    assert loss.item() == pytest.approx(ref.item(), rel=1e-5)
    assert torch.allclose(gh, h.grad, atol=1e-6)
    assert torch.allclose(gt, t.grad, atol=1e-6)
    assert float(t.grad[0].abs().max()) == 0.0  # the padding row gets no gradient


def test_bce_by_hand():
    neg = torch.tensor([[2], [1]])
    r0 = -math.log(sig(1.0)) - math.log(1 - sig(-0.5))
    r1 = -math.log(sig(0.7)) - math.log(1 - sig(0.2))
    assert bce_loss(LOGITS, TABLE, TARGETS, neg).item() == pytest.approx((r0 + r1) / 2, rel=1e-6)


def test_sampled_softmax_by_hand():
    log_q = torch.log(torch.tensor([1e-9, 0.25, 0.75]))
    neg = torch.tensor([2, 1])  # shared; row 1's target 2 is an accidental hit and is dropped
    # row 0: candidates target 1 (1.0 - log .25), negatives 2 (-0.5 - log .75), 1 is a hit -> dropped
    a = 1.0 - math.log(0.25)
    b = -0.5 - math.log(0.75)
    r0 = -(a - math.log(math.exp(a) + math.exp(b)))
    # row 1: target 2 (0.7 - log .75), negatives: 2 dropped (hit), 1 (0.2 - log .25)
    c = 0.7 - math.log(0.75)
    d = 0.2 - math.log(0.25)
    r1 = -(c - math.log(math.exp(c) + math.exp(d)))
    got = sampled_softmax_loss(LOGITS, TABLE, TARGETS, neg, log_q)
    assert got.item() == pytest.approx((r0 + r1) / 2, rel=1e-6)


def test_gbce_by_hand():
    n_items, t = 2, 0.75
    neg = torch.tensor([2])  # one shared negative; it is row 1's target (hit, dropped)
    beta = gbce_beta(1, n_items, t)
    alpha = 1 / (n_items - 1)
    assert beta == pytest.approx(alpha * (t * (1 - 1 / alpha) + 1 / alpha))
    r0 = -beta * math.log(sig(1.0)) - math.log(1 - sig(-0.5))
    r1 = -beta * math.log(sig(0.7))
    assert gbce_loss(LOGITS, TABLE, TARGETS, neg, n_items, t).item() == pytest.approx((r0 + r1) / 2, rel=1e-6)


def test_gbce_beta_limits():
    # t = 0: plain BCE (beta 1); t = 1: beta equals the sampling rate alpha = k / (n - 1)
    assert gbce_beta(256, 12101, 0.0) == pytest.approx(1.0)
    assert gbce_beta(256, 12101, 1.0) == pytest.approx(256 / 12100)
    assert 256 / 12100 < gbce_beta(256, 12101, 0.75) < 1.0


def test_dispatch_and_unknown():
    with torch.no_grad():
        assert next_item_loss("ce", LOGITS, TABLE, TARGETS).item() == pytest.approx(ce_loss(LOGITS, TABLE, TARGETS).item())
    with pytest.raises(ValueError):
        next_item_loss("nope", LOGITS, TABLE, TARGETS)


def test_info_nce_by_hand():
    z1 = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    z2 = torch.tensor([[1.0, 1.0], [0.0, 2.0]])
    z = torch.cat([z1, z2])
    sim = z @ z.T
    total = 0.0
    for i in range(4):
        pos = (i + 2) % 4
        others = [j for j in range(4) if j != i]
        total += -(sim[i, pos] - torch.logsumexp(sim[i, others], 0)).item()
    assert info_nce(z1, z2, 1.0).item() == pytest.approx(total / 4, rel=1e-6)
    # same labels: the other pair is a false negative and is removed, leaving only the positive
    assert info_nce(z1, z2, 1.0, labels=torch.tensor([5, 5])).item() == pytest.approx(0.0, abs=1e-6)
    # temperature divides the similarities
    assert info_nce(z1, z2, 0.5).item() == pytest.approx(info_nce(2 ** 0.5 * z1, 2 ** 0.5 * z2, 1.0).item(), rel=1e-5)


def test_log_proposal():
    cdf, log_q = log_proposal([0, 3, 1], smoothing=0.0)
    assert torch.allclose(log_q[1:].exp(), torch.tensor([0.75, 0.25]))
    assert cdf.tolist() == pytest.approx([0.75, 1.0])
