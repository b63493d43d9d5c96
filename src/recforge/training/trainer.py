"""The shared training loop for PyTorch models.

Mini-batches from the model, Adam, a learning-rate schedule updated at every batch, periodic
validation by full ranking, early stopping on a validation metric (default NDCG@10) with the best
weights kept, a progress bar with rate and time left, and Ctrl-C that stops cleanly with the best
weights restored. A loss that is not finite stops training at once with a :class:`TrainingError`
(weights that produced it are never kept or evaluated).

Batches are moved to the model's device and the loss runs under the model's precision
(:mod:`recforge.training.device`). A model with an ``after_step(batch, lr)`` method is called after
every optimiser step (ALPT's low-precision tables are updated there).

Checkpoints: with a ``checkpoint_dir``, ``last.pt`` is written after every epoch (network,
optimiser, gradient scaler, every random generator the run draws from, the early-stopping counters,
the curve so far and the best weights) and ``best.pt`` at every new best; both are written to a
temporary file and renamed, so a crash never leaves a torn checkpoint. ``resume_from=last.pt``
continues from the epoch after it, and ends with the same weights and metrics as a run that was
never interrupted; its history's ``resumed`` names the checkpoint's epoch and the
seconds counted before it.
"""

from __future__ import annotations

import copy
import logging
import math
import os
import random
import time
from pathlib import Path
from dataclasses import dataclass, field

import numpy as np
import torch
from tqdm.auto import tqdm

from recforge.errors import RecForgeError, TrainingError
from recforge.training import distributed
from recforge.training.device import autocast, grad_scaler, to_device

LR_SCHEDULES = ("constant", "cosine", "step", "plateau")
LR_STEP_UNITS = ("epoch", "update")  # what lr_step counts under lr_schedule=step
CHECKPOINT_VERSION = 1

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
    #: for a resumed run: the epoch of the checkpoint it continued from and the seconds counted before it
    resumed: dict | None = None

    def as_dict(self) -> dict:
        return {"best_epoch": self.best_epoch, "best_metric": self.best_metric,
                "interrupted": self.interrupted, "stopped_early": self.stopped_early,
                "seconds": round(self.seconds, 2), **({"resumed": self.resumed} if self.resumed else {}),
                "epochs": self.epochs}


def lr_factor(model, t: float, updates_per_epoch: int = 1) -> float:
    """The multiplier of ``model.lr`` at training time ``t`` (in epochs, 0 = start); an epoch is
    ``updates_per_epoch`` optimiser updates (``lr_step_unit=update`` counts those)."""
    warm = float(model.warmup_epochs or 0.0)
    f = min(1.0, (t + 1e-12) / warm) if warm > 0 else 1.0
    if model.lr_schedule == "cosine":
        span = max(float(model.epochs) - warm, 1e-12)
        progress = min(max(t - warm, 0.0) / span, 1.0)
        f *= 0.5 * (1.0 + math.cos(math.pi * progress))
    elif model.lr_schedule == "step":
        x = max(t, 0.0)
        if getattr(model, "lr_step_unit", "epoch") == "update":
            x = math.floor(x * updates_per_epoch + 1e-6)  # updates done so far
        f *= float(model.lr_gamma) ** int(x // max(int(model.lr_step), 1))
    return f


def plateau_drops(epochs: list[dict], metric: str) -> int:
    """The validations so far that did not improve on the best before them: ``lr_schedule=plateau``
    multiplies the rate by ``lr_gamma`` after each (from the history, so a resumed run agrees)."""
    best, drops = -math.inf, 0
    for row in epochs:
        if row.get(metric) is None:
            continue
        if row[metric] > best:
            best = row[metric]
        else:
            drops += 1
    return drops


def rng_state(model, rng: np.random.Generator) -> dict:
    """Every random generator a training run draws from."""
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state(),
             "trainer": rng.bit_generator.state,
             "model": {k: v.bit_generator.state for k, v in vars(model).items() if isinstance(v, np.random.Generator)}}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(model, rng: np.random.Generator, state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    rng.bit_generator.state = state["trainer"]
    for k, v in state.get("model", {}).items():
        gen = np.random.default_rng()
        gen.bit_generator.state = v
        setattr(model, k, gen)
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def atomic_save(obj, path: Path) -> None:
    """``torch.save`` to a temporary file in the same folder, then an atomic rename."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def load_checkpoint(path: str | Path) -> dict:
    path = Path(path)
    if path.is_dir():
        path = path / "checkpoints" / "last.pt" if (path / "checkpoints").is_dir() else path / "last.pt"
    if not path.exists():
        raise RecForgeError(f"{path}: no checkpoint to resume from; give a run folder trained with checkpoints "
                            "(recforge train writes RUN/checkpoints/last.pt after every epoch)")
    blob = torch.load(path, map_location="cpu", weights_only=False)
    if not isinstance(blob, dict) or blob.get("version") != CHECKPOINT_VERSION:
        raise RecForgeError(f"{path}: not a checkpoint of this version of recforge")
    return blob


def nonfinite_message(model, epoch: int, batch: int, value: float) -> str:
    """One line naming the epoch, the loss and what to try."""
    return (f"training of {model.name} stopped: the loss is {value} at epoch {epoch}, batch {batch}; "
            f"try a lower learning rate (lr={model.lr:g} now, e.g. lr={model.lr / 10:g}), weight decay, or a "
            "smaller weight on auxiliary losses, and check the data for extreme values")


class Trainer:
    """Runs ``model.train_batches`` / ``model.loss`` for a :class:`TorchRecommender`."""

    def __init__(self, model, split, valid=None, verbose: bool = True, checkpoint_dir=None, resume_from=None):
        self.model, self.split, self.valid, self.verbose = model, split, valid, verbose
        self.checkpoint_dir = Path(checkpoint_dir) if checkpoint_dir else None
        self.resume_from = resume_from

    def _validate(self) -> dict[str, float]:
        from recforge.evaluation.evaluator import evaluate

        net = self.model.net_
        net.eval()
        if callable(getattr(self.model, "validate", None)):  # a model with its own validation (CTR: AUC)
            metrics = self.model.validate(self.valid)
        else:  # full ranking under the run's exclusion and tie rule (valid_protocol, set by the caller)
            metrics = evaluate(self.model, self.valid, ks=self.model.valid_ks(), groups=False,
                               protocol=getattr(self.model, "valid_protocol", None),
                               batch_size=self.model.eval_batch_size).metrics
        net.train()
        return metrics

    def _checkpoint(self, epoch, opt, scaler, rng, hist, best_state, bad) -> dict:
        m = self.model
        return {"version": CHECKPOINT_VERSION, "model": m.name, "epoch": epoch, "net": m.net_.state_dict(),
                "optimizer": opt.state_dict(), "scaler": scaler.state_dict() if scaler is not None else None,
                "rng": rng_state(m, rng), "train_state": m.train_state(), "bad": bad,
                "history": {"epochs": hist.epochs, "best_epoch": hist.best_epoch, "best_metric": hist.best_metric,
                            "seconds": hist.seconds},
                "best": best_state}

    def _resume(self, opt, scaler, rng, hist) -> tuple[int, dict, int]:
        m = self.model
        blob = load_checkpoint(self.resume_from)
        if blob["model"] != m.name:
            raise RecForgeError(f"{self.resume_from}: a checkpoint of {blob['model']}, not of {m.name}")
        m.net_.load_state_dict(blob["net"])
        opt.load_state_dict(blob["optimizer"])
        if scaler is not None and blob.get("scaler"):
            scaler.load_state_dict(blob["scaler"])
        set_rng_state(m, rng, blob["rng"])
        m.load_train_state(blob.get("train_state") or {})
        h = blob["history"]
        hist.epochs, hist.best_epoch, hist.best_metric = list(h["epochs"]), h["best_epoch"], h["best_metric"]
        hist.seconds = h.get("seconds", 0.0)
        hist.resumed = {"after_epoch": int(blob["epoch"]), "seconds_before": round(hist.seconds, 2)}
        log.info("resumed from %s after epoch %d", self.resume_from, blob["epoch"])
        return blob["epoch"], blob["best"], blob["bad"]

    def run(self) -> TrainHistory:
        m = self.model
        net = m.net_
        device, precision = m.device_, m.precision
        # a model may bring its own optimiser and step (multi-task AdaTask); Adam otherwise
        make = getattr(m, "make_optimizer", None)
        opt = make() if callable(make) else None
        own_step = getattr(m, "optimizer_step", None) if opt is not None else None
        if opt is None:
            opt = torch.optim.Adam(net.parameters(), lr=m.lr, weight_decay=m.weight_decay)
        after_step = getattr(m, "after_step", None)  # work of the model after each step (ALPT's integer tables)
        scaler = grad_scaler(device, precision)
        rng = np.random.default_rng(m.seed)
        rank, n_proc = distributed.world()
        ddp = distributed.wrap(m) if n_proc > 1 else None
        ckpt_dir = self.checkpoint_dir if rank == 0 else None  # only rank 0 writes
        verbose = self.verbose and rank == 0
        hist = TrainHistory()
        best_state = copy.deepcopy(net.state_dict())
        bad, done = 0, 0
        if self.resume_from:
            done, best_state, bad = self._resume(opt, scaler, rng, hist)
        if ckpt_dir is not None:
            ckpt_dir.mkdir(parents=True, exist_ok=True)
        t0 = time.perf_counter() - hist.seconds
        metric = m.valid_metric
        epoch_bar = tqdm(range(done + 1, m.epochs + 1), desc=f"{m.name}", unit="epoch", disable=not verbose,
                         dynamic_ncols=True, initial=done, total=m.epochs)
        stop = self.valid is not None and done > 0 and bad >= m.patience
        try:
            for epoch in ([] if stop else epoch_bar):
                net.train()
                te = time.perf_counter()
                total, n_batches = 0.0, 0
                n_expected = max(1, m.n_train_batches(self.split))
                bar = tqdm(m.train_batches(self.split, rng), total=n_expected, leave=False, unit="batch",
                           desc=f"epoch {epoch}", disable=not verbose, dynamic_ncols=True)
                drop = float(m.lr_gamma) ** plateau_drops(hist.epochs, metric) if m.lr_schedule == "plateau" else 1.0
                for batch in bar:
                    if m.lr_schedule != "constant" or m.warmup_epochs:
                        f = lr_factor(m, epoch - 1 + min(n_batches / n_expected, 1.0), n_expected) * drop
                        for group in opt.param_groups:
                            group["lr"] = m.lr * f
                    batch = to_device(batch, device)
                    opt.zero_grad(set_to_none=True)
                    with autocast(device, precision):
                        loss = ddp(batch) if ddp is not None else m.loss(batch)
                    # in data-parallel training every process sees the mean, so a non-finite loss stops all alike
                    value = distributed.all_mean(float(loss.detach())) if ddp is not None else float(loss.detach())
                    if not math.isfinite(value):
                        raise TrainingError(nonfinite_message(m, epoch, n_batches + 1, value))
                    if scaler is not None:
                        scaler.scale(loss).backward()
                        scaler.step(opt)
                        scaler.update()
                    elif callable(own_step):
                        own_step(loss, opt)
                    else:
                        loss.backward()
                        opt.step()
                    if callable(after_step):
                        after_step(batch, opt.param_groups[0]["lr"])
                    total += value
                    n_batches += 1
                    if n_batches % 20 == 0:
                        bar.set_postfix(loss=f"{total / n_batches:.4f}")
                bar.close()
                row = {"epoch": epoch, "loss": total / max(1, n_batches), "train_seconds": round(time.perf_counter() - te, 2)}
                if m.lr_schedule != "constant" or m.warmup_epochs:
                    row["lr"] = opt.param_groups[0]["lr"]
                if self.valid is not None and (epoch % m.eval_every == 0 or epoch == m.epochs):
                    tv = time.perf_counter()
                    vm = self._validate()
                    row["valid_seconds"] = round(time.perf_counter() - tv, 2)
                    row[metric] = vm[metric]
                    if vm[metric] > hist.best_metric:
                        hist.best_metric, hist.best_epoch = vm[metric], epoch
                        best_state = copy.deepcopy(net.state_dict())
                        bad = 0
                        if ckpt_dir is not None:
                            atomic_save({"version": CHECKPOINT_VERSION, "model": m.name, "epoch": epoch,
                                         metric: vm[metric], "net": best_state}, ckpt_dir / "best.pt")
                    else:
                        bad += 1
                    epoch_bar.set_postfix({"loss": f"{row['loss']:.4f}", metric: f"{vm[metric]:.4f}",
                                           "best": f"{hist.best_metric:.4f}@{hist.best_epoch}"})
                else:
                    epoch_bar.set_postfix(loss=f"{row['loss']:.4f}")
                hist.epochs.append(row)
                log.info("epoch %s", row)
                if ckpt_dir is not None:
                    hist.seconds = time.perf_counter() - t0
                    atomic_save(self._checkpoint(epoch, opt, scaler, rng, hist, best_state, bad),
                                ckpt_dir / "last.pt")
                for cb in getattr(m, "callbacks", None) or ():
                    cb(epoch, row)
                if self.valid is not None and bad >= m.patience:
                    hist.stopped_early = True
                    break
            if stop:
                hist.stopped_early = True
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
