"""The fused (torch.compile) counting kernel must agree exactly with eager PyTorch."""

from __future__ import annotations

import pytest
import torch

from recforge.evaluation import metrics


def test_fused_counts_equal_eager(monkeypatch):
    monkeypatch.setenv("RECFORGE_COMPILE", "1")
    monkeypatch.setattr(metrics, "_compiled", None)
    g = torch.Generator().manual_seed(0)
    scores = torch.randint(0, 50, (37, 301), generator=g).float()  # many ties
    scores[:, 0] = -torch.inf
    s = scores[:, 5:6].clone()
    fused = metrics._count_ahead(scores, s)
    if metrics._compiled is False:
        pytest.skip("torch.compile is not available on this machine; the eager path is used")
    eager = metrics._count_ahead_eager(scores, s)
    assert torch.equal(fused[0], eager[0]) and torch.equal(fused[1], eager[1])
    targets = torch.randint(1, 301, (37, 1), generator=g)
    ranks_fused = metrics.target_ranks(scores, targets)
    monkeypatch.setattr(metrics, "_compiled", False)
    assert torch.equal(ranks_fused, metrics.target_ranks(scores, targets))
