"""ReLLa: retrieval-enhanced large language models for lifelong sequential behaviour comprehension.

Lin et al., "ReLLa: Retrieval-enhanced Large Language Models for Lifelong Sequential Behavior
Comprehension in Recommendation", WWW 2024. A language model reads the user's rated history as
text and answers whether the user will like a target item; the probability of "Yes" against "No"
is the click-through-rate score (AUC and log-loss). Two parts:

* **Semantic user behaviour retrieval** (SUBR, ``retrieval="semantic"``): instead of the ``k`` most
  recent history items (``retrieval="recent"``), the prompt shows the ``k`` history items whose
  text vectors are closest to the target item's, in their original time order (the paper's
  "sequential" ordering of the retrieved items). Used zero-shot and in tuning.
* **Retrieval-enhanced instruction tuning** (ReiT, few-shot): LoRA adapters tuned on a small sample
  of training targets; with ``mix`` (default) each sampled target appears twice, once with the
  recent-``k`` history and once with the retrieved-``k`` history (the paper's mixed training set).

Where this implementation deviates from the paper:

* Backbone: SmolLM2-135M-Instruct (float weights dequantised from a Q4_1 GGUF file) instead of
  Vicuna-13B, so absolute AUCs are far below the paper's; any local causal LM can replace it.
* Item vectors: all-MiniLM-L6-v2 sentence embeddings of the item text (the project's encoder),
  instead of the LLM's own averaged hidden states reduced by PCA to 512 dimensions.
* Data: MovieLens-100K split per user in time (see :mod:`recforge.llm.prompts`), not the
  paper's global time split of MovieLens-1M, MovieLens-25M and BookCrossing.
* Training target: the answer token alone (``objective="lm"``: its cross-entropy over the
  vocabulary), not ``Yes.``/``No.`` plus end-of-sequence; a fixed number of epochs, no validation
  set or early stopping (the paper keeps the best of several epochs on a validation set).
* Prompt: a shorter template of our own (profile sentence, one line per rated item, the target
  with its genres), wrapped in the backbone's chat template, instead of Vicuna's.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import polars as pl

from recforge.errors import ConfigError
from recforge.llm import prompts as P
from recforge.llm.base import LLMRecommender


@dataclass
class PromptData:
    """What an LLM recommender is fitted on: the split, the prompt format, item text vectors (for
    semantic retrieval) and the sampled training targets (none: zero-shot)."""

    split: P.PromptSplit
    fmt: P.PromptFormat
    vectors: np.ndarray | None = None
    train_targets: pl.DataFrame | None = None
    train_prompts: list[str] = field(default_factory=list)
    train_labels: list[int] = field(default_factory=list)
    train_frame: pl.DataFrame | None = None

    @property
    def n_users(self) -> int:
        return self.split.n_users

    @property
    def n_items(self) -> int:
        return self.split.n_items


class ReLLa(LLMRecommender):
    """ReLLa (see the module docstring). ``retrieval``: ``semantic`` or ``recent`` history of ``k``
    items; ``mix``: tune on both kinds of prompt of each sampled training target (ReiT). The other
    parameters are :class:`~recforge.llm.base.LLMRecommender`'s."""

    name = "rella"

    def __init__(self, retrieval: str = "semantic", k: int = 10, mix: bool = True, **params):
        super().__init__(**params)
        if retrieval not in P.RETRIEVALS:
            raise ConfigError(f"retrieval={retrieval!r}: choose one of {', '.join(P.RETRIEVALS)}")
        if int(k) < 1:
            raise ConfigError(f"k={k}: show at least one history item")
        self.retrieval, self.k, self.mix = retrieval, int(k), bool(mix)

    def prompts(self, data: PromptData, targets: pl.DataFrame, retrieval: str | None = None) -> pl.DataFrame:
        """The prompts of ``targets`` (rows of ``data.split``'s parts), within the token budget."""
        if self.tokenizer is None:  # pragma: no cover - the property loads it
            raise ConfigError("no tokenizer")
        return P.build_prompts(data.split, targets, data.fmt, self.k, retrieval or self.retrieval,
                               self.count_tokens, self.max_tokens, data.vectors)

    def training_retrievals(self) -> list[str]:
        return ["recent", "semantic"] if self.mix else [self.retrieval]

    def fit(self, data: PromptData, valid=None):
        targets = data.train_targets
        if targets is not None and targets.height:
            frames = [self.prompts(data, targets, r) for r in self.training_retrievals()]
            frame = pl.concat(frames)
            data.train_frame = frame
            data.train_prompts = frame["prompt"].to_list()
            data.train_labels = frame["label"].to_list()
        return super().fit(data, valid)

    def predict(self, data: PromptData, targets: pl.DataFrame) -> tuple[pl.DataFrame, np.ndarray]:
        """The prompts of ``targets`` and P(like) of each."""
        frame = self.prompts(data, targets)
        return frame, self.predict_proba(frame["prompt"].to_list())

    def protocol_notes(self) -> dict:
        return {"retrieval": self.retrieval, "k": self.k,
                "tuning": ("zero-shot" if not getattr(self, "adapted_", False) else
                           "LoRA on recent-k and retrieved-k prompts of each sampled target (ReiT)" if self.mix else
                           f"LoRA on {self.retrieval}-k prompts")}
