"""The loop both self-supervised pre-trainings of CTR models run (MAP's field corruption in
:mod:`recforge.models.ctr.map`, the language-model alignment of FLIP / ClickPrompt in
:mod:`recforge.models.ctr.plm`): shuffled batches of training rows without their labels, the
learning rate of each parameter group on a cosine from its base value to zero over every step,
a non-finite loss stops the run with one clear message, and per-epoch means are recorded.
"""

from __future__ import annotations

import math
import time
from typing import Callable

import numpy as np
import torch


def pretrain_epochs(*, rows: np.ndarray, epochs: int, batch_size: int, rng: np.random.Generator,
                    opt: torch.optim.Optimizer, base_lrs: list[float], batch_of: Callable, loss_of: Callable,
                    device: torch.device, precision: str, problem: str,
                    after_step: Callable[[float], None] | None = None,
                    on_epoch: Callable[[dict], None] | None = None) -> tuple[list[dict], int]:
    """``epochs`` passes over ``rows`` (training-row indices) in shuffled batches of ``batch_size``
    (indices sorted within a batch; a last batch of one row is skipped).

    ``batch_of(idx)`` gives the batch (its ``label`` is dropped: the pre-training is
    self-supervised); ``loss_of(batch)`` runs under autocast and returns the loss tensor and a dict
    of named parts (floats) to record beside it. ``opt.param_groups[g]["lr"]`` is
    ``base_lrs[g]`` times the cosine factor of the step, which ``after_step`` also receives;
    ``on_epoch`` receives each epoch's record as it ends.
    ``problem`` is the message of the error a non-finite loss raises (``{loss}`` and ``{epoch}``
    are filled in). Returns one record per epoch (the mean loss and parts, the steps and the
    seconds) and the number of steps taken."""
    from recforge.errors import TrainingError
    from recforge.training.device import autocast, to_device

    n, bs = len(rows), int(batch_size)
    total = max(1, int(epochs) * max(1, math.ceil(n / bs)))
    records, step = [], 0
    for epoch in range(1, int(epochs) + 1):
        t0, sums, count = time.perf_counter(), {}, 0
        order = rows[rng.permutation(n)]
        for s in range(0, n, bs):
            idx = np.sort(order[s : s + bs])
            if len(idx) < 2:
                continue
            batch = to_device(batch_of(idx), device)
            batch.pop("label", None)
            f = 0.5 * (1 + math.cos(math.pi * step / total))
            for g, base in zip(opt.param_groups, base_lrs):
                g["lr"] = float(base) * f
            opt.zero_grad(set_to_none=True)
            with autocast(device, precision):
                loss, parts = loss_of(batch)
            value = float(loss.detach())
            if not math.isfinite(value):
                raise TrainingError(problem.format(loss=value, epoch=epoch))
            loss.backward()
            opt.step()
            if after_step is not None:
                after_step(f)
            step += 1
            count += 1
            for k, v in {"loss": value, **parts}.items():
                sums[k] = sums.get(k, 0.0) + float(v)
        means = {k: round(v / count, 5) for k, v in sums.items()} if count else {"loss": float("nan")}
        records.append({"epoch": epoch, **means, "steps": count, "seconds": round(time.perf_counter() - t0, 2)})
        if on_epoch is not None:
            on_epoch(records[-1])
    return records, step
