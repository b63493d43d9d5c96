"""What the multi-behaviour models share: the behaviours of the training part and of a ranking-time
history, as small integer codes.

A multi-behaviour model is trained on ``Split.train`` with its ``behavior`` column (views, carts,
purchases...) and ranks items for the *target* behaviour (``data.target_behavior``, recorded by
every split in ``Split.protocol["target_behavior"]``). Both are required: without them the model
stops with one :class:`~recforge.errors.ConfigError` naming the fix.

Behaviour codes: ``1..B`` for the behaviours of the training part in sorted order, ``0`` for
padding (sequences). Rows without a behaviour (held-out rows of a given split carry none) count as
the target behaviour, as the split treats them. At ranking time the behaviours come from
:attr:`Histories.behaviors`; a history without them (a raw history given to ``recommend`` or to the
server) counts every row as the most frequent training behaviour (``default_behavior_``).
"""

from __future__ import annotations

import numpy as np
import polars as pl

from recforge.data.dataset import sort_interactions
from recforge.data.schema import BEHAVIOR
from recforge.errors import ConfigError


def require_behaviors(split, model: str) -> tuple[str, list[str], str]:
    """``(target, behaviours, most frequent behaviour)`` of the training part, or a ConfigError."""
    if BEHAVIOR not in split.train.columns:
        raise ConfigError(f"{model} is a multi-behaviour model and the data has no behaviour column; map the "
                          "column of behaviour types with data.behavior_col=NAME and name the target with "
                          "data.target_behavior=NAME (e.g. --data synthetic-mb data.target_behavior=buy)")
    target = (split.protocol or {}).get("target_behavior")
    counts = (split.train.select(pl.col(BEHAVIOR).drop_nulls()).group_by(BEHAVIOR).len()
              .sort(["len", BEHAVIOR], descending=[True, False]))
    present = [str(b) for b in counts[BEHAVIOR].to_list()]
    if not target:
        raise ConfigError(f"{model} ranks for a target behaviour: set data.target_behavior=NAME (behaviours in the "
                          f"training part: {', '.join(present) or 'none'})")
    behaviors = sorted(set(present) | {str(target)})
    return str(target), behaviors, present[0] if present else str(target)


def encode_behaviors(values, behaviors: list[str], fallback: str) -> np.ndarray:
    """Codes ``1..B`` of ``values`` (strings; None and unknown names become ``fallback``)."""
    lookup = {b: k + 1 for k, b in enumerate(behaviors)}
    default = lookup[fallback]
    if values is None:
        return np.zeros(0, dtype=np.int64)
    values = np.asarray(values, dtype=object)
    if len(values) == 0:
        return np.zeros(0, dtype=np.int64)
    uniq, inv = np.unique(values.astype(str), return_inverse=True)
    codes = np.array([lookup.get(u, default) if u != "None" else default for u in uniq], dtype=np.int64)
    return codes[inv.ravel()]


def history_codes(hist, behaviors: list[str], default: str) -> np.ndarray:
    """The behaviour code of every row of a :class:`Histories` (``default`` where it has none)."""
    beh = getattr(hist, "behaviors", None)
    if beh is None:
        return np.full(len(hist.items), behaviors.index(default) + 1, dtype=np.int64)
    return encode_behaviors(beh, behaviors, default)


def training_rows(split, behaviors: list[str], target: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(users, items, behaviour codes)`` of the training part sorted by (user, time); rows without
    a behaviour count as the target behaviour."""
    df = sort_interactions(split.train)
    return (df["user_id"].to_numpy().astype(np.int64), df["item_id"].to_numpy().astype(np.int64),
            encode_behaviors(df[BEHAVIOR].to_numpy(), behaviors, target))


class BehaviorAware:
    """Mixed into the multi-behaviour models: validation during training under the protocol of the
    evaluation set (an evaluation set built with a target behaviour removes only the user's past
    target-behaviour items, so a viewed item stays a candidate while choosing the best epoch, as in
    the final evaluation)."""

    def seen_mask(self, hist) -> np.ndarray:
        """``recommend(exclude_seen=True)`` removes the history rows of the target behaviour only
        (rows without a behaviour count as ``default_behavior_``, as in scoring), the rule of
        ``eval.exclude=target_behavior``: a viewed or carted item stays a candidate."""
        codes = history_codes(hist, self.behaviors_, self.default_behavior_)
        return codes == self.behaviors_.index(self.target_behavior_) + 1

    def validate(self, valid) -> dict:
        from recforge.evaluation.evaluator import Protocol, evaluate

        protocol = (Protocol(exclude="target_behavior", target_behavior=self.target_behavior_)
                    if getattr(valid, "excluded", None) is not None else Protocol())
        return evaluate(self, valid, ks=self.valid_ks(), protocol=protocol, groups=False,
                        batch_size=self.eval_batch_size).metrics
