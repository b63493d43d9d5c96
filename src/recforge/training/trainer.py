"""The shared training loop for PyTorch models.

Mini-batches from the model, Adam, periodic validation by full ranking, early stopping on a
validation metric (default NDCG@10) with the best weights kept, a progress bar with rate and
time left, and Ctrl-C that stops cleanly with the best weights restored. A loss that is not
finite stops training at once with a :class:`TrainingError` (weights that produced it are never
kept or evaluated).
"""

from __future__ import annotations

import copy
import logging
import math
import random
import time
from dataclasses import dataclass, field

import numpy as np
import torch
from tqdm.auto import tqdm

from recforge.errors import TrainingError

log = logging.getLogger("recforge.train")


def set_seed(seed: int) -> None:
    """Seed Python, NumPy and PyTorch."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


@dataclass
class TrainHistory:
    epochs: list[dict] = field(default_factory=list)
    best_epoch: int = 0
    best_metric: float = -math.inf
    interrupted: bool = False
    stopped_early: bool = False
    seconds: float = 0.0

    def as_dict(self) -> dict:
        return {"best_epoch": self.best_epoch, "best_metric": self.best_metric,
                "interrupted": self.interrupted, "stopped_early": self.stopped_early,
                "seconds": round(self.seconds, 2), "epochs": self.epochs}


def nonfinite_message(model, epoch: int, batch: int, value: float) -> str:
    """One line naming the epoch, the loss and what to try."""
    return (f"training of {model.name} stopped: the loss is {value} at epoch {epoch}, batch {batch}; "
            f"try a lower learning rate (lr={model.lr:g} now, e.g. lr={model.lr / 10:g}), weight decay, or a "
            "smaller weight on auxiliary losses, and check the data for extreme values")


class Trainer:
    """Runs ``model.train_batches`` / ``model.loss`` for a :class:`TorchRecommender`."""

    def __init__(self, model, split, valid=None, verbose: bool = True):
        self.model, self.split, self.valid, self.verbose = model, split, valid, verbose

    def _validate(self) -> dict[str, float]:
        from recforge.evaluation.evaluator import evaluate

        net = self.model.net_
        net.eval()
        res = evaluate(self.model, self.valid, ks=self.model.valid_ks(), groups=False,
                       batch_size=self.model.eval_batch_size)
        net.train()
        return res.metrics

    def run(self) -> TrainHistory:
        m = self.model
        net = m.net_
        opt = torch.optim.Adam(net.parameters(), lr=m.lr, weight_decay=m.weight_decay)
        rng = np.random.default_rng(m.seed)
        hist = TrainHistory()
        best_state = copy.deepcopy(net.state_dict())
        bad = 0
        t0 = time.perf_counter()
        metric = m.valid_metric
        epoch_bar = tqdm(range(1, m.epochs + 1), desc=f"{m.name}", unit="epoch", disable=not self.verbose,
                         dynamic_ncols=True)
        try:
            for epoch in epoch_bar:
                net.train()
                te = time.perf_counter()
                total, n_batches = 0.0, 0
                n_expected = m.n_train_batches(self.split)
                bar = tqdm(m.train_batches(self.split, rng), total=n_expected, leave=False, unit="batch",
                           desc=f"epoch {epoch}", disable=not self.verbose, dynamic_ncols=True)
                for batch in bar:
                    opt.zero_grad(set_to_none=True)
                    loss = m.loss(batch)
                    value = float(loss.detach())
                    if not math.isfinite(value):
                        raise TrainingError(nonfinite_message(m, epoch, n_batches + 1, value))
                    loss.backward()
                    opt.step()
                    total += value
                    n_batches += 1
                    if n_batches % 20 == 0:
                        bar.set_postfix(loss=f"{total / n_batches:.4f}")
                bar.close()
                row = {"epoch": epoch, "loss": total / max(1, n_batches), "train_seconds": round(time.perf_counter() - te, 2)}
                if self.valid is not None and (epoch % m.eval_every == 0 or epoch == m.epochs):
                    tv = time.perf_counter()
                    vm = self._validate()
                    row["valid_seconds"] = round(time.perf_counter() - tv, 2)
                    row[metric] = vm[metric]
                    if vm[metric] > hist.best_metric:
                        hist.best_metric, hist.best_epoch = vm[metric], epoch
                        best_state = copy.deepcopy(net.state_dict())
                        bad = 0
                    else:
                        bad += 1
                    epoch_bar.set_postfix({"loss": f"{row['loss']:.4f}", metric: f"{vm[metric]:.4f}",
                                           "best": f"{hist.best_metric:.4f}@{hist.best_epoch}"})
                else:
                    epoch_bar.set_postfix(loss=f"{row['loss']:.4f}")
                hist.epochs.append(row)
                log.info("epoch %s", row)
                if self.valid is not None and bad >= m.patience:
                    hist.stopped_early = True
                    break
        except KeyboardInterrupt:
            hist.interrupted = True
            log.warning("interrupted: keeping the best weights so far (epoch %d)", hist.best_epoch)
        finally:
            epoch_bar.close()
        if self.valid is not None and hist.best_epoch > 0:
            net.load_state_dict(best_state)
        else:
            hist.best_epoch = len(hist.epochs)
        hist.seconds = time.perf_counter() - t0
        net.eval()
        return hist
