"""Base class of PyTorch models: common training hyper-parameters, persistence of weights."""

from __future__ import annotations

import torch

from recforge.models.base import Recommender
from recforge.training.trainer import Trainer, set_seed


class TorchRecommender(Recommender):
    """A model trained by the shared :class:`~recforge.training.trainer.Trainer`.

    Subclasses implement ``build(n_users, n_items) -> nn.Module``, ``train_batches(split, rng)``
    (an iterator of batches), ``n_train_batches(split)``, ``loss(batch) -> scalar tensor`` and
    ``score(histories)``.
    """

    def __init__(self, epochs: int = 50, batch_size: int = 256, lr: float = 1e-3, weight_decay: float = 0.0,
                 patience: int = 5, eval_every: int = 1, valid_metric: str = "ndcg@10",
                 eval_batch_size: int = 1024, seed: int = 0, verbose: bool = True):
        self.epochs, self.batch_size, self.lr, self.weight_decay = epochs, batch_size, lr, weight_decay
        self.patience, self.eval_every, self.valid_metric = patience, eval_every, valid_metric
        self.eval_batch_size, self.seed, self.verbose = eval_batch_size, seed, verbose

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
        set_seed(self.seed)
        self.n_users_, self.n_items_ = split.n_users, split.n_items
        self.prepare_fit(split)
        self.net_ = self.build(split.n_users, split.n_items)
        self.history_ = Trainer(self, split, valid, verbose=self.verbose).run().as_dict()
        return self

    def prepare_fit(self, split) -> None:
        """Hook: compute what the model needs from the training data before building."""

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
