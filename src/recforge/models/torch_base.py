"""Base class of PyTorch models: common training hyper-parameters, persistence of weights."""

from __future__ import annotations

import numpy as np
import torch

from recforge.models.base import Recommender
from recforge.training.device import check_precision, resolve_device
from recforge.training.trainer import LR_SCHEDULES, LR_STEP_UNITS, Trainer, set_seed


class TorchRecommender(Recommender):
    """A model trained by the shared :class:`~recforge.training.trainer.Trainer`.

    Subclasses implement ``build(n_users, n_items) -> nn.Module``, ``train_batches(split, rng)``
    (an iterator of batches), ``n_train_batches(split)``, ``loss(batch) -> scalar tensor`` and
    ``score(histories)``; optionally ``before_training(split, valid)`` (run on the built network
    before the trainer) and ``after_step(batch, lr)`` (called by the trainer after every optimiser
    step, with the learning rate of that step).

    Where it runs: ``device`` (``auto``: CUDA when present; ``cpu``, ``cuda``, ``cuda:N``, ``mps``) and
    ``precision`` (``fp32``, ``bf16``, ``fp16``: mixed precision of the loss computation). The learning
    rate follows ``lr_schedule``: ``constant``, ``cosine`` (from ``lr`` to 0 over ``epochs``),
    ``step`` (times ``lr_gamma`` every ``lr_step`` epochs, or every ``lr_step`` optimiser updates with
    ``lr_step_unit=update``, as TensorFlow's staircase ``exponential_decay``) or ``plateau`` (times
    ``lr_gamma`` after every validation that does not improve on the best, as Keras's and FuxiCTR's
    reduce-on-plateau with ``lr_gamma=0.1``; early stopping still counts such validations), after a
    linear warm-up of ``warmup_epochs`` (fractions allowed), updated at every batch. Models that hold
    tensors outside their network move them in :meth:`on_device`.

    Attributes that are not hyper-parameters, set before ``fit`` by the caller: ``checkpoint_dir``
    (a folder: ``last.pt`` after every epoch, ``best.pt`` at every new best), ``resume_from`` (a
    ``last.pt`` to continue from) and ``callbacks`` (``cb(epoch, row)`` after every epoch).
    """

    def __init__(self, epochs: int = 50, batch_size: int = 256, lr: float = 1e-3, weight_decay: float = 0.0,
                 patience: int = 5, eval_every: int = 1, valid_metric: str = "ndcg@10",
                 eval_batch_size: int = 1024, seed: int = 0, verbose: bool = True, device: str = "auto",
                 precision: str = "fp32", lr_schedule: str = "constant", warmup_epochs: float = 0.0,
                 lr_step: int = 10, lr_gamma: float = 0.5, lr_step_unit: str = "epoch"):
        self.epochs, self.batch_size, self.lr, self.weight_decay = epochs, batch_size, lr, weight_decay
        self.patience, self.eval_every, self.valid_metric = patience, eval_every, valid_metric
        self.eval_batch_size, self.seed, self.verbose = eval_batch_size, seed, verbose
        self.device, self.precision = device, precision
        self.lr_schedule, self.warmup_epochs, self.lr_step, self.lr_gamma = lr_schedule, warmup_epochs, lr_step, lr_gamma
        self.lr_step_unit = lr_step_unit
        self.checkpoint_dir = self.resume_from = None
        self.callbacks: list = []

    # ---- device -------------------------------------------------------------------------------
    @property
    def device_(self) -> torch.device:
        """The resolved device (``device=auto`` resolved once, at first use)."""
        dev = self.__dict__.get("_device")
        if dev is None:
            dev = self._device = resolve_device(self.device)
        return dev

    def to_device(self, device) -> "TorchRecommender":
        """Move the network and the model's other tensors to ``device`` (a name or torch.device)."""
        self._device = resolve_device(device)
        if getattr(self, "net_", None) is not None:
            self.net_.to(self._device)
        self.on_device(self._device)
        return self

    def on_device(self, device: torch.device) -> None:
        """Hook: move tensors the model holds outside ``net_`` (adjacency, popularity...)."""

    def train_state(self) -> dict:
        """Hook: state of the model that changes during training outside the network and the
        random generators (e.g. an epoch counter), saved in checkpoints."""
        return {}

    def load_train_state(self, state: dict) -> None:
        """Hook: restore what :meth:`train_state` returned."""

    def valid_ks(self) -> list[int]:
        k = int(self.valid_metric.split("@")[1]) if "@" in self.valid_metric else 10
        return [k]

    # ---- to implement -------------------------------------------------------------------------
    def build(self, n_users: int, n_items: int) -> torch.nn.Module:  # pragma: no cover
        raise NotImplementedError

    def train_batches(self, split, rng):  # pragma: no cover
        raise NotImplementedError

    def n_train_batches(self, split) -> int:  # pragma: no cover
        raise NotImplementedError

    def loss(self, batch) -> torch.Tensor:  # pragma: no cover
        raise NotImplementedError

    # ---- shared -------------------------------------------------------------------------------
    def epoch_batches(self, order: np.ndarray, rng: np.random.Generator):
        """``(indices, generator)`` of each batch of one epoch: ``order`` cut into global batches of
        ``batch_size``. In data-parallel training (:mod:`recforge.training.distributed`) each process
        gets its share of every global batch and a generator of its own for what its batches draw
        (negatives), derived from the common one, which stays in step on every process; a last
        batch too small to share is skipped by all. In one process: every batch, and ``rng``."""
        from recforge.training.distributed import world

        rank, size = world()
        bs = self.batch_size
        if size == 1:
            for s in range(0, len(order), bs):
                yield order[s : s + bs], rng
            return
        local = np.random.default_rng([int(rng.integers(2**62)), rank])
        for s in range(0, len(order), bs):
            idx = order[s : s + bs]
            if len(idx) >= size:
                yield np.array_split(idx, size)[rank], local

    def fit(self, split, valid=None):
        """Train with the shared trainer. A model with a ``threads`` parameter (not None) runs
        with that many PyTorch intra-op threads during fit: on a shared, oversubscribed machine
        one thread can be much faster than two, because short operations whose threads wait on
        each other lose their time slices."""
        threads = getattr(self, "threads", None)
        if threads is None:
            return self._fit(split, valid)
        before = torch.get_num_threads()
        torch.set_num_threads(int(threads))
        try:
            return self._fit(split, valid)
        finally:
            torch.set_num_threads(before)

    def _fit(self, split, valid):
        from recforge.errors import ConfigError

        if self.lr_schedule not in LR_SCHEDULES:
            raise ConfigError(f"lr_schedule={self.lr_schedule!r}: choose one of {', '.join(LR_SCHEDULES)}")
        if getattr(self, "lr_step_unit", "epoch") not in LR_STEP_UNITS:
            raise ConfigError(f"lr_step_unit={self.lr_step_unit!r}: choose epoch (lr_step counts epochs) or update "
                              "(lr_step counts optimiser updates)")
        check_precision(self.precision, self.device_)
        set_seed(self.seed)
        self.n_users_, self.n_items_ = split.n_users, split.n_items
        self.prepare_fit(split)
        self.net_ = self.build(split.n_users, split.n_items)
        self.to_device(self.device_)
        self.before_training(split, valid)
        trainer = Trainer(self, split, valid, verbose=self.verbose, checkpoint_dir=getattr(self, "checkpoint_dir", None),
                          resume_from=getattr(self, "resume_from", None))
        self.history_ = trainer.run().as_dict()
        return self

    def prepare_fit(self, split) -> None:
        """Hook: compute what the model needs from the training data before building."""

    def before_training(self, split, valid=None) -> None:
        """Hook: work on the built network, on its device, before the trainer runs (pre-training)."""

    def _fitted_state(self) -> dict:
        state = super()._fitted_state()
        net = state.pop("net_")
        state["net_state"] = net.state_dict()
        return state

    def _restore_state(self, state: dict) -> None:
        state = dict(state)
        net_state = state.pop("net_state")
        super()._restore_state(state)
        self.net_ = self.build(self.n_users_, self.n_items_)
        self.net_.load_state_dict(net_state)
        self.net_.eval()
        self.to_device(self.device_)
