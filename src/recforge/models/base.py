"""The model contract.

Every model is a :class:`Recommender`: hyper-parameters are constructor arguments, fitted state
ends in ``_``, and the verbs are ``fit(split)``, ``score(histories)``, ``recommend(histories, k)``,
``save(path)`` and ``load(path)``. ``score`` returns a ``(batch, n_items + 1)`` tensor over the
whole catalogue (column 0 is padding and is ignored).
"""

from __future__ import annotations

import inspect
from pathlib import Path

import numpy as np
import torch

from recforge.evaluation.batch import Histories


class Recommender:
    name = "base"
    #: the number of history items a sequential model looks at (None: the whole history)
    max_len: int | None = None

    def get_params(self) -> dict:
        params = {}
        for cls in reversed(type(self).__mro__):
            init = cls.__dict__.get("__init__")
            if init is None:
                continue
            for p in inspect.signature(init).parameters.values():
                if p.name != "self" and p.kind not in (p.VAR_KEYWORD, p.VAR_POSITIONAL):
                    params[p.name] = getattr(self, p.name)
        return params

    @classmethod
    def param_names(cls) -> set[str]:
        names = set()
        for c in cls.__mro__:
            init = c.__dict__.get("__init__")
            if init is not None:
                names |= {p.name for p in inspect.signature(init).parameters.values()
                          if p.name != "self" and p.kind not in (p.VAR_KEYWORD, p.VAR_POSITIONAL)}
        return names

    # ---- verbs -------------------------------------------------------------------------------
    def fit(self, split, valid=None):  # pragma: no cover - interface
        raise NotImplementedError

    def score(self, hist: Histories) -> torch.Tensor:  # pragma: no cover - interface
        raise NotImplementedError

    def recommend(self, hist: Histories, k: int = 10, exclude_seen: bool = True,
                  exclude: list[list[int]] | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Top-``k`` item indices and scores per row, history (and ``exclude``) removed. The
        ranking runs where the scores are (the model's device); the result is NumPy on the CPU."""
        with torch.no_grad():
            s = self.score(hist).to(torch.float32).clone()
        dev = s.device
        s[:, 0] = -torch.inf
        if exclude_seen and len(hist.items):
            rows, items = np.repeat(np.arange(len(hist)), hist.lengths), np.asarray(hist.items, dtype=np.int64)
            keep = self.seen_mask(hist)
            if keep is not None:
                rows, items = rows[keep], items[keep]
            s[torch.from_numpy(rows).to(dev), torch.from_numpy(items).to(dev)] = -torch.inf
        if exclude:
            for r, items in enumerate(exclude):
                if items:
                    s[r, torch.as_tensor(items, dtype=torch.long, device=dev)] = -torch.inf
        k = min(k, s.shape[1] - 1)
        top = torch.topk(s, k, dim=1)
        return top.indices.cpu().numpy(), top.values.cpu().numpy()

    def seen_mask(self, hist: Histories) -> np.ndarray | None:
        """Which history rows ``exclude_seen`` removes from the ranking (a bool per row of
        ``hist.items``); None: every row. Multi-behaviour models remove only their target
        behaviour's rows, so a viewed item stays a candidate for purchase."""
        return None

    # ---- persistence --------------------------------------------------------------------------
    def _fitted_state(self) -> dict:
        return {k: v for k, v in vars(self).items() if k.endswith("_") and not k.startswith("_")}

    def _restore_state(self, state: dict) -> None:
        for k, v in state.items():
            setattr(self, k, v)

    def save(self, path: str | Path) -> Path:
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        torch.save({"model": self.name, "params": self.get_params(), "state": self._fitted_state()},
                   path / "model.pt")
        return path

    @classmethod
    def load(cls, path: str | Path, device: str | None = None) -> "Recommender":
        """The model saved in ``path``. Tensors are read onto the CPU first, whatever device they
        were saved from; a PyTorch model then moves to ``device`` (``auto``, ``cpu``, ``cuda``,
        ``cuda:N``, ``mps``), which overrides the ``device`` it was saved with (None: keep it;
        ``auto`` resolves again on this machine). Models without a ``device`` parameter ignore it."""
        from recforge.errors import ConfigError
        from recforge.models.registry import get_model_class

        blob = torch.load(Path(path) / "model.pt", map_location="cpu", weights_only=False)
        klass = get_model_class(blob["model"]) if cls is Recommender else cls
        params = dict(blob["params"])
        if device is not None and "device" in klass.param_names():
            params["device"] = str(device)
        model = klass(**params)
        try:
            model._restore_state(blob["state"])
        except ConfigError as exc:
            if device is not None or "device" not in params:
                raise
            raise ConfigError(f"{exc}; this model was saved with device={params['device']}: load it with "
                              "device='cpu' or device='auto' (recforge evaluate/recommend --device cpu)") from None
        return model
