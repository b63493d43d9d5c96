"""Item understanding from text: item texts, sentence encoders and a cached semantic item table.

* :mod:`recforge.semantic.text` — item text from a catalogue's columns through a template;
* :mod:`recforge.semantic.encoder` — :class:`TextEncoder` (a local sentence-transformers model,
  the packaged all-MiniLM-L6-v2 by default, loaded offline, on PyTorch or on ONNX Runtime) and
  :class:`HashingEncoder`, a small deterministic stand-in used by tests;
* :mod:`recforge.semantic.onnx_backend` — the ONNX Runtime backend: export once, cached;
* :mod:`recforge.semantic.store` — the vector cache keyed by (text, encoder) and the semantic item
  table of a dataset (``recforge embed``);
* :mod:`recforge.semantic.marc` — MARC: a language model's layer states of the item texts, compressed
  by modules trained on a split's training interactions, as a semantic table (``recforge embed --marc``;
  needs the ``llm`` extra).

Needs the ``text`` extra (sentence-transformers and the packaged model) only for
:class:`TextEncoder`; everything else runs on the core dependencies.
"""

from recforge.semantic.text import DEFAULT_TEMPLATE, item_texts, text_preview

__all__ = ["DEFAULT_TEMPLATE", "item_texts", "text_preview"]
