"""E2URec: efficient and effective unlearning of a LoRA-tuned language-model recommender.

Wang et al., "Towards Efficient and Effective Unlearning of Large Language Models for
Recommendation", Frontiers of Computer Science 19(3), 2025 (arXiv 2403.03536). A recommender
tuned on user data must be able to forget some users' data (privacy requests, polluted data).
Retraining without them is exact but costs a whole tuning run; gradient ascent on the forgotten
data is cheap but harms the recommendations of everyone else. E2URec freezes the tuned model,
inserts *new* lightweight LoRA weights and trains only those, by distillation from two teachers:

* the **forgetting teacher**, for the forgotten data D_f: an *augmented* model (the original tuned
  further on D_f, so that it over-expresses what D_f taught) defines the forced logits
  ``z_orig - alpha * relu(z_aug - z_orig)``, i.e. the original's logits with what D_f added pushed
  the other way; the student matches their distribution (KL);
* the **remembering teacher**, for the retained data D_r: the original model itself (KL), together
  with the ordinary answer loss on D_r.

Training (the paper's code): the first ``forget_epochs`` epochs take forgetting steps on D_f only;
later epochs take steps of ``weight * (CE(D_r) + KL(orig || student on D_r)) + (1 - weight) *
KL(forced || student on D_f)``. Distributions are the next-token distributions over the whole
vocabulary at the answer position.

How it runs here: :class:`E2URec` is a ReLLa-style LoRA recommender (``fit`` tunes ``peft`` LoRA
adapters on the sampled training prompts, :mod:`recforge.llm.rella`); :meth:`E2URec.unlearn` takes
the forgotten users, splits the model's training prompts into D_f (the forgotten users' prompts) and
D_r (the rest), computes the teachers' distributions once (the teachers are frozen), and trains the
unlearning adapters (:class:`UnlearnLoRA`: rank ``lora_r``, scale ``lora_alpha / lora_r``, on
``lora_targets``, applied by forward hooks on top of the frozen, tuned model; ``B`` starts at zero,
so the student starts as the original). The augmented model is the same kind of adapter, trained
first on D_f for ``aug_epochs`` with the answer loss, read, and reset before the student's
training. Afterwards the model scores with the unlearning adapters on; :meth:`E2URec.original`
switches them off for a comparison, and ``save``/``load`` keep both sets of adapters.

Comparison pieces (used by the task when ``data.forget_users`` is set, :mod:`recforge.llm.task`):
retraining on the retained prompts only (the exact baseline), AUC on the retained users' test rows
for the original, unlearned and retrained models, and the paper's forgetting measures on the
forgotten training prompts: the Jensen-Shannon divergence between the unlearned model's and the
retrained model's answer-position distributions (over the vocabulary, as the paper, and over the
two answers that are scored), with the original's divergence from the retrained model beside it, and
AUC / log-loss on D_f (:func:`forgetting_measures`); and the seconds of unlearning and retraining.

Deviations and open choices:

* Backbone SmolLM2-135M-Instruct instead of T5-base / LLaMA; MovieLens-100K per-user temporal split;
  the tuned model sees a few dozen sampled training prompts, so D_f is the forgotten users' prompts
  among those (a user is forgotten with all of its prompts, the paper's user-wise setting), and the
  users to forget are drawn among the users the model was tuned on.
* The augmented model is a LoRA adapter trained on D_f (``aug_epochs`` epochs at ``unlearn_lr``) on
  top of the tuned model, not a full fine-tuned copy; ``forget_teacher="base"`` replaces the forced
  logits by the untuned backbone's distribution (a model that never saw D_f nor any tuning data), an
  option not in the paper.
* When D_r has more batches than D_f the forgetting batches are cycled (the paper's code pairs the
  two loaders and stops at the shorter one); a fixed number of epochs, no checkpoint selection on a
  validation set; KL divergence in place of the paper's soft cross-entropy (the same gradients).
* Unlearning the same model twice is refused (unlearn from the original tuned model).
"""

from __future__ import annotations

import contextlib
import math
import time

import numpy as np
import polars as pl
import torch
from torch import nn
from torch.nn import functional as F

from recforge.data.schema import USER
from recforge.errors import ConfigError, RecForgeError
from recforge.llm.base import AdapterNet, checked_step, last_hidden, linear_shape, output_logits, target_linears
from recforge.llm.rella import PromptData, ReLLa

TEACHERS = ("augmented", "base")


class UnlearnLoRA(nn.Module):
    """Plain LoRA pairs (``A``: ``r x d_in``, ``B``: ``d_out x r``) on the target projections, added by
    forward hooks while :attr:`active`; the hooked model's own weights (and its ``peft`` adapters) are
    untouched."""

    def __init__(self, lm: nn.Module, targets, r: int, alpha: float, dropout: float):
        super().__init__()
        slots = target_linears(lm, targets)
        self.r, self.scale, self.dropout = int(r), float(alpha) / int(r), float(dropout)
        self.a = nn.ParameterList()
        self.b = nn.ParameterList()
        for _, _, module in slots:
            d_in, d_out = linear_shape(module)
            self.a.append(nn.Parameter(torch.empty(self.r, d_in)))
            self.b.append(nn.Parameter(torch.zeros(d_out, self.r)))
        self.active = False
        self.reset(0)
        self._handles = [module.register_forward_hook(self._hook(j)) for j, (_, _, module) in enumerate(slots)]

    def reset(self, seed: int) -> None:
        """``A`` drawn as LoRA draws it (Kaiming-uniform), ``B`` zero: no change to the model."""
        g = torch.Generator().manual_seed(int(seed))
        with torch.no_grad():
            for a, b in zip(self.a, self.b):
                bound = 1.0 / math.sqrt(a.shape[1])
                a.copy_(torch.rand(a.shape, generator=g) * 2 * bound - bound)
                b.zero_()

    def _hook(self, j: int):
        def hook(module, args, out):
            if not self.active:
                return None
            x = args[0]
            x = F.dropout(x, self.dropout, self.training) if self.dropout else x
            return out + (self.scale * ((x.to(self.a[j].dtype) @ self.a[j].T) @ self.b[j].T)).to(out.dtype)
        return hook


class UnlearnNet(AdapterNet):
    """The tuned model and its unlearning adapters. Its state dict holds both the ``peft`` LoRA
    weights and the unlearning adapters, whichever of them is being trained."""

    def __init__(self, lm: nn.Module, extra: UnlearnLoRA):
        super().__init__(lm)
        self.extra = extra

    def _trainable(self) -> set[str]:
        return {n for n, _ in self.named_parameters() if "lora_" in n or n.startswith("extra.")}


def js_divergence(logp: np.ndarray, logq: np.ndarray) -> np.ndarray:
    """Row-wise Jensen-Shannon divergence (natural log) of two distributions given as log-probabilities."""
    p, q = np.exp(logp.astype(np.float64)), np.exp(logq.astype(np.float64))
    m = 0.5 * (p + q)
    logm = np.log(np.maximum(m, 1e-300))
    kl_pm = (p * (logp - logm)).sum(-1)
    kl_qm = (q * (logq - logm)).sum(-1)
    return np.maximum(0.5 * (kl_pm + kl_qm), 0.0)


class E2URec(ReLLa):
    """E2URec (see the module docstring): a LoRA-tuned recommender (ReLLa's prompts and tuning) that
    can :meth:`unlearn` users. ``forget_teacher``: ``augmented`` (the paper's forced logits, strength
    ``alpha``) or ``base`` (the untuned backbone); ``weight``: the share of the retained-data terms in
    the mixed steps; ``unlearn_epochs`` epochs of unlearning, the first ``forget_epochs`` of them on the
    forgotten data only; ``aug_epochs``: epochs of the augmented model on the forgotten data;
    ``unlearn_lr`` / ``unlearn_batch_size``: AdamW's learning rate and prompts per step for both."""

    name = "e2urec"

    def __init__(self, retrieval: str = "recent", k: int = 10, mix: bool = False, forget_teacher: str = "augmented",
                 alpha: float = 2.0, weight: float = 0.6, unlearn_epochs: int = 2, forget_epochs: int = 1,
                 aug_epochs: int = 3, unlearn_lr: float = 1e-3, unlearn_batch_size: int = 8, **params):
        super().__init__(retrieval=retrieval, k=k, mix=mix, **params)
        if forget_teacher not in TEACHERS:
            raise ConfigError(f"forget_teacher={forget_teacher!r}: choose one of {', '.join(TEACHERS)}")
        if not 0.0 <= float(weight) <= 1.0:
            raise ConfigError(f"weight={weight}: the retained data's share of a mixed step is between 0 and 1")
        if int(unlearn_epochs) < 1 or not 0 <= int(forget_epochs) <= int(unlearn_epochs) or int(aug_epochs) < 0:
            raise ConfigError(f"unlearn_epochs={unlearn_epochs}, forget_epochs={forget_epochs}, "
                              f"aug_epochs={aug_epochs}: give at least one unlearning epoch, of which at most all are "
                              "forgetting-only epochs")
        if int(unlearn_batch_size) < 1 or float(unlearn_lr) <= 0:
            raise ConfigError(f"unlearn_batch_size={unlearn_batch_size}, unlearn_lr={unlearn_lr}: give positive values")
        self.forget_teacher, self.alpha, self.weight = forget_teacher, float(alpha), float(weight)
        self.unlearn_epochs, self.forget_epochs = int(unlearn_epochs), int(forget_epochs)
        self.aug_epochs = int(aug_epochs)
        self.unlearn_lr, self.unlearn_batch_size = float(unlearn_lr), int(unlearn_batch_size)

    # ---- the network ------------------------------------------------------------------------------
    def build(self, n_users: int = 0, n_items: int = 0) -> nn.Module:
        lm = super().build(n_users, n_items).lm
        extra = UnlearnLoRA(lm, self.lora_targets, self.lora_r, self.lora_alpha, self.lora_dropout)
        for p in extra.parameters():
            p.requires_grad_(False)
        extra.active = bool(getattr(self, "unlearned_", None))
        return UnlearnNet(lm, extra)

    @contextlib.contextmanager
    def original(self):
        """Score as the tuned model before unlearning (the unlearning adapters off) inside the block."""
        extra = self.net_.extra
        was = extra.active
        extra.active = False
        try:
            yield self
        finally:
            extra.active = was

    # ---- data ----------------------------------------------------------------------------------------
    def training_frame(self, data: PromptData) -> pl.DataFrame:
        """The training prompts of ``data.train_targets`` as :meth:`fit` builds them."""
        targets = data.train_targets
        if targets is None or targets.height == 0:
            raise RecForgeError("no training targets: unlearning starts from the model's training prompts "
                                "(data.train_targets, the task's data.train_prompts)")
        return pl.concat([self.prompts(data, targets, r) for r in self.training_retrievals()])

    def _vocab_logits(self, ids: list[list[int]], grad: bool = False, bs: int | None = None) -> torch.Tensor:
        """Next-token logits over the vocabulary at the end of each prompt (float32, in prompt order)."""
        lm = self.net_.lm
        bs = bs or max(1, self.score_batch_size)
        outs = []
        ctx = contextlib.nullcontext() if grad else torch.no_grad()
        with ctx:
            for s in range(0, len(ids), bs):
                b = {k: v.to(self.device_) for k, v in self._pad(ids[s : s + bs]).items()}
                h = last_hidden(lm, b["input_ids"], b["attention_mask"], b["last"])
                outs.append(output_logits(lm, h))
        return torch.cat(outs) if outs else torch.zeros(0)

    def answer_distribution(self, prompts: list[str]) -> np.ndarray:
        """Log-probabilities of the next token over the whole vocabulary after each prompt (the
        distributions the forgetting measures compare), float32 ``(n, vocab)``."""
        if getattr(self, "net_", None) is None:
            raise RecForgeError("the model is not fitted")
        ids = self._encode(list(prompts))
        self._check_context(ids)
        lm = self.net_.lm
        was = lm.training
        lm.eval()
        try:
            out = torch.log_softmax(self._vocab_logits(ids), -1).cpu().numpy()
        finally:
            lm.train(was)
        return out

    # ---- unlearning -----------------------------------------------------------------------------------
    def _answer_loss(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        if self.objective == "binary":
            return F.cross_entropy(logits[:, self._answer], 1 - labels)
        return F.cross_entropy(logits, torch.where(labels > 0, self._answer[0], self._answer[1]))

    @staticmethod
    def _kl(teacher: torch.Tensor, student: torch.Tensor) -> torch.Tensor:
        """KL(teacher || student) of logits, averaged over rows."""
        return F.kl_div(torch.log_softmax(student, -1), torch.log_softmax(teacher, -1), log_target=True,
                        reduction="batchmean")

    def _step(self, opt, loss: torch.Tensor, where: str = "") -> float:
        """One optimiser step on ``loss`` (stops on a non-finite loss); the loss as a float."""
        return checked_step(opt, loss, f"unlearning stopped: the loss is {{loss}}{where}; lower unlearn_lr "
                                       f"(now {self.unlearn_lr:g})")

    def _batches(self, n: int, rng: np.random.Generator) -> list[np.ndarray]:
        order = rng.permutation(n)
        return [order[s : s + self.unlearn_batch_size] for s in range(0, n, self.unlearn_batch_size)]

    def unlearn(self, data: PromptData, forget_users) -> "E2URec":
        """Forget every training prompt of the users ``forget_users`` (user indices of ``data.split``):
        train the unlearning adapters from the two teachers (see the module docstring). Records what
        was done in ``unlearned_`` (users, prompt counts, losses, seconds)."""
        if getattr(self, "net_", None) is None or not getattr(self, "adapted_", False):
            raise RecForgeError("unlearning needs a LoRA-tuned model: fit it on training prompts first "
                                "(the task's data.train_prompts > 0)")
        if getattr(self, "unlearned_", None):
            raise RecForgeError("this model has already unlearned users; unlearn again from the original tuned "
                                "model (load it again) with all the users to forget")
        users = sorted({int(u) for u in np.atleast_1d(np.asarray(forget_users))})
        if not users:
            raise ConfigError("no user to forget: give one or more user indices")
        t0 = time.perf_counter()
        frame = self.training_frame(data)
        forgotten = frame[USER].is_in(users).to_numpy()
        if not forgotten.any():
            raise RecForgeError(f"none of the {len(users)} users to forget has a training prompt: the model never saw "
                                "their data, there is nothing to forget")
        ids = self._encode(frame["prompt"].to_list())
        self._check_context(ids)
        labels = torch.as_tensor(frame["label"].to_numpy().astype(np.int64), device=self.device_)
        f_idx, r_idx = np.flatnonzero(forgotten), np.flatnonzero(~forgotten)
        self._answer = torch.as_tensor(self.answer_ids(), device=self.device_)
        net, extra = self.net_, self.net_.extra
        tuned = [p for n, p in net.lm.named_parameters() if "lora_" in n]
        for p in tuned:  # the tuned model is a teacher: frozen while the unlearning adapters train
            p.requires_grad_(False)
        threads = torch.get_num_threads()
        if self.threads:
            torch.set_num_threads(int(self.threads))
        record = {"users": users, "forgotten_prompts": int(len(f_idx)), "retained_prompts": int(len(r_idx)),
                  "forget_teacher": self.forget_teacher, "alpha": self.alpha, "weight": self.weight}
        try:
            net.eval()
            extra.active = False
            # the teachers' distributions, once: the original on every prompt ...
            t1 = time.perf_counter()
            orig = self._vocab_logits(ids)
            # ... and the forgetting teacher on the forgotten prompts
            f_ids = [ids[i] for i in f_idx]
            if self.forget_teacher == "base":
                with net.lm.disable_adapter():
                    forced = self._vocab_logits(f_ids)
            else:
                extra.reset(self.seed + 1)
                extra.active = True
                aug_losses = self._train_extra(
                    self.aug_epochs, lambda idx: self._answer_loss(self._vocab_logits(
                        [f_ids[i] for i in idx], grad=True, bs=len(idx)), labels[f_idx[idx]]), len(f_idx))
                net.eval()
                aug = self._vocab_logits(f_ids)
                extra.active = False
                forced = orig[f_idx] - self.alpha * F.relu(aug - orig[f_idx])
                record["augmented_losses"] = aug_losses
            record["teacher_seconds"] = round(time.perf_counter() - t1, 2)
            # the student: fresh unlearning adapters, from the original
            extra.reset(self.seed)
            extra.active = True
            t2 = time.perf_counter()
            losses = self._train_student(ids, labels, orig, forced, f_idx, r_idx)
            record["student_seconds"] = round(time.perf_counter() - t2, 2)
            record["losses"] = losses
        except BaseException:
            extra.reset(self.seed)
            extra.active = False
            raise
        finally:
            for p in extra.parameters():
                p.requires_grad_(False)
            for p in tuned:
                p.requires_grad_(True)
            net.eval()
            torch.set_num_threads(threads)
        with torch.no_grad():
            self._answer_probs_forced = torch.softmax(forced[:, self._answer], -1)[:, 0].cpu().numpy()
        record["forget_teacher_p"] = [round(float(x), 6) for x in self._answer_probs_forced]
        record["seconds"] = round(time.perf_counter() - t0, 2)
        record["trainable_parameters"] = int(sum(p.numel() for p in extra.parameters()))
        self.unlearned_ = record
        return self

    def _train_extra(self, epochs: int, step_loss, n: int) -> list[float]:
        """Epochs of AdamW on the unlearning adapters over ``n`` examples in batches; ``step_loss(idx)``."""
        extra = self.net_.extra
        for p in extra.parameters():
            p.requires_grad_(True)
        opt = torch.optim.AdamW(extra.parameters(), lr=self.unlearn_lr, weight_decay=0.0)
        rng = np.random.default_rng(self.seed)
        self.net_.train()
        out = []
        for epoch in range(epochs):
            total, count = 0.0, 0
            for idx in self._batches(n, rng):
                total += self._step(opt, step_loss(idx))
                count += 1
            out.append(round(total / max(1, count), 6))
        return out

    def _train_student(self, ids, labels, orig, forced, f_idx, r_idx) -> list[dict]:
        f_ids = [ids[i] for i in f_idx]

        def forget_loss(fb):
            return self._kl(forced[fb], self._vocab_logits([f_ids[i] for i in fb], grad=True, bs=len(fb)))

        history = []
        extra = self.net_.extra
        for p in extra.parameters():
            p.requires_grad_(True)
        opt = torch.optim.AdamW(extra.parameters(), lr=self.unlearn_lr, weight_decay=0.0)
        rng = np.random.default_rng(self.seed)
        self.net_.train()
        for epoch in range(1, self.unlearn_epochs + 1):
            total, count = 0.0, 0
            mixed = epoch > self.forget_epochs and len(r_idx) > 0
            f_batches = self._batches(len(f_idx), rng)
            steps = self._batches(len(r_idx), rng) if mixed else f_batches
            for s, batch in enumerate(steps):
                if mixed:
                    rb = r_idx[batch]
                    student = self._vocab_logits([ids[i] for i in rb], grad=True, bs=len(rb))
                    retain = self._answer_loss(student, labels[rb]) + self._kl(orig[rb], student)
                    loss = self.weight * retain + (1 - self.weight) * forget_loss(f_batches[s % len(f_batches)])
                else:
                    loss = forget_loss(batch)
                total += self._step(opt, loss, f" at epoch {epoch}")
                count += 1
            history.append({"epoch": epoch, "steps": "forget + retain" if mixed else "forget", "batches": count,
                            "loss": round(total / max(1, count), 6)})
        return history

    def protocol_notes(self) -> dict:
        out = super().protocol_notes()
        u = getattr(self, "unlearned_", None)
        if u:
            out["unlearned"] = ("E2URec: extra LoRA adapters distilled from the forgetting teacher "
                                 f"({self.forget_teacher}) on {u['forgotten_prompts']} forgotten prompts and from the "
                                 f"original model on {u['retained_prompts']} retained prompts")
        return out

    def save_adapter(self, folder):
        if getattr(self, "unlearned_", None):
            raise RecForgeError("an unlearned E2URec holds two sets of adapters (the tuned ones and the unlearning "
                                "ones); save() keeps both")
        return super().save_adapter(folder)

    def export_merged(self, folder):
        if getattr(self, "unlearned_", None):
            raise RecForgeError("an unlearned E2URec's unlearning adapters are applied by hooks and are not merged; "
                                "save() keeps the model")
        return super().export_merged(folder)


def forgetting_measures(unlearned: E2URec, retrained: E2URec, prompts: list[str], labels) -> dict:
    """The paper's forgetting measures on the forgotten training prompts: Jensen-Shannon divergence
    of the answer-position distributions from the retrained model's (over the vocabulary, and over the
    two answers), for the unlearned and, for reference, the original model; AUC (when both classes
    are present) and log-loss of each of the three models."""
    from recforge.evaluation.pointwise import auc, logloss

    labels = np.asarray(labels, dtype=np.float64)
    ans = unlearned.answer_ids()
    dist = {"unlearned": unlearned.answer_distribution(prompts), "retrained": retrained.answer_distribution(prompts)}
    with unlearned.original():
        dist["original"] = unlearned.answer_distribution(prompts)
    two = {k: v[:, ans] - np.logaddexp(v[:, ans[0]], v[:, ans[1]])[:, None] for k, v in dist.items()}
    out = {"prompts": len(prompts), "like_rate": round(float(labels.mean()), 4) if len(labels) else None}
    for k in ("unlearned", "original"):
        out[f"jsd_vocab_{k}_vs_retrained"] = float(js_divergence(dist[k], dist["retrained"]).mean())
        out[f"jsd_answers_{k}_vs_retrained"] = float(js_divergence(two[k], two["retrained"]).mean())
    for k, v in two.items():
        p = np.exp(v[:, 0].astype(np.float64))
        a = auc(labels, p)
        out[k] = {"p_mean": round(float(p.mean()), 6), "auc": None if np.isnan(a) else a, "logloss": logloss(labels, p)}
    return out
