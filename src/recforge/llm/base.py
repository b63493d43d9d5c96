"""The base of language-model recommenders: a causal LM that answers Yes or No, LoRA adapters,
Yes/No scoring, training by the shared trainer.

**Input.** A prompt (the user message, built by :mod:`recforge.llm.prompts`) is rendered into
the text the model reads: with ``chat`` (default) through the tokenizer's chat template
(``system``: an optional system message) and the assistant turn opened, then ``answer_prefix``
(empty by default); without ``chat`` as the message plus a new line. The number of tokens of
that text is what ``max_tokens`` bounds (the token budget); a prompt longer than the model's
context length (``max_position_embeddings``) is an error naming the fix.

**Scoring** (:meth:`LLMRecommender.predict_proba`): the next-token logits after the rendered
prompt of the two ``answers`` (``("Yes", "No")``: the first token of each), normalised over the
two: ``p = softmax(logit_yes, logit_no)[0]``, as ReLLa scores. Prompts are tokenised once, sorted
by length and run in batches of ``score_batch_size`` padded on the right; only the hidden state
at each prompt's last token goes through the output layer, and only for the two answer tokens.
Tokens per second (prompt tokens, no padding) are recorded in ``last_scoring_``.
With ``prefix_cache`` (default), prompts that share a token prefix (:func:`prefix_groups`: at least
32 tokens; e.g. the candidates of one listwise target, which differ only in the target lines)
run that prefix once and its key/value cache is repeated over their suffixes: the same scores up to
floating-point rounding, for fewer computed tokens (``last_scoring_["prefix_cache"]``). It is off for
per-example conditioning, whose weights change the prefix's states.

**Training** (``train_prompts`` > 0 in the task): LoRA adapters (``peft``; rank ``lora_r``,
``lora_alpha``, ``lora_dropout`` on ``lora_targets``, by default the attention query and value
projections, as ReLLa) are trained by the shared trainer (Adam, learning-rate schedule,
checkpoints, non-finite loss checks), the backbone frozen. ``objective="lm"`` (default): the
cross-entropy of the answer token over the whole vocabulary at the answer position (instruction
tuning on the response; ReLLa's response is ``Yes.``/``No.`` plus end-of-sequence, here the
answer token alone); ``objective="binary"``: the cross-entropy of the two-way Yes/No softmax that is
scored. The trainer keeps and checkpoints only the adapter weights (:class:`AdapterNet`), so a
checkpoint or saved model holds a few hundred kilobytes, not the backbone.

**Per-example conditioning** (for models whose weights depend on the example, e.g. collaborative
or personalised adapters): scoring and training may carry ``keys``, one row per prompt (user and
item indices, or a float vector): :meth:`LLMRecommender.predict_proba`'s ``keys`` and
:meth:`LLMRecommender.train_keys` for the training prompts. Each batch's forward pass runs inside
:meth:`LLMRecommender.conditioning` with that batch's keys, a context manager that does nothing
here and that such a model overrides.

**Persistence.** ``save``/``load`` (the framework's ``model.pt``: parameters and adapter
weights; the backbone is re-read from its path or the cache, and its fingerprint must match);
:meth:`save_adapter` / :meth:`load_adapter` (the ``peft`` folder format); :meth:`export_merged`
(adapters merged into the weights, written as a Hugging Face folder that ``llm.path`` accepts).
"""

from __future__ import annotations

import contextlib
import copy
import math
import time
from collections import OrderedDict
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from recforge.errors import ConfigError, RecForgeError
from recforge.llm import backbone as B
from recforge.models.torch_base import TorchRecommender

LOSSES = ("lm", "binary")


class AdapterNet(nn.Module):
    """The language model as the trainer's network. Its state dict holds the trainable (adapter)
    weights only, so best-epoch copies and checkpoints stay small; the frozen backbone is re-read
    from disk."""

    def __init__(self, lm: nn.Module):
        super().__init__()
        self.lm = lm

    def _trainable(self) -> set[str]:
        return {n for n, p in self.named_parameters() if p.requires_grad}

    def state_dict(self, *args, **kwargs):
        full = super().state_dict(*args, **kwargs)
        keep = self._trainable()
        prefix = kwargs.get("prefix", args[1] if len(args) > 1 else "")
        return OrderedDict((k, v) for k, v in full.items() if k[len(prefix):] in keep)

    def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):
        keep = self._trainable()
        unknown = sorted(set(state_dict) - keep)
        missing = sorted(keep - set(state_dict))
        if strict and (unknown or missing):
            raise RecForgeError(f"adapter weights do not match the model: {len(unknown)} unknown, {len(missing)} "
                                f"missing (e.g. {(unknown or missing)[0]}); load them into a model built with the "
                                "same lora_* parameters")
        return super().load_state_dict(state_dict, strict=False, assign=assign)


def checked_step(opt, loss: torch.Tensor, problem: str) -> float:
    """One optimiser step on ``loss``, the loss as a float; a non-finite loss stops first with a
    :class:`RecForgeError` of ``problem`` (``{loss}`` is replaced by the loss's value)."""
    if not torch.isfinite(loss):
        raise RecForgeError(problem.format(loss=float(loss)))
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()
    return float(loss.detach())


def last_hidden(lm: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                last: torch.Tensor) -> torch.Tensor:
    """The final hidden state at position ``last`` of each row (right-padded batch), from the
    transformer body only (no output layer over every position)."""
    base = lm.get_base_model() if hasattr(lm, "get_base_model") else lm
    body = getattr(base, base.base_model_prefix)
    h = body(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).last_hidden_state
    return h[torch.arange(h.shape[0], device=h.device), last]


#: the shortest shared prefix (tokens) worth caching (see :func:`prefix_groups`)
PREFIX_MIN_TOKENS = 32


def prefix_groups(ids: list[list[int]], min_tokens: int = PREFIX_MIN_TOKENS) -> list[tuple[int, list[int]]]:
    """Prompts that share a token prefix: ``(prefix length, indices)`` groups covering every prompt
    once. Prompts are sorted by their tokens; a prompt that shares ``k >= min_tokens`` tokens with the
    current group (``m`` members, prefix ``L``) joins it when that computes fewer tokens than leaving
    it out, ``m * (L - k) < L`` (the prefix then shrinks to ``k``): a large group with a long prefix
    (the candidates of one listwise target) is not cut short by a prompt that shares only the
    template's opening. Every member keeps at least one token after the prefix; groups of one have
    prefix length 0."""
    order = sorted(range(len(ids)), key=lambda i: ids[i])
    groups: list[tuple[int, list[int]]] = []
    members: list[int] = []
    length = 0
    for i in order:
        seq = ids[i]
        if members:
            head = ids[members[0]]
            n = min(length, len(seq) - 1)
            k = 0
            while k < n and head[k] == seq[k]:
                k += 1
            if k >= min_tokens and len(members) * (length - k) < length:
                members.append(i)
                length = k
                continue
            groups.append((length if len(members) > 1 else 0, members))
        members, length = [i], len(seq) - 1
    if members:
        groups.append((length if len(members) > 1 else 0, members))
    return groups


def _cache_kwarg(body: nn.Module) -> str:
    """The forward keyword of the body's key/value cache (``cache`` in newer transformers,
    ``past_key_values`` before)."""
    import inspect

    return "cache" if "cache" in inspect.signature(body.forward).parameters else "past_key_values"


def prefix_cache(lm: nn.Module, prefix: list[int], device):
    """The key/value cache of ``prefix`` (one forward pass of the transformer body), for
    :func:`prefix_hidden`."""
    base = lm.get_base_model() if hasattr(lm, "get_base_model") else lm
    body = getattr(base, base.base_model_prefix)
    return body(input_ids=torch.as_tensor([prefix], dtype=torch.long, device=device), use_cache=True).past_key_values


def prefix_hidden(lm: nn.Module, cache, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """The final hidden state at the last token of each ``prefix + suffix``: ``batch`` holds the
    suffixes right-padded (``LLMRecommender._pad``), ``cache`` the prefix's key/value cache
    (:func:`prefix_cache`), copied and repeated over the batch, with positions continuing after the
    prefix. Equal, up to floating-point rounding, to :func:`last_hidden` on the full prompts."""
    import copy

    base = lm.get_base_model() if hasattr(lm, "get_base_model") else lm
    body = getattr(base, base.base_model_prefix)
    x, mask = batch["input_ids"], batch["attention_mask"]
    n, width, lp = x.shape[0], x.shape[1], cache.get_seq_length()
    c = copy.deepcopy(cache)
    c.batch_repeat_interleave(n)
    full_mask = torch.cat([torch.ones((n, lp), dtype=mask.dtype, device=mask.device), mask], 1)
    pos = (lp + torch.arange(width, device=x.device))[None].expand(n, -1)
    h = body(input_ids=x, attention_mask=full_mask, position_ids=pos, use_cache=True,
             **{_cache_kwarg(body): c}).last_hidden_state
    return h[torch.arange(n, device=h.device), batch["last"]]


def output_logits(lm: nn.Module, h: torch.Tensor, token_ids: torch.Tensor | None = None) -> torch.Tensor:
    """Logits of the output layer for hidden states ``h`` (n, d): over ``token_ids`` only, or the whole
    vocabulary."""
    base = lm.get_base_model() if hasattr(lm, "get_base_model") else lm
    head = base.get_output_embeddings()
    w = head.weight if token_ids is None else head.weight[token_ids]
    out = h.to(w.dtype) @ w.T
    bias = getattr(head, "bias", None)
    if bias is not None:
        out = out + (bias if token_ids is None else bias[token_ids])
    return out.float()


def target_linears(lm: nn.Module, targets) -> list[tuple[str, int, nn.Module]]:
    """``(target, layer, module)`` of every module of ``lm`` whose own name is one of ``targets``
    (``q_proj``, ``v_proj``, ...), in model order; ``layer`` counts the modules of one target from 0.
    Under ``peft`` this is the LoRA wrapper of the linear layer (its output includes the adapter).
    Per-example adapters hook these modules."""
    out, seen = [], {}
    for name, module in lm.named_modules():
        leaf = name.rsplit(".", 1)[-1]
        if leaf in targets:
            out.append((leaf, seen.get(leaf, 0), module))
            seen[leaf] = seen.get(leaf, 0) + 1
    missing = [t for t in targets if t not in seen]
    if missing:
        names = {n.rsplit(".", 1)[-1] for n, _ in lm.named_modules()}
        raise ConfigError(f"lora_targets {missing} are not modules of this backbone; its linear layers include: "
                          + ", ".join(sorted(n for n in names if "proj" in n or "fc" in n or "dense" in n)[:12]))
    return out


def linear_shape(module: nn.Module) -> tuple[int, int]:
    """``(in_features, out_features)`` of a linear layer or of its ``peft`` wrapper."""
    base = getattr(module, "base_layer", module)
    return int(base.in_features), int(base.out_features)


class LLMRecommender(TorchRecommender):
    """A causal language model answering Yes/No prompts (see the module docstring).

    Subclasses say how prompts are built (``prompts(data, targets)``); this class tokenises,
    scores, trains and persists."""

    name = "llm"
    task = "llm"

    def __init__(self, backbone: str | None = None, dtype: str = "float32", max_tokens: int = 512, chat: bool = True,
                 system: str | None = None, answer_prefix: str = "", answers: tuple | list = ("Yes", "No"),
                 score_batch_size: int = 8, lora_r: int = 8, lora_alpha: float = 16.0, lora_dropout: float = 0.05,
                 lora_targets: tuple | list = ("q_proj", "v_proj"), objective: str = "lm", threads: int | None = None,
                 epochs: int = 2, batch_size: int = 8, lr: float = 1e-3, weight_decay: float = 0.0, seed: int = 0,
                 verbose: bool = True, device: str = "cpu", lr_schedule: str = "constant",
                 warmup_epochs: float = 0.0, prefix_cache: bool = True, **train):
        train = {"patience": 10**9, "valid_metric": "auc", "precision": "fp32", **train}
        super().__init__(epochs=epochs, batch_size=batch_size, lr=lr, weight_decay=weight_decay, seed=seed,
                         verbose=verbose, device=device, lr_schedule=lr_schedule, warmup_epochs=warmup_epochs, **train)
        if objective not in LOSSES:
            raise ConfigError(f"objective={objective!r}: choose one of {', '.join(LOSSES)}")
        if len(answers) != 2 or answers[0] == answers[1]:
            raise ConfigError(f"answers={list(answers)!r}: give two different answers, the positive first (Yes, No)")
        if int(max_tokens) < 8:
            raise ConfigError(f"max_tokens={max_tokens}: a token budget that small holds no prompt")
        self.backbone, self.dtype, self.max_tokens, self.chat = backbone, dtype, int(max_tokens), bool(chat)
        self.system, self.answer_prefix, self.answers = system, answer_prefix, list(answers)
        self.score_batch_size = int(score_batch_size)
        self.lora_r, self.lora_alpha, self.lora_dropout = int(lora_r), float(lora_alpha), float(lora_dropout)
        self.lora_targets, self.objective, self.threads = list(lora_targets), objective, threads
        self.prefix_cache = bool(prefix_cache)

    # ---- backbone and tokenizer ---------------------------------------------------------------
    def _backbone(self):
        """``(model, tokenizer)``: a fresh copy of the backbone (adapters are injected in place)."""
        source = B.resolve(self.backbone)
        known = getattr(self, "backbone_", None)
        if known and known.get("fingerprint") != source.fingerprint:
            raise RecForgeError(f"the backbone at {source.folder} is not the one this model was trained on "
                                f"(fingerprint {source.fingerprint}, trained on {known['fingerprint']}); give "
                                "backbone= (llm.path) of the same weights")
        model, tok = B.load(source, self.dtype, str(self.device_))
        self.backbone_ = {**source.describe(), "parameters": int(sum(p.numel() for p in model.parameters())),
                          "context": self._context_of(model, tok)}
        self._tok = tok
        return model, tok

    @staticmethod
    def _context_of(model, tok) -> int:
        ctx = getattr(model.config, "max_position_embeddings", None)
        if ctx is None:
            ctx = getattr(tok, "model_max_length", None)
        return int(ctx) if ctx and ctx < 10**8 else 10**8

    @property
    def tokenizer(self):
        if getattr(self, "_tok", None) is None:
            self._backbone_tokenizer_only()
        return self._tok

    def _backbone_tokenizer_only(self):
        from transformers import AutoTokenizer

        source = B.resolve(self.backbone)
        B.require_llm()
        B.offline()
        self._tok = AutoTokenizer.from_pretrained(str(source.folder), local_files_only=True)

    def answer_ids(self) -> list[int]:
        """The token ids of the two answers (the first token of each)."""
        tok = self.tokenizer
        ids = []
        for a in self.answers:
            t = tok(a, add_special_tokens=False)["input_ids"]
            if not t:
                raise ConfigError(f"answer {a!r} is no token for this tokenizer")
            ids.append(int(t[0]))
        if ids[0] == ids[1]:
            raise ConfigError(f"answers {list(self.answers)} begin with the same token; give answers that differ "
                              "in their first token")
        return ids

    def render(self, message: str) -> str:
        tok = self.tokenizer
        if self.chat and getattr(tok, "chat_template", None):
            msgs = ([{"role": "system", "content": self.system}] if self.system else []) + \
                   [{"role": "user", "content": message}]
            text = tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
        else:
            text = message + "\n"
        return text + (self.answer_prefix or "")

    def _encode(self, texts: list[str]) -> list[list[int]]:
        tok = self.tokenizer
        chat = self.chat and getattr(tok, "chat_template", None)
        rendered = [self.render(t) for t in texts]
        return tok(rendered, add_special_tokens=not chat)["input_ids"]

    def count_tokens(self, texts: list[str]) -> list[int]:
        """Tokens of each prompt as the model reads it (what ``max_tokens`` bounds)."""
        return [len(ids) for ids in self._encode(list(texts))]

    def _check_context(self, ids: list[list[int]]) -> None:
        ctx = (getattr(self, "backbone_", None) or {}).get("context")
        if not ctx:
            return
        longest = max((len(i) for i in ids), default=0)
        if longest > ctx:
            raise ConfigError(f"a prompt of {longest} tokens is longer than the model's context of {ctx} tokens; "
                              f"lower llm.max_tokens (now {self.max_tokens}) or k, or shorten the template")

    # ---- batches ------------------------------------------------------------------------------
    def _pad(self, ids: list[list[int]]) -> dict[str, torch.Tensor]:
        pad = self.tokenizer.pad_token_id
        pad = 0 if pad is None else int(pad)
        n = max(len(i) for i in ids)
        x = torch.full((len(ids), n), pad, dtype=torch.long)
        mask = torch.zeros((len(ids), n), dtype=torch.long)
        for r, seq in enumerate(ids):
            x[r, : len(seq)] = torch.as_tensor(seq, dtype=torch.long)
            mask[r, : len(seq)] = 1
        return {"input_ids": x, "attention_mask": mask, "last": mask.sum(1) - 1}

    # ---- scoring ------------------------------------------------------------------------------
    def conditioning(self, keys: torch.Tensor | None):
        """A context manager around one batch's forward pass, given the batch's ``keys`` (a
        ``(batch, m)`` tensor: int64 or float32, or None): the network's ``conditioned(keys)`` when it
        has per-example weights (CoRA, RecLoRA), else nothing."""
        conditioned = getattr(getattr(self, "net_", None), "conditioned", None)
        if keys is None or conditioned is None:
            return contextlib.nullcontext()
        return conditioned(keys)

    def train_keys(self, data) -> np.ndarray | None:
        """Keys of the training prompts (one row each: integers such as user and item indices, or a
        float vector), passed to :meth:`conditioning` with every training batch; None here."""
        return None

    def predict_proba(self, prompts: list[str], progress: bool | None = None, keys=None) -> np.ndarray:
        """P(first answer) of each prompt, normalised over the two answers (float64). ``keys``: one
        row of integers (or floats) per prompt, handed batch by batch to :meth:`conditioning`."""
        from tqdm.auto import tqdm

        if getattr(self, "net_", None) is None:
            raise RecForgeError("the model is not fitted: call fit (zero-shot: fit with no training prompts) first")
        prompts = list(prompts)
        if not prompts:
            return np.zeros(0)
        ids = self._encode(prompts)
        self._check_context(ids)
        keys = self._check_keys(keys, len(ids))
        answer = torch.as_tensor(self.answer_ids(), device=self.device_)
        out = np.empty(len(ids))
        lm = self.net_.lm
        lm.eval()
        bs = max(1, self.score_batch_size)
        threads = torch.get_num_threads()
        if self.threads:
            torch.set_num_threads(int(self.threads))
        # shared prefixes (e.g. one history with many candidates) run once; not with per-example weights
        groups = prefix_groups(ids) if self.prefix_cache and keys is None else []
        cached = [(n, g) for n, g in groups if n > 0]
        alone = np.array([i for n, g in groups if n == 0 for i in g] if groups else range(len(ids)), dtype=np.int64)
        alone = alone[np.argsort([-len(ids[i]) for i in alone], kind="stable")]  # by length: little padding
        batches = [(0, -1, alone[s : s + bs]) for s in range(0, len(alone), bs)]
        batches += [(n, j, np.asarray(g[s : s + bs])) for j, (n, g) in enumerate(cached) for s in range(0, len(g), bs)]
        computed = int(sum(len(ids[i]) for i in alone)) + sum(n + sum(len(ids[i]) - n for i in g) for n, g in cached)
        cache, cache_group = None, -1
        t0 = time.perf_counter()
        try:
            with torch.inference_mode():
                for n, group, idx in tqdm(batches, desc="scoring", unit="batch", dynamic_ncols=True,
                                          disable=not (self.verbose if progress is None else progress)):
                    b = {k: v.to(self.device_) for k, v in self._pad([ids[i][n:] for i in idx]).items()}
                    if n == 0:
                        kb = None if keys is None else torch.as_tensor(keys[idx], device=self.device_)
                        with self.conditioning(kb):
                            h = last_hidden(lm, b["input_ids"], b["attention_mask"], b["last"])
                    else:  # the group's prefix runs once, before its first batch
                        if group != cache_group:
                            cache, cache_group = prefix_cache(lm, ids[idx[0]][:n], self.device_), group
                        h = prefix_hidden(lm, cache, b)
                    logits = output_logits(lm, h, answer)
                    out[idx] = torch.softmax(logits, -1)[:, 0].double().cpu().numpy()
        finally:
            torch.set_num_threads(threads)
        seconds = time.perf_counter() - t0
        n_tok = int(sum(len(i) for i in ids))
        self.last_scoring_ = {"prompts": len(ids), "tokens": n_tok, "seconds": round(seconds, 3),
                              "tokens_per_second": round(n_tok / seconds, 1) if seconds > 0 else None,
                              "prompts_per_second": round(len(ids) / seconds, 2) if seconds > 0 else None,
                              "prefix_cache": {"groups": len(cached), "prompts": int(sum(len(g) for _, g in cached)),
                                               "tokens_computed": computed}}
        return out

    @staticmethod
    def _check_keys(keys, n: int) -> np.ndarray | None:
        if keys is None:
            return None
        keys = np.asarray(keys)
        if keys.dtype.kind in "iub":
            keys = keys.astype(np.int64)
        elif keys.dtype.kind == "f":
            keys = keys.astype(np.float32)
        else:
            raise RecForgeError(f"keys of dtype {keys.dtype}: give integers (indices) or floats (vectors)")
        if keys.ndim == 1:
            keys = keys[:, None]
        if keys.ndim != 2 or keys.shape[0] != n:
            raise RecForgeError(f"keys of shape {keys.shape} for {n} prompts: give one row of integers per prompt")
        return keys

    # ---- training (the shared trainer's contract) --------------------------------------------------
    def build(self, n_users: int = 0, n_items: int = 0) -> nn.Module:
        model, _ = self._backbone()
        for p in model.parameters():
            p.requires_grad_(False)
        if getattr(self, "adapted_", False):
            model = self._attach_lora(model)
        return AdapterNet(model)

    def _lora_config(self):
        from peft import LoraConfig

        return LoraConfig(r=self.lora_r, lora_alpha=self.lora_alpha, lora_dropout=self.lora_dropout,
                          target_modules=list(self.lora_targets), bias="none", task_type="CAUSAL_LM")

    def _attach_lora(self, model):
        from peft import get_peft_model

        names = {n.rsplit(".", 1)[-1] for n, _ in model.named_modules()}
        missing = [t for t in self.lora_targets if t not in names]
        if missing:
            raise ConfigError(f"lora_targets {missing} are not modules of this backbone; its linear layers include: "
                              + ", ".join(sorted(n for n in names if "proj" in n or "fc" in n or "dense" in n)[:12]))
        torch.manual_seed(self.seed)
        return get_peft_model(model, self._lora_config())

    def fit(self, data, valid=None):
        """Zero-shot when ``data`` has no training prompts (the backbone is only loaded); otherwise
        LoRA training on ``data.train_prompts`` / ``data.train_labels`` by the shared trainer."""
        texts = list(getattr(data, "train_prompts", None) or [])
        if not texts:
            self.adapted_ = False
            self.n_users_, self.n_items_ = getattr(data, "n_users", 0), getattr(data, "n_items", 0)
            self.net_ = self.build()
            self.history_ = {"zero_shot": True, "epochs": []}
            return self
        self.adapted_ = True
        return super().fit(data, valid)

    def prepare_fit(self, data) -> None:
        labels = np.asarray(data.train_labels, dtype=np.int64)
        if len(labels) != len(data.train_prompts):
            raise RecForgeError(f"{len(data.train_prompts)} training prompts but {len(labels)} labels")
        ids = self._encode(list(data.train_prompts))
        self._train_ids, self._train_labels = ids, labels
        self._train_keys = self._check_keys(self.train_keys(data), len(ids))
        self._train_tokens = 0
        self._train_seconds = 0.0

    def before_training(self, data, valid=None) -> None:
        self._check_context(self._train_ids)
        self._answer = torch.as_tensor(self.answer_ids(), device=self.device_)
        n_train = sum(p.numel() for p in self.net_.parameters() if p.requires_grad)
        self.adapter_parameters_ = int(n_train)

    def make_optimizer(self):
        params = [p for p in self.net_.parameters() if p.requires_grad]
        return torch.optim.AdamW(params, lr=self.lr, weight_decay=self.weight_decay)

    def n_train_batches(self, data) -> int:
        return math.ceil(len(self._train_ids) / self.batch_size)

    def train_batches(self, data, rng):
        order = rng.permutation(len(self._train_ids))
        for idx, _ in self.epoch_batches(order, rng):
            b = self._pad([self._train_ids[i] for i in idx])
            b["label"] = torch.as_tensor(self._train_labels[idx], dtype=torch.long)
            if getattr(self, "_train_keys", None) is not None:
                b["keys"] = torch.as_tensor(self._train_keys[idx])
            self._train_tokens += int(b["attention_mask"].sum())
            yield b

    def loss(self, batch) -> torch.Tensor:
        lm = self.net_.lm
        t0 = time.perf_counter()
        with self.conditioning(batch.get("keys")):
            h = last_hidden(lm, batch["input_ids"], batch["attention_mask"], batch["last"])
        if self.objective == "binary":
            out = F.cross_entropy(output_logits(lm, h, self._answer), 1 - batch["label"])  # class 0 = first answer
        else:
            target = torch.where(batch["label"] > 0, self._answer[0], self._answer[1])
            out = F.cross_entropy(output_logits(lm, h), target)
        self._train_seconds += time.perf_counter() - t0
        return out

    def _fit(self, split, valid):
        t0 = time.perf_counter()
        out = super()._fit(split, valid)
        seconds = self.history_.get("seconds") or (time.perf_counter() - t0)
        self.history_["training"] = {
            "prompts": len(self._train_ids), "epochs": self.epochs, "tokens": int(self._train_tokens),
            "seconds": round(float(seconds), 2),
            "tokens_per_second": round(self._train_tokens / seconds, 1) if seconds else None,
            "adapter_parameters": self.adapter_parameters_}
        self._train_ids = self._train_keys = None
        return out

    # ---- persistence ----------------------------------------------------------------------------
    def _fitted_state(self) -> dict:
        state = super()._fitted_state()
        state.pop("last_scoring_", None)
        return state

    def save_adapter(self, folder: str | Path) -> Path:
        """The LoRA adapters in the ``peft`` folder format (``adapter_config.json``,
        ``adapter_model.safetensors``)."""
        if not getattr(self, "adapted_", False):
            raise RecForgeError("this model has no adapters (zero-shot): nothing to save")
        folder = Path(folder)
        self.net_.lm.save_pretrained(str(folder))
        return folder

    def load_adapter(self, folder: str | Path) -> "LLMRecommender":
        """Replace the network by the backbone with the ``peft`` adapters of ``folder``."""
        from peft import PeftModel

        folder = Path(folder)
        if not (folder / "adapter_config.json").is_file():
            raise RecForgeError(f"{folder}: no adapter_config.json; give a folder written by save_adapter")
        model, _ = self._backbone()
        lm = PeftModel.from_pretrained(model, str(folder))
        lm.to(self.device_)
        lm.eval()
        self.adapted_ = True
        self.net_ = AdapterNet(lm)
        for n, p in self.net_.named_parameters():
            p.requires_grad_("lora_" in n)
        return self

    def export_merged(self, folder: str | Path) -> Path:
        """The backbone with the adapters merged into its weights, saved as a Hugging Face folder
        (weights and tokenizer) that ``backbone=`` / ``llm.path`` accepts. The model itself keeps
        its adapters."""
        folder = Path(folder)
        lm = self.net_.lm
        merged = copy.deepcopy(lm).merge_and_unload() if getattr(self, "adapted_", False) else copy.deepcopy(lm)
        merged.save_pretrained(str(folder), safe_serialization=True)
        self.tokenizer.save_pretrained(str(folder))
        return folder
