"""The base of CTR models: field embeddings, pointwise loss, batches of encoded rows.

A :class:`CTRModel` is fitted on a :class:`recforge.ctr.CTRSplit` (the encoded train/valid/test
rows and the fitted :class:`~recforge.data.features.FeatureEncoder`) by the shared trainer:
``train_batches`` cuts the shuffled training rows into batches (dicts of tensors, one per field,
plus ``label``) with the trainer's data-parallel helper ``epoch_batches``; ``loss`` is the binary
cross-entropy of each label (mean over labels) plus ``embedding_reg`` times the mean squared norm
of the batch's embeddings; ``validate`` gives the validation AUC the trainer stops on
(``valid_metric=auc``, larger is better). ``predict_proba(table)`` returns ``(n, n_labels)``
probabilities.

Embeddings (:class:`FieldEmbedding`): one table per vocabulary (a field that ``share``s another
field's vocabulary uses its table), each with its own size: ``field_dims`` (``{field: dim}``) over
the spec's ``dim`` over ``embedding_dim``. Id 0 (padding) is a zero row that is never trained.
Multi-valued and sequence fields are mean-pooled over their non-padding ids; a numeric field is a
learned vector scaled by its normalised value. Subclasses build their network in ``make_net()``
from ``self.fields_`` (the encoder's layout) and ``self.labels_``.

Two training techniques every CTR model takes: ``embedding_bits`` (8, 4 or 2) keeps the embedding
tables as integers trained by ALPT (:mod:`recforge.models.ctr.alpt`; ``alpt_step``,
``alpt_step_lr``; ``embedding_bytes()`` gives their size against float32), and ``pretrain``
(``{method: mfp|rfd, epochs, mask_ratio, negatives, ...}``) pre-trains the embeddings and the
interaction layers with MAP (:mod:`recforge.models.ctr.map`) before CTR training. MAP reads a row's
representation from the network's ``represent(batch, embs)``: the vector its prediction layer
reads (the MAP module's docstring says which, model by model).
"""

from __future__ import annotations

import math

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from recforge.errors import ConfigError, RecForgeError
from recforge.models.torch_base import TorchRecommender

ACTIVATIONS = ("relu", "prelu", "dice", "tanh", "sigmoid")
LINEAR_INITS = ("torch", "xavier")


class Dice(nn.Module):
    """Data-adaptive activation of DIN: ``p(x) x + (1 - p(x)) alpha x`` with ``p = sigmoid(BN(x))``."""

    def __init__(self, dim: int):
        super().__init__()
        self.bn = nn.BatchNorm1d(dim, affine=False)
        self.alpha = nn.Parameter(torch.zeros(dim))

    def forward(self, x):
        shape = x.shape
        p = torch.sigmoid(self.bn(x.reshape(-1, shape[-1]))).reshape(shape)
        return p * x + (1 - p) * self.alpha * x


def activation(name: str, dim: int) -> nn.Module:
    if name == "relu":
        return nn.ReLU()
    if name == "prelu":
        return nn.PReLU(dim)
    if name == "dice":
        return Dice(dim)
    if name == "tanh":
        return nn.Tanh()
    if name == "sigmoid":
        return nn.Sigmoid()
    raise ConfigError(f"activation {name!r}: choose one of {', '.join(ACTIVATIONS)}")


def mlp(in_dim: int, hidden: list[int], dropout: float = 0.0, batch_norm: bool = False, act: str = "relu",
        out_dim: int | None = None) -> nn.Sequential:
    """Linear → [BatchNorm] → activation → [Dropout] per hidden layer, then an optional linear output."""
    layers, d = [], in_dim
    for h in hidden:
        layers.append(nn.Linear(d, int(h)))
        if batch_norm:
            layers.append(nn.BatchNorm1d(int(h)))
        layers.append(activation(act, int(h)))
        if dropout:
            layers.append(nn.Dropout(dropout))
        d = int(h)
    if out_dim is not None:
        layers.append(nn.Linear(d, out_dim))
    return nn.Sequential(*layers)


def mlp_out_dim(in_dim: int, hidden: list[int]) -> int:
    return int(hidden[-1]) if hidden else in_dim


class FieldEmbedding(nn.Module):
    """Embeddings of every field (see the module docstring). ``forward(batch)`` returns one
    ``(B, d_f)`` tensor per field in layout order and, in training, leaves the batch's mean squared
    embedding norm in ``penalty``. With ``bits`` (8, 4, 2) every table is a low-precision
    :class:`~recforge.models.ctr.alpt.QuantEmbedding` (ALPT; ``step``: one step size per row or
    per table)."""

    def __init__(self, layout: list[dict], default_dim: int, field_dims: dict | None = None, init_std: float = 1e-2,
                 bits: int | None = None, step: str = "row"):
        super().__init__()
        field_dims = dict(field_dims or {})
        unknown = sorted(set(field_dims) - {f["name"] for f in layout})
        if unknown:
            raise ConfigError(f"field_dims names unknown field(s) {', '.join(unknown)}; "
                              f"fields: {', '.join(f['name'] for f in layout)}")
        self.layout = layout
        self.tables = nn.ModuleDict()
        self.numeric = nn.ParameterDict()
        self.key: dict[str, str] = {}  # field -> module key (names may hold characters modules reject)
        self.dims: list[int] = []
        table_dim: dict[str, int] = {}
        for i, f in enumerate(layout):
            if f["kind"] == "numeric":
                d = int(field_dims.get(f["name"]) or f["dim"] or default_dim)
                self.key[f["name"]] = f"n{i}"
                self.numeric[f"n{i}"] = nn.Parameter(torch.randn(d) * init_std)
            else:
                t = f["table"]
                d = int(field_dims.get(t) or f["dim"] or default_dim)
                if t in table_dim:
                    if field_dims.get(f["name"]) and int(field_dims[f["name"]]) != table_dim[t]:
                        raise ConfigError(f"field {f['name']!r} shares the table of {t!r}: its size is {table_dim[t]}")
                    d = table_dim[t]
                elif bits:
                    from recforge.models.ctr.alpt import QuantEmbedding

                    self.tables[f"t{len(table_dim)}"] = QuantEmbedding(f["vocab"], d, bits, step, init_std)
                    table_dim[t] = d
                else:
                    emb = nn.Embedding(f["vocab"], d, padding_idx=0)
                    nn.init.normal_(emb.weight, std=init_std)
                    with torch.no_grad():
                        emb.weight[0].zero_()
                    self.tables[f"t{len(table_dim)}"] = emb
                    table_dim[t] = d
                self.key[f["name"]] = f"t{list(table_dim).index(t)}"
            self.dims.append(d)
        self.penalty = torch.zeros(())

    @property
    def total_dim(self) -> int:
        return sum(self.dims)

    def nbytes(self) -> dict:
        """Bytes of the embedding tables (numeric fields' vectors aside): ``fp32`` (float32 tables of
        the same shapes) and ``stored`` (as held), plus ``codes``, ``step_sizes`` and ``packed`` for
        low-precision tables (:meth:`QuantEmbedding.nbytes`)."""
        out = {"fp32": 0, "stored": 0}
        for t in self.tables.values():
            b = t.nbytes() if hasattr(t, "nbytes") else {"fp32": t.weight.numel() * 4,
                                                         "stored": t.weight.numel() * t.weight.element_size()}
            for k, v in b.items():
                out[k] = out.get(k, 0) + v
        return out

    def same_dim(self, model: str) -> int:
        """The one embedding size of all fields (models whose interactions need it)."""
        if len(set(self.dims)) != 1:
            raise ConfigError(f"{model} takes inner products between fields, so every field needs the same "
                              f"embedding size; field_dims gives {dict(zip([f['name'] for f in self.layout], self.dims))}")
        return self.dims[0]

    def sequence(self, batch, name: str) -> tuple[torch.Tensor, torch.Tensor]:
        """``(B, L, d)`` embeddings of a multi/sequence field and its ``(B, L)`` mask of real ids."""
        ids = batch[name]
        return self.tables[self.key[name]](ids), ids > 0

    def embed(self, batch, f: dict) -> torch.Tensor:
        if f["kind"] == "numeric":
            return batch[f["name"]].float().unsqueeze(-1) * self.numeric[self.key[f["name"]]]
        e = self.tables[self.key[f["name"]]](batch[f["name"]])
        if f["kind"] == "categorical":
            return e
        n = (batch[f["name"]] > 0).sum(-1, keepdim=True).clamp(min=1).to(e.dtype)
        return e.sum(1) / n

    def forward(self, batch, skip: tuple[str, ...] = ()) -> list[torch.Tensor]:
        out = [self.embed(batch, f) for f in self.layout if f["name"] not in skip]
        if self.training:
            self.penalty = sum(e.pow(2).sum(-1).mean() for e in out)
        return out


class FieldLinear(nn.Module):
    """The first-order part: one weight per id of each field (per label) and per numeric field, plus a bias."""

    def __init__(self, layout: list[dict], n_out: int = 1):
        super().__init__()
        self.layout = layout
        self.tables = nn.ModuleDict()
        self.numeric = nn.ParameterDict()
        self.key: dict[str, str] = {}
        seen: dict[str, str] = {}
        for i, f in enumerate(layout):
            if f["kind"] == "numeric":
                self.key[f["name"]] = f"n{i}"
                self.numeric[f"n{i}"] = nn.Parameter(torch.zeros(n_out))
            else:
                if f["table"] not in seen:
                    seen[f["table"]] = f"t{len(seen)}"
                    emb = nn.Embedding(f["vocab"], n_out, padding_idx=0)
                    nn.init.zeros_(emb.weight)
                    self.tables[seen[f["table"]]] = emb
                self.key[f["name"]] = seen[f["table"]]
        self.bias = nn.Parameter(torch.zeros(n_out))

    def terms(self, batch) -> list[torch.Tensor]:
        """The first-order term of each field, ``(B, n_out)`` each, in layout order (bias aside)."""
        out = []
        for f in self.layout:
            x = batch[f["name"]]
            if f["kind"] == "numeric":
                out.append(x.float().unsqueeze(-1) * self.numeric[self.key[f["name"]]])
                continue
            w = self.tables[self.key[f["name"]]](x)
            if f["kind"] != "categorical":
                n = (x > 0).sum(-1, keepdim=True).clamp(min=1).to(w.dtype)
                w = w.sum(1) / n
            out.append(w)
        return out

    def forward(self, batch) -> torch.Tensor:
        out = self.bias
        for w in self.terms(batch):
            out = out + w
        return out  # (B, n_out)


def fm_interaction(embs: list[torch.Tensor]) -> torch.Tensor:
    """The FM pairwise term per embedding dimension: ``0.5 ((Σ v)^2 - Σ v^2)``, shape (B, d)."""
    v = torch.stack(embs, 1)
    return 0.5 * (v.sum(1).pow(2) - v.pow(2).sum(1))


class CTRModel(TorchRecommender):
    """Base of the CTR models (see the module docstring)."""

    task = "ctr"

    def __init__(self, embedding_dim: int = 16, field_dims: dict | None = None, embedding_reg: float = 0.0,
                 embedding_bits: int | None = None, alpt_step: str = "row", alpt_step_lr: float = 1e-4,
                 pretrain: dict | str | None = None, linear_init: str = "torch", threads: int | None = None,
                 epochs: int = 100,
                 batch_size: int = 4096, patience: int = 2, valid_metric: str = "auc", eval_batch_size: int = 16384,
                 **train):
        from recforge.models.ctr.alpt import check_bits
        from recforge.models.ctr.map import check_pretrain

        super().__init__(epochs=epochs, batch_size=batch_size, patience=patience, valid_metric=valid_metric,
                         eval_batch_size=eval_batch_size, **train)
        self.embedding_dim, self.field_dims, self.embedding_reg = embedding_dim, field_dims, embedding_reg
        self.embedding_bits, self.alpt_step, self.alpt_step_lr = embedding_bits, alpt_step, alpt_step_lr
        self.pretrain = pretrain
        if linear_init not in LINEAR_INITS:
            raise ConfigError(f"linear_init={linear_init!r}: choose torch (PyTorch's default) or xavier "
                              "(Xavier-normal weights, zero biases)")
        self.linear_init = linear_init
        self.threads = threads
        check_bits(embedding_bits, alpt_step)  # early: before any data is read
        check_pretrain(pretrain)

    # ---- building ------------------------------------------------------------------------------
    def prepare_fit(self, split) -> None:
        if self.valid_metric != "auc":
            raise ConfigError(f"valid_metric={self.valid_metric!r}: CTR models stop early on the validation AUC "
                              "(valid_metric=auc)")
        if not hasattr(split, "encoder"):
            raise RecForgeError(f"{self.name} is a CTR model: it trains on labelled feature rows "
                                "(recforge train with CTR data), not on a ranking split")
        self.fields_ = split.encoder.layout()
        self.labels_ = list(split.encoder.schema.labels)
        self._bn_rows = split.train  # for the batch-norm statistics (not saved)
        if self.embedding_bits:
            from recforge.training.distributed import world

            if self.precision == "fp16":
                raise ConfigError("embedding_bits (ALPT) updates the integer tables from unscaled gradients, which "
                                  "the fp16 gradient scaler changes: use precision=bf16 or fp32")
            if world()[1] > 1:
                raise ConfigError("embedding_bits (ALPT) is not supported in data-parallel training; run one process")
            if getattr(self, "optimizer", "adam") == "adatask":
                raise ConfigError("embedding_bits (ALPT) needs the rows' gradients of one backward pass, which "
                                  "optimizer=adatask does not leave: use optimizer=adam")

    def build(self, n_users: int, n_items: int) -> nn.Module:
        """The network; with ``linear_init=xavier`` every linear layer gets Xavier-normal weights and
        zero biases (FuxiCTR's and DeepCTR's initialisation) instead of PyTorch's default (uniform
        within ±1/sqrt(fan-in), biases too). On re-split Frappe that lifted DeepFM and DCN-V2 by
        about +.004-.005 test AUC (benchmarks/vs_fuxictr.py's probe); the default stays ``torch``
        until the CTR tables are measured again with it."""
        net = self.make_net()
        if self.linear_init == "xavier":
            for m in net.modules():
                if isinstance(m, nn.Linear):
                    nn.init.xavier_normal_(m.weight)
                    if m.bias is not None:
                        nn.init.zeros_(m.bias)
        return net

    def make_net(self) -> nn.Module:  # pragma: no cover - interface
        raise NotImplementedError

    def embedding(self) -> FieldEmbedding:
        return FieldEmbedding(self.fields_, self.embedding_dim, self.field_dims, bits=self.embedding_bits,
                              step=self.alpt_step)

    def embedding_bytes(self) -> dict:
        """Bytes of the fitted model's embedding tables: ``bits`` (32 for float32 tables), ``fp32``
        (float32 tables of the same shapes) and ``stored`` (as held: int8 codes plus step sizes with
        ``embedding_bits``; see :meth:`FieldEmbedding.nbytes`). The first-order weights and the
        numeric fields' vectors are not counted (they stay float32)."""
        emb = getattr(self.net_, "embedding", None)
        sizes = emb.nbytes() if isinstance(emb, FieldEmbedding) else {"fp32": 0, "stored": 0}
        return {"bits": int(self.embedding_bits or 32), **sizes}

    @property
    def n_labels(self) -> int:
        return len(self.labels_)

    # ---- training ------------------------------------------------------------------------------
    def n_train_batches(self, split) -> int:
        return max(1, math.ceil(len(split.train) / self.batch_size))

    def train_batches(self, split, rng):
        for idx, _ in self.epoch_batches(rng.permutation(len(split.train)), rng):
            yield split.train.batch(np.sort(idx))

    def loss(self, batch) -> torch.Tensor:
        logits = self.net_(batch)
        loss = F.binary_cross_entropy_with_logits(logits.float(), batch["label"].float())
        emb = getattr(self.net_, "embedding", None)
        if self.embedding_reg and emb is not None:
            loss = loss + self.embedding_reg * emb.penalty
        return loss

    def before_training(self, split, valid=None) -> None:
        """ALPT's updater of the integer tables (``embedding_bits``), then MAP pre-training
        (``pretrain``, :mod:`recforge.models.ctr.map`) of the built network on the training rows; a
        run resumed from a checkpoint takes its pre-trained weights from the checkpoint instead."""
        from recforge.models.ctr.alpt import ALPTUpdater

        self._alpt = None
        if self.embedding_bits:
            self._alpt = ALPTUpdater(self.net_, self.alpt_step_lr)
            if not self._alpt.tables:
                raise ConfigError(f"embedding_bits={self.embedding_bits}: {self.name} has no embedding tables to "
                                  "hold in low precision (its first-order weights stay float32); leave it null")
        self._pretrain_record = None
        if self.pretrain and not getattr(self, "resume_from", None):
            from recforge.models.ctr.map import Pretrainer

            self._pretrain_record = Pretrainer(self, split).run()
            if self._alpt is not None:  # fine-tuning starts with fresh moments, as the trainer's optimiser does
                self._alpt.state = {}

    def after_step(self, batch, lr: float) -> None:
        """After each optimiser step of the trainer: ALPT's update of the integer tables (nothing
        without ``embedding_bits``)."""
        alpt = getattr(self, "_alpt", None)
        if alpt is None:
            return
        from recforge.training.device import autocast

        def second_pass():
            with autocast(self.device_, self.precision):
                return self.loss(batch)

        alpt.step(second_pass, lr, self.weight_decay)

    def train_state(self) -> dict:
        """ALPT's Adam moments of the integer tables and the pre-training record, for checkpoints."""
        alpt = getattr(self, "_alpt", None)
        return {"alpt": alpt.state_dict() if alpt is not None else None,
                "pretrain": getattr(self, "_pretrain_record", None)}

    def load_train_state(self, state: dict) -> None:
        alpt = getattr(self, "_alpt", None)
        if alpt is not None and state.get("alpt"):
            alpt.load_state_dict(state["alpt"])
        if state.get("pretrain"):
            self._pretrain_record = state["pretrain"]

    def fit(self, split, valid=None):
        super().fit(split, valid)
        if valid is None:  # with validation, the kept weights already hold statistics of their own
            self.precise_bn()
        self._bn_rows = None
        self._alpt = None
        if getattr(self, "_pretrain_record", None):
            self.history_["pretrain"] = self._pretrain_record
        return self

    def precise_bn(self, n_batches: int = 8) -> None:
        """Recompute the running statistics of every batch-norm layer for the current weights
        (Wu & Johnson, "Rethinking 'Batch' in BatchNorm", 2021: "precise BN"): a forward pass in
        training mode, dropout off, over ``n_batches`` training batches of a fixed draw, averaged
        with equal weights. The running averages kept during training lag behind weights that move
        fast (embeddings growing from a small initial scale), and the prediction layers of some
        models (FinalMLP's bilinear fusion) amplify the lag; validation and evaluation then see
        the network as it is. Models without batch norm skip this."""
        from recforge.training.device import to_device

        net, rows = self.net_, getattr(self, "_bn_rows", None)
        bns = [m for m in net.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
        if not bns or rows is None or len(rows) == 0:
            return
        was = net.training
        momenta = [m.momentum for m in bns]
        for m in bns:
            m.reset_running_stats()
            m.momentum = None  # cumulative average over the passes below
        net.train()
        for m in net.modules():
            if isinstance(m, nn.Dropout):
                m.eval()
        idx = np.random.default_rng(self.seed).permutation(len(rows))[: n_batches * self.batch_size]
        try:
            with torch.no_grad():
                for s in range(0, len(idx), self.batch_size):
                    part = np.sort(idx[s : s + self.batch_size])
                    if len(part) < 2:
                        continue
                    batch = to_device(rows.batch(part), self.device_)
                    batch.pop("label", None)
                    net(batch)
        finally:
            for m, mo in zip(bns, momenta):
                m.momentum = mo
            net.train(was)

    def validate(self, valid) -> dict[str, float]:
        """Validation AUC (mean over labels) and log-loss, for early stopping (after
        :meth:`precise_bn`, so the weights kept at the best epoch carry matching statistics)."""
        from recforge.evaluation.pointwise import auc, logloss

        self.precise_bn()
        p = self.predict_proba(valid)
        return {"auc": float(np.nanmean([auc(valid.y[:, j], p[:, j]) for j in range(p.shape[1])])),
                "logloss": float(np.mean([logloss(valid.y[:, j], p[:, j]) for j in range(p.shape[1])]))}

    # ---- prediction ----------------------------------------------------------------------------
    def predict_proba(self, table, batch_size: int | None = None) -> np.ndarray:
        """Click probabilities ``(n, n_labels)`` of an encoded table (float64, on the CPU)."""
        out = self.predict_batches(table, lambda net, batch: net(batch), batch_size)
        return out if len(out) else np.zeros((0, self.n_labels))

    def predict_batches(self, table, logits, batch_size: int | None = None) -> np.ndarray:
        """``sigmoid(logits(net, batch))`` over an encoded table, batch by batch, in evaluation mode
        on the model's device; float64 NumPy on the CPU (empty for an empty table)."""
        from recforge.training.device import to_device

        net, bs = self.net_, int(batch_size or self.eval_batch_size)
        was = net.training
        net.eval()
        out = []
        try:
            with torch.no_grad():
                for s in range(0, len(table), bs):
                    batch = to_device(table.batch(np.arange(s, min(s + bs, len(table)))), self.device_)
                    batch.pop("label", None)
                    out.append(torch.sigmoid(logits(net, batch).float()).cpu().numpy())
        finally:
            net.train(was)
        return np.concatenate(out).astype(np.float64) if out else np.zeros(0)

    def score(self, hist):
        raise RecForgeError(f"{self.name} is a CTR model: it scores feature rows (predict_proba, recforge predict), "
                            "not a catalogue ranking")

    def protocol_notes(self) -> dict:
        notes = {"valid_metric": self.valid_metric, "embedding_bits": int(self.embedding_bits or 32)}
        if self.embedding_bits:
            notes["alpt"] = {"step": self.alpt_step, "step_lr": self.alpt_step_lr,
                             "embedding_bytes": self.embedding_bytes()}
        record = getattr(self, "_pretrain_record", None) or getattr(self, "history_", {}).get("pretrain")
        if record:
            notes["pretrain"] = {k: v for k, v in record.items() if k != "epochs"}
        return notes
