"""DPO and CausalDPO: preference alignment of the language-model recommender, plain and causal.

Zhao, Yang, Zhao & Guo, "Causal Direct Preference Optimization for Distributionally Robust Generative
Recommendation", arXiv 2603.22335 (2026). Authors' code: ``user683/CausalDPO``
(``trainer/causal_dpo_trainer.py``, ``causal_dpo.py``, ``causal_dpo.sh``). Plain DPO: Rafailov et al.,
"Direct Preference Optimization: Your Language Model is Secretly a Reward Model", NeurIPS 2023.

**Stage 1, SFT.** The recommender is first instruction-tuned as ReLLa's few-shot model
(:class:`~recforge.llm.rella.ReLLa`: LoRA adapters, the answer token of each sampled training prompt,
the shared trainer). This model is the DPO *reference* and the policy's starting point, as in the
authors' pipeline (``sft.py``, then ``causal_dpo.py`` resuming from the SFT adapter).

``sft_from`` (a run folder of a tuned ``rella`` model, or its ``model/`` folder) starts from that SFT
model instead of tuning one (the authors resume from their SFT checkpoint): its adapters must have the
same LoRA settings and backbone, and the preference pairs are still drawn from this run's training
sample. The benchmark tunes one SFT model per seed and aligns it twice (DPO, CausalDPO).

**Preference pairs.** Each liked training target (a sampled training row with label 1) is a *chosen*
prompt; ``negatives`` *rejected* prompts are the same user at the same time (so the same history is
shown, ``retrieval="recent"`` by default) asking about an item drawn uniformly, with the run seed, from
the items the user has no training rating of (the authors draw the rejected item from the prompt's
candidate list, which holds items the user did not choose). Only training rows are read.

**The DPO loss.** The implicit reward of a prompt is ``beta`` times the log-ratio of the policy's and
the reference's probability of "Yes" (normalised over the two answers, as scored); the loss of a pair
is ``log(1 + sum_k exp(r_k - r_chosen))`` over its rejected prompts ``k`` (for one negative,
``-log sigmoid(r_chosen - r_rejected)``, the DPO loss; for several, the authors' softmax form). The
reference's log-probabilities are computed once, before the preference epochs (the reference is frozen),
so no second model is held in memory. The same LoRA adapters go on training (``dpo_epochs``, AdamW at
``dpo_lr``).

**CausalDPO** adds, during the preference epochs:

* **latent environments by soft clustering**: each pair's context representation (the reference
  model's last hidden state of the chosen prompt, centred and L2-normalised) is softly assigned to
  ``environments`` clusters: k-means (k-means++ start, run seed) gives the centres and
  ``q(e | x) = softmax(-distance / temperature)`` the assignment;
* **the backdoor adjustment**: the preference loss is averaged within each environment (weighted by
  ``q``) and the environments are averaged with equal weight, ``(1/K) sum_e sum_i q_ie l_i / sum_i q_ie``,
  so that no environment's share of the training data sets how much its preferences count (the
  authors' code averages the per-environment losses the same way);
* **the invariance constraint**: ``mmd_weight`` times the mean, over pairs of environments, of the
  squared maximum mean discrepancy (RBF kernel, bandwidth ``mmd_sigma``) between the ``q``-weighted
  distributions of the pairs' reward margins (``r_chosen - r_rejected``, averaged over the rejected
  prompts) in the two environments: how strongly the policy prefers the liked item may not depend on
  the environment.

Deviations from the paper and the authors' code, and choices they leave open:

* The recommender answers Yes/No about one item (the framework's LLM task) rather than generating an
  item title after a candidate list; a preference pair is therefore two prompts of the same user and
  history, and the reward is the log-ratio of P(Yes) normalised over the two answers (the probability
  that is scored) instead of the log-likelihood of a generated title.
* Environments are fixed before the preference epochs from the frozen SFT model's representations. The
  authors learn a linear "causal feature" layer and the centres through the loss and re-seed the
  centres by DBSCAN on every batch; an assignment learned through the environment-averaged loss can
  lower that loss by isolating low-loss examples in one environment, so it is not learned here. Their
  features are the hidden state at position 0 (the first token, identical for every prompt of a causal
  LM); here the last prompt token's.
* The authors average token ids of the batch weighted by the cluster probabilities and run DPO on those
  averaged sequences; here the per-pair losses are weighted, which is what the averaging stands for.
* The invariance term compares the environments' distributions of reward margins, not of the policy's
  outputs: the authors' code compares the sequence-averaged vocabulary logits of each environment's
  averaged batch, at weight 0.001 with a kernel whose values between distinct such vectors are near 0.
  Matching the environments' hidden-state distributions instead would erase the very structure the
  environments are clustered on (on a tiny model it stopped the preference learning altogether). The
  margins start at 0 (policy = reference), so the term is 0 until the environments' preferences drift
  apart; ``mmd_weight=0.1`` is chosen a priori (a squared MMD of margins within a few units of the
  preference loss), not tuned.
* Backbone SmolLM2-135M-Instruct with LoRA on the attention query and value projections (the authors:
  Llama-3.1-8B in 4 bits, LoRA rank 64 on every projection); ``beta=1``, one negative, two preference
  epochs as the authors' script; ``dpo_lr`` a tenth of the SFT learning rate (theirs: 2e-5 for an 8B
  model); no log-ratio clamping (their +-10 clamp never binds on two-way probabilities here) and no
  gradient-norm clipping; the preference epochs are not checkpointed.
* :class:`DPO` is the same model without the environments (``causal=False``): the plain-DPO baseline.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import polars as pl
import torch

from recforge.data.schema import ITEM, USER
from recforge.errors import ConfigError
from recforge.llm.base import checked_step, last_hidden, output_logits
from recforge.llm.rella import PromptData, ReLLa


# ---- the losses (plain tensors, tested on hand-worked numbers) -------------------------------------------
def dpo_loss(policy_chosen: torch.Tensor, policy_rejected: torch.Tensor, ref_chosen: torch.Tensor,
             ref_rejected: torch.Tensor, beta: float) -> torch.Tensor:
    """Per-pair DPO loss from log-probabilities: chosen ``(n,)``, rejected ``(n,)`` or ``(n, m)`` (m
    negatives): ``log(1 + sum_k exp(beta * ((pr_k - rr_k) - (pc - rc))))``."""
    rc = beta * (policy_chosen - ref_chosen)
    rr = beta * (policy_rejected - ref_rejected)
    if rr.dim() == 1:
        rr = rr[:, None]
    z = torch.cat([torch.zeros_like(rc)[:, None], rr - rc[:, None]], dim=1)
    return torch.logsumexp(z, dim=1)


def backdoor_loss(losses: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """The environment-adjusted mean of per-example ``losses`` ``(n,)`` under soft assignments ``q``
    ``(n, K)``: each environment's ``q``-weighted mean, averaged over the environments present."""
    w = q.sum(0)
    keep = w > 1e-6
    per_env = (q[:, keep] * losses[:, None]).sum(0) / w[keep]
    return per_env.mean()


def environment_mmd(z: torch.Tensor, q: torch.Tensor, sigma: float) -> torch.Tensor:
    """Mean over pairs of environments of the squared MMD (RBF kernel of bandwidth ``sigma``) between
    the ``q``-weighted empirical distributions of the rows of ``z``; 0 with one environment."""
    n_env = q.shape[1]
    if n_env < 2:
        return z.new_zeros(())
    k = torch.exp(-torch.cdist(z, z).pow(2) / (2 * sigma ** 2))
    w = q / q.sum(0, keepdim=True).clamp_min(1e-12)
    g = w.T @ k @ w
    d = torch.diagonal(g)
    pairs = torch.triu_indices(n_env, n_env, offset=1)
    return (d[pairs[0]] + d[pairs[1]] - 2 * g[pairs[0], pairs[1]]).mean()


def soft_environments(features: np.ndarray, k: int, temperature: float, seed: int,
                      iters: int = 100) -> tuple[np.ndarray, np.ndarray]:
    """``(q, centres)``: k-means (k-means++ start drawn with ``seed``) on the centred, L2-normalised rows
    of ``features``, and the soft assignment ``q = softmax(-distance / temperature)`` ``(n, k)``."""
    x = np.asarray(features, dtype=np.float64)
    x = x - x.mean(0)
    x = x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)
    n = len(x)
    k = max(1, min(int(k), n))
    rng = np.random.default_rng(seed)
    centres = [x[rng.integers(n)]]
    for _ in range(1, k):
        d2 = ((x[:, None, :] - np.stack(centres)[None]) ** 2).sum(-1).min(1)
        centres.append(x[rng.choice(n, p=d2 / d2.sum())] if d2.sum() > 0 else x[rng.integers(n)])
    c = np.stack(centres)
    for _ in range(iters):
        a = ((x[:, None, :] - c[None]) ** 2).sum(-1).argmin(1)
        new = np.stack([x[a == j].mean(0) if (a == j).any() else c[j] for j in range(k)])
        if np.allclose(new, c):
            break
        c = new
    dist = np.sqrt(((x[:, None, :] - c[None]) ** 2).sum(-1))
    z = -dist / float(temperature)
    z -= z.max(1, keepdims=True)
    q = np.exp(z)
    return q / q.sum(1, keepdims=True), c


def preference_pairs(split, targets: pl.DataFrame, negatives: int, seed: int) -> tuple[pl.DataFrame, pl.DataFrame]:
    """``(chosen, rejected)`` target frames: the liked rows of ``targets``, and for each ``negatives``
    rows of the same user, time and history asking about an item drawn uniformly (with ``seed``) from
    the items the user has no *training* rating of (``negatives`` consecutive rows per chosen row)."""
    chosen = targets.filter(pl.col("label") == 1)
    if chosen.height == 0:
        raise ConfigError("no liked row among the sampled training targets: preference pairs need liked rows "
                          "(raise data.train_prompts)")
    rated = dict(split.train.select(USER, ITEM).group_by(USER).agg(pl.col(ITEM)).iter_rows())
    catalogue = np.arange(1, split.n_items + 1)
    rng = np.random.default_rng(seed)
    out = np.empty((chosen.height, negatives), dtype=np.int64)
    for j, u in enumerate(chosen[USER].to_numpy()):
        pool = np.setdiff1d(catalogue, np.asarray(rated.get(int(u), []), dtype=np.int64))
        if len(pool) < negatives:
            raise ConfigError(f"negatives={negatives}: user {int(u)} has only {len(pool)} items without a training "
                              "rating; lower negatives")
        out[j] = rng.choice(pool, size=negatives, replace=False)
    reps = np.repeat(np.arange(chosen.height), negatives)
    rejected = chosen[reps].with_columns(pl.Series(ITEM, out.ravel()).cast(chosen.schema[ITEM]),
                                         pl.lit(0, chosen.schema["label"]).alias("label"))
    return chosen, rejected


# ---- the models ------------------------------------------------------------------------------------------
class DPO(ReLLa):
    """Plain DPO after SFT (see the module docstring): ``beta``, ``negatives`` per chosen prompt,
    ``dpo_epochs`` at ``dpo_lr`` in batches of ``dpo_batch_size`` pairs (null: ``batch_size``). The
    other parameters are :class:`~recforge.llm.rella.ReLLa`'s (the SFT stage)."""

    name = "dpo"
    causal = False

    def __init__(self, retrieval: str = "recent", k: int = 10, mix: bool = False, beta: float = 1.0,
                 negatives: int = 1, dpo_epochs: int = 2, dpo_lr: float = 1e-4, dpo_batch_size: int | None = None,
                 sft_from: str | None = None, **params):
        super().__init__(retrieval=retrieval, k=k, mix=mix, **params)
        if float(beta) <= 0:
            raise ConfigError(f"beta={beta}: the DPO temperature must be positive (the authors' script: 1)")
        if int(negatives) < 1:
            raise ConfigError(f"negatives={negatives}: give at least one rejected item per liked training target")
        if int(dpo_epochs) < 1 or float(dpo_lr) <= 0:
            raise ConfigError(f"dpo_epochs={dpo_epochs}, dpo_lr={dpo_lr}: give at least one epoch and a positive "
                              "learning rate")
        self.beta, self.negatives = float(beta), int(negatives)
        self.dpo_epochs, self.dpo_lr = int(dpo_epochs), float(dpo_lr)
        self.dpo_batch_size = None if dpo_batch_size is None else int(dpo_batch_size)
        self.sft_from = None if sft_from in (None, "") else str(sft_from)

    def fit(self, data: PromptData, valid=None):
        if data.train_targets is None or data.train_targets.height == 0:
            raise ConfigError(f"{self.name} aligns a tuned model with preferences: give training prompts "
                              "(data.train_prompts=N)")
        if self.sft_from:
            self._load_sft(data)
        else:
            super().fit(data, valid)  # stage 1: SFT, the reference
        chosen_t, rejected_t = preference_pairs(data.split, data.train_targets, self.negatives, self.seed)
        chosen = self._encode(self.prompts(data, chosen_t)["prompt"].to_list())
        rejected = self._encode(self.prompts(data, rejected_t)["prompt"].to_list())
        self._check_context(chosen + rejected)
        t0 = time.perf_counter()
        ref_c, h_c = self._yes_logps(chosen)
        ref_r, _ = self._yes_logps(rejected)
        q = self._environments(h_c)
        reference_s = time.perf_counter() - t0
        curve, seconds, tokens = self._align(chosen, rejected, ref_c, ref_r.view(len(chosen), self.negatives), q)
        self.history_["alignment"] = {
            "pairs": len(chosen), "negatives": self.negatives, "beta": self.beta, "epochs": curve,
            "lr": self.dpo_lr, "reference_seconds": round(reference_s, 2), "seconds": round(seconds, 2),
            "tokens": tokens, "tokens_per_second": round(tokens / seconds, 1) if seconds else None,
            **({"environment_mass": [round(float(v), 2) for v in q.sum(0)]} if q.shape[1] > 1 else {})}
        return self

    # ---- pieces ------------------------------------------------------------------------------------------
    def _load_sft(self, data: PromptData) -> None:
        """Start from the tuned ReLLa model of ``sft_from`` (its adapter weights) instead of tuning one."""
        folder = Path(self.sft_from)
        if (folder / "model" / "model.pt").is_file():
            folder = folder / "model"
        if not (folder / "model.pt").is_file():
            raise ConfigError(f"sft_from={self.sft_from}: no model.pt there; give the run folder of a tuned rella "
                              "model (recforge train rella ... data.train_prompts=N) or its model/ folder")
        sft = ReLLa.load(folder, device=str(self.device_))
        if not getattr(sft, "adapted_", False):
            raise ConfigError(f"sft_from={self.sft_from}: a zero-shot model has no adapters to start from; tune it "
                              "with data.train_prompts=N")
        mine = (self.lora_r, self.lora_alpha, sorted(self.lora_targets))
        theirs = (sft.lora_r, sft.lora_alpha, sorted(sft.lora_targets))
        if mine != theirs:
            raise ConfigError(f"sft_from={self.sft_from}: its LoRA (r, alpha, targets) {theirs} differs from this "
                              f"model's {mine}; give the same lora_* settings")
        self.backbone_ = dict(sft.backbone_)  # _backbone() refuses other weights than the SFT model's
        self.adapted_ = True
        self.n_users_, self.n_items_ = data.n_users, data.n_items
        self.net_ = self.build()
        self.net_.load_state_dict(sft.net_.state_dict())
        self.to_device(self.device_)
        self.adapter_parameters_ = int(sum(p.numel() for p in self.net_.parameters() if p.requires_grad))
        self.history_ = {"epochs": [], "sft": {"from": str(folder), "training": sft.history_.get("training")}}


    def _yes_logps(self, ids: list[list[int]], grad: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        """log P(Yes) over the two answers and the last hidden state of each prompt (the current
        network; without ``grad`` in inference mode and batches of ``score_batch_size``)."""
        lm = self.net_.lm
        answer = torch.as_tensor(self.answer_ids(), device=self.device_)
        if grad:
            b = {k: v.to(self.device_) for k, v in self._pad(ids).items()}
            h = last_hidden(lm, b["input_ids"], b["attention_mask"], b["last"])
            return torch.log_softmax(output_logits(lm, h, answer), -1)[:, 0], h
        lm.eval()
        outs, hs = [], []
        bs = max(1, self.score_batch_size)
        with torch.inference_mode():
            for s in range(0, len(ids), bs):
                lp, h = self._yes_logps(ids[s : s + bs], grad=True)
                outs.append(lp.float().cpu())
                hs.append(h.float().cpu())
        return torch.cat(outs), torch.cat(hs)

    def _environments(self, h: torch.Tensor) -> torch.Tensor:
        """``(pairs, K)`` soft environment assignments; one environment (all ones) for plain DPO."""
        return torch.ones(len(h), 1)

    def _pair_loss(self, losses: torch.Tensor, q: torch.Tensor, margins: torch.Tensor) -> tuple[torch.Tensor, float]:
        """The batch loss from per-pair DPO losses, environments ``q`` and reward margins ``(n, 1)``
        (and the invariance term: none here)."""
        return losses.mean(), 0.0

    def _align(self, chosen, rejected, ref_c, ref_r, q) -> tuple[list[dict], float, int]:
        params = [p for p in self.net_.parameters() if p.requires_grad]
        opt = torch.optim.AdamW(params, lr=self.dpo_lr, weight_decay=self.weight_decay)
        rng = np.random.default_rng(self.seed + 1)
        bs = self.dpo_batch_size or self.batch_size
        m = self.negatives
        curve, tokens = [], 0
        threads = torch.get_num_threads()
        if self.threads:
            torch.set_num_threads(int(self.threads))
        t0 = time.perf_counter()
        from tqdm.auto import tqdm

        try:
            for epoch in range(1, self.dpo_epochs + 1):
                self.net_.lm.train()
                sums = {"loss": 0.0, "mmd": 0.0, "margin": 0.0, "accuracy": 0.0}
                order = rng.permutation(len(chosen))
                batches = [order[s : s + bs] for s in range(0, len(order), bs)]
                for idx in tqdm(batches, desc=f"{self.name} epoch {epoch}", disable=not self.verbose, leave=False):
                    rej = [rejected[i * m + j] for i in idx for j in range(m)]
                    pc, _ = self._yes_logps([chosen[i] for i in idx], grad=True)
                    pr, _ = self._yes_logps(rej, grad=True)
                    pr = pr.view(len(idx), m)
                    ti = torch.as_tensor(idx)
                    rc, rr = ref_c[ti].to(pc.device), ref_r[ti].to(pc.device)
                    losses = dpo_loss(pc.float(), pr.float(), rc, rr, self.beta)
                    margins = self.beta * ((pc.float() - rc)[:, None] - (pr.float() - rr))
                    loss, mmd = self._pair_loss(losses, q[ti].to(pc.device), margins.mean(1, keepdim=True))
                    value = checked_step(opt, loss, f"{self.name}: preference loss {{loss}} in epoch {epoch}; lower "
                                                    f"dpo_lr (now {self.dpo_lr}) or beta (now {self.beta})")
                    margin = margins.detach()
                    n = len(idx)
                    sums["loss"] += value * n
                    sums["mmd"] += mmd * n
                    sums["margin"] += float(margin.mean()) * n
                    sums["accuracy"] += float((margin > 0).float().mean()) * n
                    tokens += sum(len(chosen[i]) for i in idx) + sum(len(r) for r in rej)
                row = {"epoch": epoch, **{k: round(v / len(chosen), 5) for k, v in sums.items()}}
                curve.append(row)
                if self.verbose:
                    print(f"{self.name} epoch {epoch}: loss {row['loss']:.4f}  reward margin {row['margin']:+.4f}  "
                          f"pairs ranked right {row['accuracy']:.3f}")
        finally:
            torch.set_num_threads(threads)
            self.net_.lm.eval()
        return curve, time.perf_counter() - t0, int(tokens)

    def protocol_notes(self) -> dict:
        notes = super().protocol_notes()
        notes["tuning"] = (f"SFT: {notes['tuning']}; then {'CausalDPO' if self.causal else 'DPO'} from the SFT model "
                           f"(reference): beta {self.beta}, {self.negatives} rejected item(s) per liked training target "
                           f"(uniform among the user's items without a training rating), {self.dpo_epochs} epochs at "
                           f"lr {self.dpo_lr}")
        return notes


class CausalDPO(DPO):
    """CausalDPO (see the module docstring): DPO with ``environments`` soft-clustered latent
    environments (``temperature``), the backdoor-adjusted loss and the MMD invariance term
    (``mmd_weight``, ``mmd_sigma``)."""

    name = "causaldpo"
    causal = True

    def __init__(self, environments: int = 2, temperature: float = 0.1, mmd_weight: float = 0.1,
                 mmd_sigma: float = 1.0, **params):
        super().__init__(**params)
        if int(environments) < 2:
            raise ConfigError(f"environments={environments}: give at least 2 (with one, CausalDPO is plain DPO: "
                              "model=dpo)")
        if float(temperature) <= 0 or float(mmd_sigma) <= 0 or float(mmd_weight) < 0:
            raise ConfigError(f"temperature={temperature}, mmd_sigma={mmd_sigma}, mmd_weight={mmd_weight}: the first "
                              "two must be positive and the weight at least 0")
        self.environments, self.temperature = int(environments), float(temperature)
        self.mmd_weight, self.mmd_sigma = float(mmd_weight), float(mmd_sigma)

    def _environments(self, h: torch.Tensor) -> torch.Tensor:
        if len(h) < self.environments:
            raise ConfigError(f"{len(h)} preference pairs cannot form {self.environments} environments; raise "
                              "data.train_prompts or lower environments")
        q, _ = soft_environments(h.numpy(), self.environments, self.temperature, self.seed)
        return torch.as_tensor(q, dtype=torch.float32)

    def _pair_loss(self, losses, q, margins):
        mmd = environment_mmd(margins, q, self.mmd_sigma)
        return backdoor_loss(losses, q) + self.mmd_weight * mmd, float(mmd)

    def protocol_notes(self) -> dict:
        notes = super().protocol_notes()
        notes["environments"] = {"k": self.environments, "temperature": self.temperature,
                                 "features": "the SFT model's last hidden state of the chosen prompt",
                                 "invariance": "squared MMD of the reward margins between environments",
                                 "mmd_weight": self.mmd_weight, "mmd_sigma": self.mmd_sigma}
        return notes
