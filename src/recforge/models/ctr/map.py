"""MAP: model-agnostic self-supervised pre-training of a CTR model's embeddings and interactions.

Lin, Qu, Guo, Dai, Tang, Yu and Zhang, "MAP: A Model-agnostic Pretraining Framework for
Click-through Rate Prediction", KDD 2023 (authors' code: CHIANGEL/MAP-CODE). Before CTR training,
the embedding layer and the feature-interaction layer of any CTR model are trained on the training
rows without their labels, on one of two tasks over corrupted rows; then the whole model is
fine-tuned on the clicks as usual (the shared trainer, a fresh optimiser). Every CTR model takes it
through ``pretrain``::

    pretrain: {method: mfp, epochs: 10, mask_ratio: 0.3, negatives: 25, lr: null, weight_decay: 0.0,
               batch_size: null, proj: 32, replace: unigram}

(``pretrain=mfp`` or ``pretrain=rfd`` alone takes the defaults; ``lr``/``batch_size`` null: the
model's.) What is done:

* **Corruption.** In every row, ``k = max(1, ⌊mask_ratio · n + ½⌋)`` distinct categorical fields
  out of its ``n`` are chosen at random (a fresh draw per row and epoch). Numeric, multi-valued and
  sequence fields are never chosen and stay as they are.
* **MFP** (masked feature prediction): a chosen field's id is replaced by the padding id (so its
  first-order weight drops out) and its embedding by a learned mask vector of that field. The
  network's representation of the row (``net.represent``, below) goes through a linear layer to
  one ``proj``-sized vector per field, which scores candidate ids of that field against an output
  table (one vector and bias per id). Each masked id is told from ``negatives`` ids drawn from the
  field's frequency in the training rows by noise-contrastive estimation (the authors' loss:
  binary cross-entropy of ``s − log V − log(negatives · q)``, ``s`` the score, ``q`` the noise
  probability, ``V`` the field's vocabulary size), summed over the candidates and averaged over
  the masked fields.
* **RFD** (replaced feature detection): a chosen field's id is replaced by an id drawn from the
  field's frequency in the training rows (``replace: unigram``, the authors' default) or uniformly
  from its vocabulary (``uniform``); an MLP (``n · proj`` hidden units, ReLU) over the
  representation gives one logit per categorical field, trained with binary cross-entropy against
  "this field's id differs from the original" (a draw of the same id counts as not replaced).
* **Optimisation.** AdamW (``lr``, ``weight_decay``) with a cosine schedule to 0 over the
  ``epochs``, as the authors', shuffled batches of ``batch_size`` rows; the heads and the mask
  vectors are dropped afterwards. With ``embedding_bits`` the integer tables are updated by ALPT
  after every step here too. The loss of each epoch goes to ``history_["pretrain"]``; the method,
  settings and seconds to the run's protocol.

The representation (``net.represent(batch, embs)``, ``embs`` the field embeddings the network
reads, in layout order): LR, which has no embeddings, the per-field first-order terms
concatenated; FM the concatenated field embeddings and the pairwise-interaction vector
``½((Σv)² − Σv²)``; DeepFM, as in the authors' code, the MLP's last hidden layer and the FM logit
(first-order plus pairwise); DCN-V2, as in the authors' code, the input of the output layer (cross
network and MLP outputs, or the stacked MLP output); FinalMLP the two streams' outputs before the
bilinear fusion; DIN the MLP's last hidden layer over the embeddings and the attention-pooled
behaviour vector. Models without ``represent`` (the multi-task ones) refuse ``pretrain``.

Deviations from the paper and the authors' code: negatives are drawn from the masked field's own
frequency and scored against that field's ids (the code draws from all features of all fields);
exactly ``k`` distinct fields are chosen per row (the released scripts draw ``⌊mask_ratio · n⌋``
positions with replacement); the mask is a per-field vector, not one shared mask feature; no
gradient clipping; pre-training length and rate are settings, not the paper's per-dataset choices.
"""

from __future__ import annotations

import math
import time

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from recforge.errors import ConfigError
from recforge.models.ctr.pretraining import pretrain_epochs
from recforge.training.device import autocast

METHODS = ("mfp", "rfd")
DEFAULTS = {"epochs": 10, "mask_ratio": 0.3, "negatives": 25, "lr": None, "weight_decay": 0.0, "batch_size": None,
            "proj": 32, "replace": "unigram"}


def check_pretrain(cfg) -> dict | None:
    """The ``pretrain`` setting with its defaults filled in (None: no pre-training); one
    :class:`ConfigError` naming the first bad entry."""
    if cfg is None or cfg is False:
        return None
    if isinstance(cfg, str):
        cfg = {"method": cfg}
    if not isinstance(cfg, dict):
        raise ConfigError(f"pretrain={cfg!r}: give null, mfp, rfd or a mapping such as {{method: mfp, epochs: 10}}")
    unknown = sorted(set(cfg) - {"method", *DEFAULTS})
    if unknown:
        raise ConfigError(f"pretrain: unknown key(s) {', '.join(unknown)}; valid: method, {', '.join(DEFAULTS)}")
    out = {"method": str(cfg.get("method")).lower(), **DEFAULTS, **{k: v for k, v in cfg.items() if k != "method"}}
    if out["method"] not in METHODS:
        raise ConfigError(f"pretrain.method={cfg.get('method')!r}: choose mfp (masked feature prediction) or rfd "
                          "(replaced feature detection)")

    def whole(key, low):
        v = out[key]
        if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < low:
            raise ConfigError(f"pretrain.{key}={v!r}: give a whole number >= {low}")

    whole("epochs", 1)
    whole("negatives", 1)
    whole("proj", 1)
    if out["batch_size"] is not None:
        whole("batch_size", 2)
    if not isinstance(out["mask_ratio"], (int, float)) or not 0 < out["mask_ratio"] <= 1:
        raise ConfigError(f"pretrain.mask_ratio={out['mask_ratio']!r}: give a share of the fields in (0, 1]")
    if out["lr"] is not None and (not isinstance(out["lr"], (int, float)) or out["lr"] <= 0):
        raise ConfigError(f"pretrain.lr={out['lr']!r}: give a positive learning rate (null: the model's lr)")
    if not isinstance(out["weight_decay"], (int, float)) or out["weight_decay"] < 0:
        raise ConfigError(f"pretrain.weight_decay={out['weight_decay']!r}: give a number >= 0")
    if out["replace"] not in ("unigram", "uniform"):
        raise ConfigError(f"pretrain.replace={out['replace']!r}: choose unigram (the field's frequency) or uniform")
    return out


def n_masked(n_fields: int, ratio: float) -> int:
    """How many of a row's ``n_fields`` categorical fields are corrupted: ``⌊ratio · n + ½⌋``, at
    least 1 and at most ``n``."""
    return int(min(n_fields, max(1, math.floor(ratio * n_fields + 0.5))))


def choose_fields(n_rows: int, n_fields: int, k: int, generator: torch.Generator | None = None,
                  device=None) -> torch.Tensor:
    """A ``(n_rows, n_fields)`` boolean mask with exactly ``k`` distinct fields chosen per row."""
    r = torch.rand(n_rows, n_fields, generator=generator, device=device)
    mask = torch.zeros(n_rows, n_fields, dtype=torch.bool, device=device)
    return mask.scatter_(1, r.argsort(1)[:, :k], True)


class FieldSampler(nn.Module):
    """Draws ids of given fields from per-field distributions in one ``searchsorted``: field ``j``'s
    cumulative distribution is laid on ``[j, j + 1]`` of one increasing array."""

    def __init__(self, probs: list[torch.Tensor]):
        super().__init__()
        self.offsets = [0]
        cdfs = []
        for j, p in enumerate(probs):
            c = torch.cumsum(p.double(), 0) / p.double().sum()
            c[-1] = 1.0
            cdfs.append(j + c)
            self.offsets.append(self.offsets[-1] + len(p))
        self.register_buffer("cdf", torch.cat(cdfs))
        self.register_buffer("start", torch.tensor(self.offsets[:-1]))

    def forward(self, fields: torch.Tensor, n: int, generator: torch.Generator | None = None) -> torch.Tensor:
        """``(len(fields), n)`` ids, local to each field's table (row ``i`` from field ``fields[i]``)."""
        u = torch.rand(len(fields), n, generator=generator, dtype=torch.float64, device=self.cdf.device)
        x = fields.unsqueeze(1).double() + u.clamp(1e-9, 1 - 1e-9)
        glob = torch.searchsorted(self.cdf, x).clamp(max=len(self.cdf) - 1)
        return glob - self.start[fields].unsqueeze(1)


class MFPHead(nn.Module):
    """Masked feature prediction: mask vectors, the per-field projection and the output tables."""

    def __init__(self, rep_dim: int, dims: list[int], counts: list[np.ndarray], proj: int):
        super().__init__()
        self.proj = proj
        self.mask = nn.ParameterList(nn.Parameter(torch.randn(d) * 1e-2) for d in dims)
        self.encoder = nn.Linear(rep_dim, len(dims) * proj)
        probs = [torch.from_numpy(c.astype(np.float64) / c.sum()).clamp(min=1e-10) for c in counts]
        probs = [p / p.sum() for p in probs]
        self.sampler = FieldSampler(probs)
        total = self.sampler.offsets[-1]
        self.out = nn.Embedding(total, proj)
        nn.init.uniform_(self.out.weight, -proj ** -0.5, proj ** -0.5)
        logq = torch.cat([p.log() for p in probs]).float()
        norm = torch.cat([torch.full((len(p),), math.log(len(p))) for p in probs]).float()
        self.register_buffer("logq", logq)
        self.register_buffer("norm", norm)
        self.bias = nn.Parameter(logq + norm)  # the model starts at the noise distribution (the authors' choice)

    def loss(self, h: torch.Tensor, ids: torch.Tensor, mask: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        rows, cols = mask.nonzero(as_tuple=True)
        z = self.encoder(h).view(h.shape[0], -1, self.proj)[rows, cols]  # (M, proj)
        start = self.sampler.start[cols].unsqueeze(1)
        cand = torch.cat([ids[rows, cols].unsqueeze(1), noise], 1) + start  # (M, 1 + K) global ids
        s = (self.out(cand) * z.unsqueeze(1)).sum(-1) + self.bias[cand] - self.norm[cand]
        logit = s - self.logq[cand] - math.log(noise.shape[1])
        label = torch.zeros_like(logit)
        label[:, 0] = 1.0
        return F.binary_cross_entropy_with_logits(logit, label, reduction="none").sum(1).mean()


class RFDHead(nn.Module):
    """Replaced feature detection: one logit per categorical field from the representation."""

    def __init__(self, rep_dim: int, n_fields: int, proj: int):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(rep_dim, n_fields * proj), nn.ReLU(), nn.Linear(n_fields * proj, n_fields))

    def loss(self, h: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return F.binary_cross_entropy_with_logits(self.net(h), labels)


class Pretrainer:
    """Runs MAP pre-training on a CTR model's built network (see the module docstring)."""

    def __init__(self, model, split):
        self.model, self.split = model, split
        self.cfg = check_pretrain(model.pretrain)
        self.net = model.net_
        if not callable(getattr(self.net, "represent", None)):
            raise ConfigError(f"pretrain: {model.name} does not expose the representation MAP pre-trains (represent); "
                              "MAP is available for lr, fm, deepfm, dcnv2, din and finalmlp")
        self.device = model.device_
        skip = tuple(getattr(self.net, "skip", ()))
        self.cats = [f for f in model.fields_ if f["kind"] == "categorical"]
        if not self.cats:
            raise ConfigError("pretrain: MAP corrupts categorical fields and this data has none")
        read = [f["name"] for f in model.fields_ if f["name"] not in skip]
        self.pos = [read.index(f["name"]) if f["name"] in read else None for f in self.cats]
        self.emb = getattr(self.net, "embedding", None)
        self.k = n_masked(len(self.cats), self.cfg["mask_ratio"])
        self.gen = torch.Generator(device=self.device)
        self.gen.manual_seed(int(model.seed))
        self.rep_dim = self._rep_dim()
        counts = self._counts()
        if self.cfg["method"] == "mfp":
            names = [f["name"] for f in model.fields_]
            dims = [self.emb.dims[names.index(f["name"])] if self.emb is not None else 1 for f in self.cats]
            self.head = MFPHead(self.rep_dim, dims, counts, self.cfg["proj"]).to(self.device)
        else:
            self.head = RFDHead(self.rep_dim, len(self.cats), self.cfg["proj"]).to(self.device)
            self.sampler = FieldSampler([torch.from_numpy(c) for c in counts]).to(self.device)

    def _counts(self) -> list[np.ndarray]:
        out = []
        for f in self.cats:
            c = np.bincount(np.asarray(self.split.train.x[f["name"]]).ravel(), minlength=f["vocab"])[: f["vocab"]]
            if self.cfg["replace"] == "uniform" and self.cfg["method"] == "rfd":
                c = np.ones(f["vocab"])
                c[: min(2, len(c) - 1)] = 0  # padding and out-of-vocabulary ids are not values
            out.append(c.astype(np.float64) + (c.sum() == 0))
        return out

    def _embeddings(self, batch, masked=None):
        """The field embeddings the network reads; with ``masked`` (MFP), the masked fields' are
        the mask vectors."""
        if self.emb is None:
            return None
        embs = self.emb(batch, skip=tuple(getattr(self.net, "skip", ())))
        if masked is not None:
            for j, p in enumerate(self.pos):
                if p is not None:
                    embs[p] = torch.where(masked[:, j : j + 1], self.head.mask[j].to(embs[p].dtype), embs[p])
        return embs

    def corrupt(self, batch) -> dict:
        """The corrupted batch (``batch``), the chosen fields (``chosen``, ``(B, n_cat)`` in the
        order of ``self.cats``), and what the head scores: the original ids and the negatives
        (MFP) or the replaced-or-not labels (RFD)."""
        ids = torch.stack([batch[f["name"]] for f in self.cats], 1)  # (B, n_cat)
        chosen = choose_fields(ids.shape[0], len(self.cats), self.k, self.gen, self.device)
        if self.cfg["method"] == "mfp":
            new = ids.masked_fill(chosen, 0)
            prep = {"ids": ids, "noise": self.head.sampler(chosen.nonzero(as_tuple=True)[1], self.cfg["negatives"],
                                                           self.gen)}
        else:
            draws = self.sampler(torch.arange(len(self.cats), device=self.device).repeat(ids.shape[0]), 1, self.gen)
            new = torch.where(chosen, draws.view(ids.shape), ids)
            prep = {"labels": (new != ids).float()}
        out = dict(batch)
        for j, f in enumerate(self.cats):
            out[f["name"]] = new[:, j]
        return {**prep, "batch": out, "chosen": chosen}

    def loss(self, prep) -> torch.Tensor:
        mfp = self.cfg["method"] == "mfp"
        h = self.net.represent(prep["batch"], self._embeddings(prep["batch"], prep["chosen"] if mfp else None)).float()
        return self.head.loss(h, prep["ids"], prep["chosen"], prep["noise"]) if mfp else self.head.loss(h, prep["labels"])

    def _rep_dim(self) -> int:
        from recforge.training.device import to_device

        was = self.net.training
        self.net.eval()
        try:
            with torch.no_grad():
                batch = to_device(self.split.train.batch(np.arange(min(2, len(self.split.train)))), self.device)
                return int(self.net.represent(batch, self._embeddings(batch)).shape[-1])
        finally:
            self.net.train(was)

    def run(self) -> dict:
        m, cfg, net = self.model, self.cfg, self.net
        t0 = time.perf_counter()
        params = [p for p in net.parameters() if p.requires_grad] + list(self.head.parameters())
        lr = float(cfg["lr"] or m.lr)
        opt = torch.optim.AdamW(params, lr=lr, weight_decay=float(cfg["weight_decay"]))
        bs = int(cfg["batch_size"] or m.batch_size)
        alpt = getattr(m, "_alpt", None)
        last = {}

        def loss_of(batch):
            last["prep"] = prep = self.corrupt(batch)
            return self.loss(prep), {}

        def after_step(f: float) -> None:  # ALPT's learned-precision step reuses the batch's corruption
            def again(prep=last["prep"]):
                with autocast(self.device, m.precision):
                    return self.loss(prep)

            alpt.step(again, lr * f, float(cfg["weight_decay"]))

        net.train()
        self.head.train()
        epochs, _ = pretrain_epochs(
            rows=np.arange(len(self.split.train)), epochs=cfg["epochs"], batch_size=bs,
            rng=np.random.default_rng([int(m.seed), 1]), opt=opt, base_lrs=[lr], batch_of=self.split.train.batch,
            loss_of=loss_of, device=self.device, precision=m.precision,
            problem=f"pre-training ({cfg['method']}) of {m.name} stopped: the loss is {{loss}} at epoch {{epoch}}; "
                    f"try a lower pretrain.lr (now {lr:g})",
            after_step=after_step if alpt is not None else None)
        self.head = None
        return {"method": cfg["method"], "epochs_run": len(epochs), "mask_ratio": cfg["mask_ratio"],
                "fields_masked": self.k, "categorical_fields": len(self.cats),
                **({"negatives": cfg["negatives"]} if cfg["method"] == "mfp" else {"replace": cfg["replace"]}),
                "lr": lr, "weight_decay": cfg["weight_decay"], "batch_size": bs, "proj": cfg["proj"],
                "seconds": round(time.perf_counter() - t0, 2), "epochs": epochs}
