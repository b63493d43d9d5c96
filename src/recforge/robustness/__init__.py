"""Robustness checks: attacks on a trained recommender at test time, and their defences.

* :mod:`recforge.robustness.text_attack` — the stealthy text attack (Zhang et al., ACL 2024):
  small edits of an item's title, found with the model's scores only, that raise the item's rank;
  the edit budget, the stealthiness record, and a text purifier as the defence;
* :mod:`recforge.robustness.scorers` — the scoring functions the attack queries, for the language
  model recommenders (:mod:`recforge.llm`) and the text-enhanced sequential models (LLM-ESR, FAERec).
"""

from recforge.robustness.text_attack import AttackResult, StealthyTextAttack, TextPurifier, edit_stats

__all__ = ["AttackResult", "StealthyTextAttack", "TextPurifier", "edit_stats"]
