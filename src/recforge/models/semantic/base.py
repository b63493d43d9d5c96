"""Shared machinery of the text-enhanced sequential models.

:class:`SemanticMixin` turns a sequential model of :mod:`recforge.models.sequential` (SASRec,
GRU4Rec, BERT4Rec: the *backbone*) into one whose item representations are computed from a
frozen matrix of item text vectors (a :class:`~recforge.semantic.store.SemanticTable`) next to
trainable ID embeddings. The backbone is used as it is: its network is built by its own
``build`` and its item embedding module (``item``) is replaced by an :class:`ItemLookup` that
keeps the ID embedding and looks ids up in the table the model computed for the current step.
Everything else — training samples, losses, sub-sequence modes, masking, scoring — is the
backbone's.

Subclasses implement :meth:`SemanticMixin.item_tables` (the item representations of one step)
and :meth:`SemanticMixin.encode_tables` (sequences to hidden states with those tables), and may
add an ``extra_loss``.

Where the item vectors come from (the model sees only the ``Split``, which holds no item text):

* ``semantic_table=FILE``: a table written by ``recforge embed`` on the same data (sentence-encoder
  vectors, or compressed language-model vectors with ``--marc``); when given it is used even if
  the runner attached the dataset (whose item ids it must then match);
* otherwise ``attach_dataset(ds)`` before ``fit``: the vectors are built from the dataset's item
  table (``template``, ``encoder``) through the vector cache, so only new texts are encoded. Models
  declare ``needs_items = True`` so that a runner can call it.

The frozen vectors are a buffer of the network, so a saved model scores without the table.

**Cold items** (no training interaction) are scored through their text vectors. With
``cold_items="semantic"`` (default):

* they are left out of the full-softmax training loss (``loss=ce``): otherwise every step pushes
  them down as negatives, and the adapter learns to recognise and bury exactly those texts (the
  sampled losses draw negatives from the whole catalogue as the backbone does);
* after training their ID embeddings, which never saw a positive example, are replaced by a ridge
  regression from text vectors to ID embeddings fitted on the warm items.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from recforge.errors import ConfigError, DataError
from recforge.models.sequential.modules import Dropout

COLD_MODES = ("semantic", "none")


class ItemLookup(nn.Module):
    """Stands in for a backbone's item ``nn.Embedding``: ids are looked up in ``table`` (set by the
    model for the current step; the ID embedding itself when none is set), or computed by ``fn``
    (ids -> rows) when the model sets one. The ID embedding stays a child module (``embedding``),
    trained and saved as before."""

    def __init__(self, embedding: nn.Embedding):
        super().__init__()
        self.embedding = embedding
        self.table: torch.Tensor | None = None
        self.fn = None

    @property
    def weight(self) -> torch.Tensor:
        return self.embedding.weight

    @property
    def embedding_dim(self) -> int:
        return self.embedding.embedding_dim

    @property
    def num_embeddings(self) -> int:
        return self.embedding.num_embeddings

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        if self.fn is not None:
            return self.fn(ids)
        return (self.embedding.weight if self.table is None else self.table)[ids]


def _replace_item_embedding(net: nn.Module, n_items: int) -> ItemLookup:
    """Swap the backbone's item embedding (the ``nn.Embedding`` named ``item`` covering the catalogue)
    for an :class:`ItemLookup`; returns it."""
    for name, module in net.named_modules():
        if name.split(".")[-1] == "item" and isinstance(module, nn.Embedding) and module.num_embeddings > n_items:
            parent = net.get_submodule(name.rsplit(".", 1)[0]) if "." in name else net
            lookup = ItemLookup(module)
            setattr(parent, name.split(".")[-1], lookup)
            return lookup
    raise ConfigError(f"{type(net).__name__}: no item embedding named 'item' to build on")


class Adapter(nn.Module):
    """Two-layer MLP from text vectors (dim ``d_in``) to item embeddings (``d_out``)."""

    def __init__(self, d_in: int, d_hidden: int, d_out: int, dropout: float):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(d_in, d_hidden), nn.GELU(), Dropout(dropout), nn.Linear(d_hidden, d_out))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class SemanticNet(nn.Module):
    """The backbone's network plus the frozen text vectors (buffer ``sem``) and an adapter."""

    def __init__(self, backbone: nn.Module, lookup: ItemLookup, sem: torch.Tensor, hidden: int,
                 adapter_hidden: int, dropout: float):
        super().__init__()
        self.backbone = backbone
        object.__setattr__(self, "lookup", lookup)  # a shortcut into backbone, not a second registration
        self.register_buffer("sem", sem.float())
        self.adapter = Adapter(sem.shape[1], adapter_hidden, hidden, dropout)


def pca_init(vectors: np.ndarray, dim: int, std: float | None = 0.02) -> np.ndarray:
    """Rows of ``vectors`` reduced to ``dim`` principal components (of the rows with text, centred),
    rescaled to overall standard deviation ``std`` (the scale of the backbones' random
    initialisation; None: the components as they are); zero rows (no text) stay zero."""
    has = np.abs(vectors).sum(1) > 0
    out = np.zeros((len(vectors), dim), dtype=np.float32)
    if has.sum() < 2:
        return out
    x = vectors[has].astype(np.float64)
    x = x - x.mean(0, keepdims=True)
    k = min(dim, x.shape[0], x.shape[1])
    _, _, vt = np.linalg.svd(x, full_matrices=False)
    z = x @ vt[:k].T
    if std is not None:
        z *= std / max(z.std(), 1e-12)
    out[np.flatnonzero(has), :k] = z.astype(np.float32)
    return out


def ridge_map(x: np.ndarray, y: np.ndarray, reg: float = 1.0) -> tuple[np.ndarray, np.ndarray]:
    """``W, b`` minimising ``|x W + b - y|^2 + reg |W|^2`` (x and y centred for the bias)."""
    mx, my = x.mean(0), y.mean(0)
    xc, yc = x - mx, y - my
    w = np.linalg.solve(xc.T @ xc + reg * np.eye(x.shape[1]), xc.T @ yc)
    return w, my - mx @ w


class SemanticMixin:
    """Text view for a sequential backbone; put it before the backbone class in the bases.

    Parameters: ``semantic_table`` (a ``recforge embed`` file; used when no dataset is attached),
    ``encoder`` (None: the packaged MiniLM; a model folder; ``hashing:DIM`` for the test double),
    ``template`` (item text template; None: the default), ``adapter_hidden`` (width of the
    adapter's hidden layer), ``cold_items`` (``semantic`` or ``none``).
    """

    needs_items = True
    #: the backbone attends in both directions (BERT4Rec): no causal mask where the model adds attention
    bidirectional = False

    def __init__(self, semantic_table: str | None = None, encoder: str | None = None, template: str | None = None,
                 adapter_hidden: int = 256, cold_items: str = "semantic", **backbone):
        super().__init__(**backbone)
        if cold_items not in COLD_MODES:
            raise ConfigError(f"cold_items={cold_items!r}: choose one of {', '.join(COLD_MODES)}")
        self.semantic_table, self.encoder, self.template = semantic_table, encoder, template
        self.adapter_hidden, self.cold_items = adapter_hidden, cold_items
        self._dataset = None
        self._sem = None
        self._step = None

    # ---- item vectors ---------------------------------------------------------------------
    def attach_dataset(self, ds) -> None:
        """Give the model the dataset whose items it will see (for their texts)."""
        self._dataset = ds

    def load_semantic(self, n_items: int) -> np.ndarray:
        """The ``(n_items + 1, dim)`` text vectors (row 0 zero)."""
        from recforge.semantic.store import SemanticTable, semantic_table

        if self.semantic_table:  # an explicit table wins over building one from the attached dataset
            table = SemanticTable.load(self.semantic_table)
            if self._dataset is not None:
                table.check_matches(self._dataset)
                table.check_tags_held_out(self._dataset)
        elif self._dataset is not None:
            table = semantic_table(self._dataset, self.encoder, self.template, progress=self.verbose)
        else:
            raise ConfigError(f"{self.name} needs item text vectors: pass semantic_table=FILE (written by "
                              "'recforge embed DATA --out FILE' on the same data)")
        if table.n_items != n_items:
            raise DataError(f"{self.name}: the semantic table has {table.n_items} items but the data has {n_items}; "
                            "write it with 'recforge embed' on the same data and preparation options")
        return table.vectors.astype(np.float32)

    def prepare_fit(self, split) -> None:
        super().prepare_fit(split)
        self._sem = self.load_semantic(split.n_items)
        self.sem_dim_ = int(self._sem.shape[1])
        self._train_items = self._remap = None
        warm = np.flatnonzero(np.asarray(split.item_popularity)[1:] > 0) + 1
        if self.cold_items == "semantic" and self.loss_type == "ce" and len(warm) < split.n_items:
            self._train_items = torch.from_numpy(np.concatenate([[0], warm]))
            self._remap = torch.zeros(split.n_items + 1, dtype=torch.long)
            self._remap[self._train_items] = torch.arange(len(self._train_items))

    def on_device(self, device: torch.device) -> None:
        """Move the training-time index tensors (warm items and their remapping) to ``device``."""
        super().on_device(device)
        if getattr(self, "_train_items", None) is not None:
            self._train_items, self._remap = self._train_items.to(device), self._remap.to(device)

    def next_item_loss(self, hidden: torch.Tensor, tgt: torch.Tensor, neg) -> torch.Tensor:
        if self._train_items is None or self.loss_type != "ce":
            return super().next_item_loss(hidden, tgt, neg)
        from recforge.training.losses import next_item_loss

        sel = tgt > 0  # targets are training items, so always among the kept ones
        return next_item_loss("ce", hidden[sel], self.output_table()[self._train_items], self._remap[tgt[sel]])

    def semantic_buffer(self, n_items: int) -> torch.Tensor:
        if self._sem is not None:
            return torch.from_numpy(self._sem)
        return torch.zeros(n_items + 1, self.sem_dim_)  # filled by load_state_dict

    def build(self, n_users, n_items):
        backbone = super().build(n_users, n_items)
        lookup = _replace_item_embedding(backbone, n_items)
        return SemanticNet(backbone, lookup, self.semantic_buffer(n_items), self.hidden, self.adapter_hidden,
                           self.dropout)

    # ---- to implement -----------------------------------------------------------------------
    def item_tables(self) -> dict:  # pragma: no cover - interface
        """Item representations of this step; must hold ``"out"`` (n_items + 1, d_out)."""
        raise NotImplementedError

    def encode_tables(self, seqs: torch.Tensor, tables: dict) -> torch.Tensor:  # pragma: no cover - interface
        raise NotImplementedError

    # ---- helpers ------------------------------------------------------------------------------
    def id_embedding(self) -> nn.Embedding:
        """The trainable ID embedding (rows past ``n_items`` are the backbone's extra tokens)."""
        return self.net_.lookup.embedding

    def with_extra_tokens(self, table: torch.Tensor) -> torch.Tensor:
        """``table`` (n_items + 1 rows) followed by the ID embeddings of the backbone's extra tokens
        (BERT4Rec's ``[MASK]``), so that every id the backbone feeds can be looked up."""
        extra = self.id_embedding().weight[self.n_items_ + 1 :]
        return table if extra.shape[0] == 0 else torch.cat([table, extra])

    def run_backbone(self, seqs: torch.Tensor, table: torch.Tensor | None, fn=None) -> torch.Tensor:
        """The backbone's hidden states for ``seqs`` with item embeddings taken from ``table``, or
        computed by ``fn`` (the ids the backbone looks up -> their rows)."""
        lookup = self.net_.lookup
        lookup.table = None if table is None else self.with_extra_tokens(table)
        lookup.fn = fn
        try:
            return self.net_.backbone(seqs)
        finally:
            lookup.table = lookup.fn = None

    # ---- the SequentialRecommender hooks, with one set of item tables per step ----------------
    def _tables(self) -> dict:
        return self._step if self._step is not None else self.item_tables()

    def encode(self, seqs: torch.Tensor) -> torch.Tensor:
        return self.encode_tables(seqs, self._tables())

    def output_table(self) -> torch.Tensor:
        return self._tables()["out"]

    def loss(self, batch: dict) -> torch.Tensor:
        self._step = self.item_tables()
        try:
            return super().loss(batch)
        finally:
            self._step = None

    def score(self, hist) -> torch.Tensor:
        with torch.no_grad():
            self._step = self.item_tables()
            try:
                return super().score(hist)
            finally:
                self._step = None

    def representation_input(self, seqs: torch.Tensor) -> torch.Tensor:
        """Sequences as the backbone reads them to predict the next item (BERT4Rec: a ``[MASK]``
        appended to the last ``max_len - 1`` items)."""
        mask_id = getattr(type(self), "mask_id", None)
        if isinstance(mask_id, property):
            mask = torch.full((len(seqs), 1), self.mask_id, dtype=seqs.dtype, device=seqs.device)
            return torch.cat([seqs[:, 1:], mask], 1)
        return seqs

    # ---- after training -----------------------------------------------------------------------
    def fit(self, split, valid=None):
        super().fit(split, valid)
        self.n_cold_ = 0
        if self.cold_items == "semantic":
            self.n_cold_ = self.impute_cold(split.item_popularity)
        self._sem = None  # the vectors live on in the network's buffer
        return self

    def impute_cold(self, popularity: np.ndarray) -> int:
        """Set the ID embeddings of items without training interactions (but with text) from a
        ridge regression text vector -> ID embedding fitted on the warm items. Returns how many."""
        emb = self.id_embedding().weight
        n = self.n_items_
        sem = self.net_.sem.detach()[: n + 1].cpu().numpy().astype(np.float64)
        pop = np.asarray(popularity[: n + 1])
        has_text = np.abs(sem).sum(1) > 0
        warm, cold = (pop > 0) & has_text, (pop == 0) & has_text
        warm[0] = cold[0] = False
        if not cold.any() or warm.sum() < 2:
            return 0
        ids = emb.detach()[: n + 1].cpu().numpy().astype(np.float64)
        w, b = ridge_map(sem[warm], ids[warm], reg=1.0)
        with torch.no_grad():
            rows = torch.from_numpy(np.flatnonzero(cold)).to(emb.device)
            emb[rows] = torch.from_numpy((sem[cold] @ w + b).astype(np.float32)).to(emb.device)
        return int(cold.sum())

    def protocol_notes(self) -> dict:
        notes = super().protocol_notes()
        notes["item_text"] = {"encoder": self.encoder or "packaged all-MiniLM-L6-v2",
                              "template": self.template or "default", "cold_items": self.cold_items}
        return notes


def on_backbones(mixin: type, name: str, class_names: tuple[str, str, str], title: str) -> tuple[type, ...]:
    """The classes of a text-enhancement ``mixin`` on the SASRec, GRU4Rec and BERT4Rec backbones,
    registered as ``name``, ``name-gru4rec`` and ``name-bert4rec``."""
    from recforge.models.sequential.bert4rec import BERT4Rec
    from recforge.models.sequential.gru4rec import GRU4Rec
    from recforge.models.sequential.sasrec import SASRec

    made = []
    for cls_name, backbone, suffix in zip(class_names, (SASRec, GRU4Rec, BERT4Rec), ("", "-gru4rec", "-bert4rec")):
        attrs = {"name": name + suffix, "__doc__": f"{title} on {backbone.__name__}.",
                 "__module__": mixin.__module__, "__qualname__": cls_name, "bidirectional": backbone is BERT4Rec}
        made.append(type(cls_name, (mixin, backbone), attrs))
    return tuple(made)
