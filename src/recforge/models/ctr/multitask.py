"""The base of multi-task CTR models: one output per label, label checks, the AdaTask optimizer.

A :class:`MultiTaskCTRModel` predicts every label of the schema (``self.labels_``, in order) with
a network of shared and task-specific parts; the loss is the base one (binary cross-entropy per
label, mean over labels). A model needs at least ``min_labels`` labels (``exact_labels`` when it
needs a fixed number); otherwise fitting stops with one :class:`ConfigError`.

``optimizer``: ``adam`` (the trainer's Adam) or ``adatask`` (:mod:`recforge.training.adatask`:
per-task Adam moments on every parameter, so a shared parameter's update is the sum of one
normalised step per task, while a parameter only one task reaches gets plain Adam). With
``adatask`` the model hands the trainer its optimiser (:meth:`make_optimizer`) and its step
(:meth:`optimizer_step`: one backward pass per task, ``torch.autograd.grad``, then the AdaTask
step); the trainer's learning-rate schedule and checkpoints apply to it as to Adam, so
``resume_from`` continues exactly. Not supported with it: ``precision=fp16`` (the gradient scaler
steps the optimiser itself) and data-parallel training.
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

    # ---- AdaTask -------------------------------------------------------------------------------
    def make_optimizer(self):
        """The trainer's optimiser: AdaTask over the network's parameters (None with optimizer=adam:
        the trainer's Adam, and its step)."""
        if self.optimizer != "adatask":
            return None
        from recforge.training.adatask import AdaTask

        return AdaTask([p for p in self.net_.parameters() if p.requires_grad], self.n_labels, lr=self.lr,
                       weight_decay=self.weight_decay)

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
        losses, reg = self.task_losses(batch)
        self._task_losses = [loss + reg for loss in losses]  # what optimizer_step differentiates, task by task
        return torch.stack(losses).mean() + reg

    def optimizer_step(self, loss, opt) -> None:
        """AdaTask's step: each task's gradient from its own backward pass."""
        losses, self._task_losses = self._task_losses, None
        params = opt.params()
        grads = [torch.autograd.grad(losses[k], params, retain_graph=k < len(losses) - 1, allow_unused=True)
                 for k in range(len(losses))]
        opt.step(grads)

    def protocol_notes(self) -> dict:
        return {**super().protocol_notes(), "optimizer": self.optimizer}
