"""The base of multi-task CTR models: one output per label, label checks, the AdaTask optimizer.

A :class:`MultiTaskCTRModel` predicts every label of the schema (``self.labels_``, in order) with
a network of shared and task-specific parts; the loss is the base one (binary cross-entropy per
label, mean over labels). A model needs at least ``min_labels`` labels (``exact_labels`` when it
needs a fixed number); otherwise fitting stops with one :class:`ConfigError`.

``optimizer``: ``adam`` (the trainer's Adam) or ``adatask`` (:mod:`recforge.training.adatask`:
per-task Adam moments on every parameter, so a shared parameter's update is the sum of one
normalised step per task, while a parameter only one task reaches gets plain Adam). With
``adatask`` the model takes the optimisation step itself, inside :meth:`loss`: one backward pass
per task (``torch.autograd.grad``), the AdaTask step with the trainer's learning-rate schedule
(``lr_factor`` at the same point of training), and a returned loss value that is detached from
the network, so the trainer's own backward pass and Adam step touch no parameter. Its moments are
saved with the training state, so ``resume_from`` continues exactly. Not supported with it:
``precision=fp16`` (the gradient scaler needs the trainer's step) and data-parallel training.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from recforge.errors import ConfigError
from recforge.models.ctr.base import CTRModel, mlp

OPTIMIZERS = ("adam", "adatask")


def tower(in_dim: int, hidden: list[int], model) -> nn.Sequential:
    """A task tower: an MLP ending in one logit."""
    return mlp(in_dim, hidden, model.dropout, model.batch_norm, model.activation, out_dim=1)


def softmax_mix(gate_logits: torch.Tensor, experts: torch.Tensor) -> torch.Tensor:
    """``Σ_e softmax(gate)_e · expert_e``: ``(B, E)`` gate logits over ``(B, E, h)`` expert outputs."""
    return (torch.softmax(gate_logits, -1).unsqueeze(-1) * experts).sum(1)


class MultiTaskCTRModel(CTRModel):
    min_labels = 2
    exact_labels: int | None = None
    label_hint = "data.label=task1,task2"

    def __init__(self, optimizer: str = "adam", **base):
        super().__init__(**base)
        self.optimizer = optimizer

    def prepare_fit(self, split) -> None:
        super().prepare_fit(split)
        n = self.n_labels
        if (self.exact_labels is not None and n != self.exact_labels) or n < self.min_labels:
            need = f"exactly {self.exact_labels}" if self.exact_labels is not None else f"at least {self.min_labels}"
            raise ConfigError(f"{self.name} is a multi-task model with one output per label: it needs {need} labels "
                              f"({self.label_hint}); the data has {n}: {', '.join(self.labels_)}")
        if self.optimizer not in OPTIMIZERS:
            raise ConfigError(f"optimizer={self.optimizer!r}: choose one of {', '.join(OPTIMIZERS)}")
        if self.optimizer == "adatask":
            from recforge.training.distributed import world

            if self.precision == "fp16":
                raise ConfigError("optimizer=adatask takes its own optimisation step, which the fp16 gradient "
                                  "scaler cannot see: use precision=bf16 or fp32")
            if world()[1] > 1:
                raise ConfigError("optimizer=adatask is not supported in data-parallel training; run one process")
        self._adatask = None
        self._epoch, self._progress = 0, 0.0

    # ---- AdaTask -------------------------------------------------------------------------------
    def _optimizer(self):
        if getattr(self, "_adatask", None) is None:
            from recforge.training.adatask import AdaTask

            params = [p for p in self.net_.parameters() if p.requires_grad]
            self._adatask = AdaTask(params, self.n_labels, lr=self.lr, weight_decay=self.weight_decay)
        return self._adatask

    def train_batches(self, split, rng):
        """The base batches, noting how far training is (for AdaTask's learning-rate schedule)."""
        self._epoch = getattr(self, "_epoch", 0) + 1
        n = max(1, self.n_train_batches(split))
        for i, batch in enumerate(super().train_batches(split, rng)):
            self._progress = self._epoch - 1 + min(i / n, 1.0)
            yield batch

    def train_state(self) -> dict:
        state = {"epoch": getattr(self, "_epoch", 0)}
        if self.optimizer == "adatask":
            state["adatask"] = self._optimizer().state_dict()
        return state

    def load_train_state(self, state: dict) -> None:
        self._epoch = int(state.get("epoch", 0))
        if self.optimizer == "adatask" and state.get("adatask"):
            self._optimizer().load_state_dict(state["adatask"])

    def task_losses(self, batch) -> tuple[list[torch.Tensor], torch.Tensor]:
        """The binary cross-entropy of each label and the embedding penalty (0 without ``embedding_reg``)."""
        logits, y = self.net_(batch).float(), batch["label"].float()
        losses = [F.binary_cross_entropy_with_logits(logits[:, k], y[:, k]) for k in range(logits.shape[1])]
        emb = getattr(self.net_, "embedding", None)
        reg = self.embedding_reg * emb.penalty if self.embedding_reg and emb is not None else logits.new_zeros(())
        return losses, reg

    def loss(self, batch) -> torch.Tensor:
        if self.optimizer != "adatask":
            return super().loss(batch)
        from recforge.training.trainer import lr_factor

        losses, reg = self.task_losses(batch)
        total = torch.stack(losses).mean() + reg
        if not torch.isfinite(total):
            return total  # the trainer stops with its message; no step is taken
        opt = self._optimizer()
        params = opt.params()
        grads = [torch.autograd.grad(losses[k] + reg, params, retain_graph=k < len(losses) - 1, allow_unused=True)
                 for k in range(len(losses))]
        f = lr_factor(self, self._progress) if self.lr_schedule != "constant" or self.warmup_epochs else 1.0
        for group in opt.param_groups:
            group["lr"] = self.lr * f
        opt.step(grads)
        return total.detach().requires_grad_()

    def protocol_notes(self) -> dict:
        return {**super().protocol_notes(), "optimizer": self.optimizer}
