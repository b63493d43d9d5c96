"""DIN: Deep Interest Network.

Zhou et al., "Deep Interest Network for Click-Through Rate Prediction", KDD 2018. The candidate
(``target_field``, e.g. ``item_id``) attends over the user's behaviour sequence
(``sequence_field``, e.g. ``hist_items``, which shares the candidate's embedding table): an
activation unit (an MLP over ``[q, k, q - k, q ⊙ k]``; the paper's outer product is replaced by
the difference, as in the authors' released code) gives each behaviour a weight, *not* normalised
by a softmax (the paper keeps the intensity of interest), padding weighted 0; the weighted sum of
the behaviours joins the other fields' embeddings in an MLP (200-80 with Dice, the paper's
setting). Both fields are found automatically when unset: the first sequence field that shares
its table with a categorical field. Deviations: mini-batch-aware regularisation is replaced by
``embedding_reg`` on the batch's embeddings (close in spirit: only the rows in the batch are
penalised); no goods/category pair of sequences (one sequence field is attended; other sequence
or multi-valued fields are mean-pooled).
"""

from __future__ import annotations

import torch
from torch import nn

from recforge.errors import ConfigError
from recforge.models.ctr.base import CTRModel, mlp


class DINNet(nn.Module):
    def __init__(self, model):
        super().__init__()
        self.embedding = model.embedding()
        self.target, self.seq = model.pair_
        self.skip = (self.seq,)  # the attended sequence is read position by position, not pooled
        names = [f["name"] for f in model.fields_]
        d = self.embedding.dims[names.index(self.target)]
        self.others = [n for n in names if n != self.seq]
        self.t_index = self.others.index(self.target)
        self.attention = mlp(4 * d, model.attention_hidden, 0.0, False, model.attention_activation, out_dim=1)
        in_dim = sum(self.embedding.dims[names.index(n)] for n in self.others) + d
        self.dnn = mlp(in_dim, model.hidden, model.dropout, model.batch_norm, model.activation, out_dim=model.n_labels)

    def forward(self, batch):
        return self.dnn[-1](self.represent(batch))

    def represent(self, batch, embs=None):
        """The MLP's last hidden layer over the other fields' embeddings and the interest vector
        (``embs``: the embeddings of every field but the sequence)."""
        embs = self.embedding(batch, skip=self.skip) if embs is None else embs
        q = embs[self.t_index]
        keys, mask = self.embedding.sequence(batch, self.seq)
        qe = q.unsqueeze(1).expand_as(keys)
        w = self.attention(torch.cat([qe, keys, qe - keys, qe * keys], -1)).squeeze(-1) * mask.to(keys.dtype)
        interest = (w.unsqueeze(-1) * keys).sum(1)
        return self.dnn[:-1](torch.cat([*embs, interest], -1))


class DIN(CTRModel):
    name = "din"

    def __init__(self, target_field: str | None = None, sequence_field: str | None = None,
                 attention_hidden: list[int] = (80, 40), attention_activation: str = "dice",
                 hidden: list[int] = (200, 80), dropout: float = 0.0, batch_norm: bool = False,
                 activation: str = "dice", **base):
        super().__init__(**base)
        self.target_field, self.sequence_field = target_field, sequence_field
        self.attention_hidden, self.attention_activation = list(attention_hidden), attention_activation
        self.hidden, self.dropout, self.batch_norm, self.activation = list(hidden), dropout, batch_norm, activation

    def prepare_fit(self, split) -> None:
        super().prepare_fit(split)
        by = {f["name"]: f for f in self.fields_}
        seqs = [f for f in self.fields_ if f["kind"] == "sequence" and f["table"] != f["name"]]
        if self.sequence_field is not None:
            if self.sequence_field not in by or by[self.sequence_field]["kind"] not in ("sequence", "multi"):
                raise ConfigError(f"din: sequence_field={self.sequence_field!r} is not a sequence field of this data")
            seqs = [by[self.sequence_field]]
        if not seqs:
            raise ConfigError("din needs a behaviour sequence that shares its embedding with the candidate field "
                              "(e.g. hist_items sharing item_id: share_embedding in the feature spec); this data has "
                              "none (rows derived from an interaction log have one)")
        seq = seqs[0]
        target = self.target_field or seq["table"]
        if target not in by or by[target]["kind"] != "categorical" or by[target]["table"] != seq["table"]:
            raise ConfigError(f"din: the target field {target!r} must be a categorical field sharing the embedding "
                              f"table of {seq['name']!r} ({seq['table']!r})")
        self.pair_ = (target, seq["name"])

    def make_net(self):
        return DINNet(self)

    def protocol_notes(self) -> dict:
        return {**super().protocol_notes(), "din_attention": f"{self.pair_[0]} over {self.pair_[1]}"}
