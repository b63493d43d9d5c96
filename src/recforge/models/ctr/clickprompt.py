"""ClickPrompt: a CTR model generates soft prompts that adapt a pre-trained language model to CTR.

Lin, Chen, Wang, Xi, Qu, Dai, Zhang, Tang, Yu and Zhang, "ClickPrompt: CTR Models are Strong
Prompt Generators for Adapting Language Models to CTR Prediction", WWW 2024 (arXiv 2310.09234;
authors' code: github.com/CHIANGEL/ClickPrompt). The CTR model reads the tabular row and *generates*
soft prompts for the PLM that reads the row's text; pre-training the pair by prompt-augmented
masked language modelling (PA-MLM) makes the CTR model encode what the PLM needs to fill in the
masked words, so collaborative and semantic knowledge meet through the prompt interface. The row
text, the PLM (all-MiniLM-L6-v2 by default, with an added MLM head tied to its word embeddings),
the backbone, the budgets and the two fine-tuning modes are those of
:mod:`recforge.models.ctr.plm` (read it first).

* **Prompt generation.** The CTR model's representation of the row ``r`` (the backbone's
  ``represent``: the vector its prediction layer reads) becomes ``num_prompt`` = K soft prompts.
  ``prompt_at=layer`` (default; layer-wise prompts, the authors' ``prefix`` fusion, the one their
  released fine-tuning script ``finetune_ctr_prefix_add.py`` uses): ``tanh(W1 r)`` goes through a
  linear layer to a key and a value vector per prompt for *every* layer of the PLM
  (``K · layers · 2 · H`` numbers), which every text token attends to besides the text's own keys
  and values (as in prefix-tuning and P-tuning v2). ``prompt_at=input`` (the authors' ``prompt``
  fusion): K linear maps of ``r`` give K vectors prepended to the input word embeddings (position
  and segment embeddings added as for words).
* **PA-MLM pre-training.** 15% (``mask_ratio``) of the text's tokens ([CLS]/[SEP] aside; at least
  one per row) are replaced by ``[MASK]``; the PLM reads the masked text with the prompts of the
  *complete* tabular row and predicts the masked tokens through the MLM head; the loss trains the
  PLM, the head, the prompt generator and the CTR model together.
* **Fine-tuning** (``finetune``): ``ctr`` (default; the paper's CTR-only strategy for cheap
  inference): the pre-trained CTR model alone, its own prediction layer on the representation,
  the PLM and the prompt generator dropped, so serving costs what the backbone costs;
  ``joint`` (the paper's best-accuracy strategy; the authors' ``prefix_add`` / ``prompt_add``): the PLM with the
  generated prompts gives a logit from its ``[CLS]`` state (linear, tanh, linear), combined with
  the CTR model's as ``y = α · plm_logit + (1 − α) · ctr_logit``, α learned from 0.5 (the
  authors' ``init_weighted_alpha``), trained with the binary cross-entropy of ``y``.

How the layer-wise prompts enter the PLM: K placeholder positions are put before the text (its
attention mask 1), and in every layer the key and value projections' outputs at those positions
are replaced by the generated vectors (forward hooks on the layer's key/value linear maps). Text
tokens thus attend to exactly the generated keys and values, as with ``past_key_values`` in the
authors' code, and the text's position ids start after the K prompts, as there; the placeholders'
own outputs are discarded. It needs a BERT-style encoder (``encoder.layer[i].attention.self.key``).

Deviations from the paper and the authors' code, and choices they leave open: all-MiniLM-L6-v2
(a sentence encoder without an MLM head: the head is added, tied to the word embeddings, its
transform trained from scratch) instead of RoBERTa / TinyBERT with their own MLM heads; masked
tokens are always ``[MASK]`` (BERT's 80/10/10, which the authors keep, would show a masked token at
its own position 10% of the time); the validation rows are not used in pre-training (the authors
add them to the MLM data); the pre-training budget is a seeded sample of ``pretrain_rows``
training rows for ``pretrain_epochs`` epochs (the authors: all rows, 20 epochs at batch 1024 on
GPUs), with ``plm_lr`` = 5e-5 (the authors' rate) for the PLM and ``pretrain_lr`` for the CTR
model and the heads; the ``[CLS]`` pooler of the joint head is fixed (the authors search cls / avg
poolers), and the CTR-only mode keeps the backbone's prediction layer (their ``prompt_usage=no``;
the variants that predict from the prompts are not offered).
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from recforge.errors import ConfigError
from recforge.models.ctr.plm import (MLMHead, PLMAlignedCTR, apply_mask, mask_tokens, mlm_loss, plm_states,
                                     represent_dim)

PROMPT_AT = ("layer", "input")


def attention_layers(plm: nn.Module) -> list[nn.Module]:
    """The self-attention modules (with ``key``/``value`` linear maps) of a BERT-style encoder."""
    try:
        mods = [layer.attention.self for layer in plm.encoder.layer]
    except AttributeError:
        mods = []
    if not mods or not all(isinstance(getattr(m, "key", None), nn.Linear) and isinstance(getattr(m, "value", None),
                                                                                        nn.Linear) for m in mods):
        raise ConfigError(f"clickprompt: prompt_at=layer needs a BERT-style encoder (encoder.layer[i].attention.self."
                          f"key/value); {type(plm).__name__} is not one: use prompt_at=input")
    return mods


class PromptGenerator(nn.Module):
    """``K`` soft prompts from a row representation: ``(B, layers, 2, K, H)`` key/value vectors per
    layer (``layer``) or ``(B, K, H)`` input vectors (``input``)."""

    def __init__(self, rep_dim: int, hidden: int, n_layers: int, n_prompt: int, where: str):
        super().__init__()
        self.where, self.k, self.h, self.layers = where, n_prompt, hidden, n_layers
        if where == "layer":
            self.net = nn.Sequential(nn.Linear(rep_dim, hidden), nn.Tanh(),
                                     nn.Linear(hidden, n_prompt * n_layers * 2 * hidden))
        else:
            self.net = nn.Linear(rep_dim, n_prompt * hidden)

    def forward(self, rep: torch.Tensor) -> torch.Tensor:
        out = self.net(rep)
        if self.where == "layer":
            return out.view(len(rep), self.layers, 2, self.k, self.h)
        return out.view(len(rep), self.k, self.h)


def prompted_states(plm: nn.Module, ids: torch.Tensor, mask: torch.Tensor, prompts: torch.Tensor, where: str,
                    pad_id: int = 0) -> torch.Tensor:
    """The PLM's last hidden states ``(B, K + L, H)`` of the text ``ids`` read with the prompts
    (module docstring); the text's states are ``[:, K:]``."""
    B, K = ids.shape[0], prompts.shape[-2]
    full_mask = torch.cat([torch.ones(B, K, dtype=mask.dtype, device=mask.device), mask], 1)
    if where == "input":
        words = plm.get_input_embeddings()(ids)
        return plm_states(plm, embeds=torch.cat([prompts.to(words.dtype), words], 1), mask=full_mask)
    handles = []
    for i, att in enumerate(attention_layers(plm)):
        for j, lin in enumerate((att.key, att.value)):
            kv = prompts[:, i, j]

            def hook(module, inputs, out, kv=kv):
                return torch.cat([kv.to(out.dtype), out[:, kv.shape[1]:]], 1)

            handles.append(lin.register_forward_hook(hook))
    try:
        placeholders = torch.full((B, K), int(pad_id), dtype=ids.dtype, device=ids.device)
        return plm_states(plm, torch.cat([placeholders, ids], 1), full_mask)
    finally:
        for h in handles:
            h.remove()


class ClickPromptAligner(nn.Module):
    """PA-MLM: masked tokens predicted by the PLM reading the text with the CTR model's prompts."""

    def __init__(self, model: "ClickPrompt", ctr, plm, tokenizer, generator: PromptGenerator):
        super().__init__()
        self.ctr, self.plm, self.generator, self.where = ctr, plm, generator, model.prompt_at
        self.special = (tokenizer.cls_token_id, tokenizer.sep_token_id)
        self.mask_id, self.pad_id, self.ratio = tokenizer.mask_token_id, tokenizer.pad_token_id or 0, model.mask_ratio
        self.head = MLMHead(plm.get_input_embeddings(), plm.get_input_embeddings().embedding_dim)
        self.gen = torch.Generator(device=model.device_)
        self.gen.manual_seed(int(model.seed) + 1)

    def plm_parameters(self):
        return list(self.plm.parameters())

    def mask_text(self, batch) -> tuple[torch.Tensor, torch.Tensor]:
        """``(masked ids, labels)`` of token-level masking (public for the tests)."""
        ids, att = batch["_text_ids"], batch["_text_mask"]
        maskable = att.bool() & (ids != self.special[0]) & (ids != self.special[1])
        return apply_mask(ids, mask_tokens(maskable, self.ratio, self.gen), self.mask_id)

    def loss(self, batch) -> tuple[torch.Tensor, dict]:
        prompts = self.generator(self.ctr.represent(batch))
        masked, labels = self.mask_text(batch)
        states = prompted_states(self.plm, masked, batch["_text_mask"], prompts, self.where, self.pad_id)
        loss = mlm_loss(self.head, states[:, prompts.shape[-2]:].float(), labels)
        return loss, {"pa_mlm": float(loss.detach())}


class ClickPromptJoint(nn.Module):
    """``y = α · plm_logit + (1 − α) · ctr_logit``, the PLM reading the text with the prompts."""

    def __init__(self, ctr, plm, generator: PromptGenerator, n_labels: int, where: str, pad_id: int):
        super().__init__()
        self.ctr, self.plm, self.generator, self.where, self.pad_id = ctr, plm, generator, where, pad_id
        h = plm.get_input_embeddings().embedding_dim
        self.head = nn.Sequential(nn.Linear(h, h), nn.Tanh(), nn.Linear(h, n_labels))
        self.alpha = nn.Parameter(torch.full((1,), 0.5))

    def forward(self, batch):
        prompts = self.generator(self.ctr.represent(batch))
        states = prompted_states(self.plm, batch["_text_ids"], batch["_text_mask"], prompts, self.where, self.pad_id)
        t = self.head(states[:, prompts.shape[-2]])  # the text's [CLS]
        return self.alpha * t + (1 - self.alpha) * self.ctr(batch)


class ClickPrompt(PLMAlignedCTR):
    name = "clickprompt"

    def __init__(self, num_prompt: int = 10, prompt_at: str = "layer", mask_ratio: float = 0.15, **base):
        self.num_prompt, self.prompt_at, self.mask_ratio = num_prompt, prompt_at, mask_ratio
        super().__init__(**base)
        if prompt_at not in PROMPT_AT:
            self._bad("prompt_at", "choose layer (key/value prompts in every PLM layer, the paper's) or input "
                                   "(prompts before the input word embeddings)")
        if isinstance(num_prompt, bool) or not isinstance(num_prompt, (int, np.integer)) or num_prompt < 1:
            self._bad("num_prompt", "give the number of soft prompts per row (>= 1; the authors' 10)")
        if isinstance(mask_ratio, bool) or not isinstance(mask_ratio, (int, float)) or not 0 < mask_ratio < 1:
            self._bad("mask_ratio", "give the share of text tokens to mask, in (0, 1) (the authors' 0.15)")
        if self.num_prompt + self.max_tokens > 512:
            self._bad("num_prompt", f"num_prompt + max_tokens = {self.num_prompt + self.max_tokens} exceeds the 512 "
                                    "positions of a BERT-style PLM")

    def align_task(self) -> str:
        return (f"clickprompt: prompt-augmented masked language modelling ({self.num_prompt} prompts per row at "
                f"{'every layer (key/value)' if self.prompt_at == 'layer' else 'the input'})")

    def _generator(self, ctr_net, plm) -> PromptGenerator:
        if self.prompt_at == "layer":
            attention_layers(plm)  # a clear error before any work
        cfg = plm.config
        return PromptGenerator(represent_dim(ctr_net, self.fields_), int(cfg.hidden_size), int(cfg.num_hidden_layers),
                               int(self.num_prompt), self.prompt_at)

    def make_aligner(self, ctr_net, plm, tokenizer, rows) -> nn.Module:
        gen = self.net_.generator if self.finetune == "joint" else self._generator(ctr_net, plm).to(self.device_)
        return ClickPromptAligner(self, ctr_net, plm, tokenizer, gen)

    def make_joint(self, ctr_net, plm) -> nn.Module:
        return ClickPromptJoint(ctr_net, plm, self._generator(ctr_net, plm), self.n_labels, self.prompt_at,
                                self._tokenizer.pad_token_id or 0)

    def joint_loss(self, batch) -> torch.Tensor:
        return self.with_embedding_reg(F.binary_cross_entropy_with_logits(self.net_(batch).float(),
                                                                           batch["label"].float()))

    def protocol_notes(self) -> dict:
        notes = super().protocol_notes()
        notes["clickprompt"] = {"num_prompt": self.num_prompt, "prompt_at": self.prompt_at,
                                "mask_ratio": self.mask_ratio}
        return notes
