"""GRU4Rec: a recurrent network over the item sequence.

Hidasi, Karatzoglou, Baltrunas & Tikk, "Session-based Recommendations with Recurrent Neural
Networks", ICLR 2016.

Item embedding, dropout, ``n_layers`` GRU layers, dropout; the score of item ``i`` after a
position is the dot product of the GRU output with ``i``'s embedding (input and output
embeddings tied). As in SASRec, the input embeddings are multiplied by sqrt(hidden): with
embeddings initialised small (N(0, 0.02)) the recurrence otherwise barely sees its input at
first and learns several times slower.

Deviations from the paper: instead of session-parallel mini-batches with TOP1/BPR losses, the
model is trained sequence-wise as in later work on sequential recommendation (e.g. the SASRec
line of papers and most benchmarks): each training sequence is a sample and the next item at
every position is a target, with the loss selectable (default full-softmax cross-entropy). The recurrence only runs over real items
(packed sequences), so left padding does not change the hidden state.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

from recforge.models.sequential.base import SequentialRecommender
from recforge.models.sequential.modules import Dropout, Layout, init_weights


class GRU4RecNet(nn.Module):
    def __init__(self, n_tokens: int, hidden: int, n_layers: int, emb_dropout: float, dropout: float):
        super().__init__()
        self.item = nn.Embedding(n_tokens, hidden, padding_idx=0)
        self.emb_drop = Dropout(emb_dropout)
        self.gru = nn.GRU(hidden, hidden, n_layers, batch_first=True, dropout=dropout if n_layers > 1 else 0.0)
        self.drop = Dropout(dropout)
        self.scale = hidden**0.5

    def forward(self, seqs: torch.Tensor) -> torch.Tensor:
        layout = Layout(seqs, right=True)
        if layout.lmax == 0:
            return torch.zeros(seqs.shape + (self.item.embedding_dim,), device=seqs.device)
        x = self.emb_drop(self.item(seqs[layout.rows, layout.cols]) * self.scale)
        grid = layout.to_grid(x)
        packed = pack_padded_sequence(grid, layout.lengths.clamp(min=1).cpu(), batch_first=True, enforce_sorted=False)
        out, _ = self.gru(packed)
        out, _ = pad_packed_sequence(out, batch_first=True, total_length=layout.lmax)
        return layout.to_padded(self.drop(layout.from_grid(out)))


class GRU4Rec(SequentialRecommender):
    name = "gru4rec"

    def __init__(self, hidden: int = 64, n_layers: int = 1, emb_dropout: float = 0.25, dropout: float = 0.0,
                 **base):
        super().__init__(**base)
        self.hidden, self.n_layers, self.emb_dropout, self.dropout = hidden, n_layers, emb_dropout, dropout

    def build(self, n_users, n_items):
        net = GRU4RecNet(n_items + 1, self.hidden, self.n_layers, self.emb_dropout, self.dropout)
        init_weights(net)  # the GRU keeps PyTorch's own initialisation
        return net

    def encode(self, seqs: torch.Tensor) -> torch.Tensor:
        return self.net_(seqs)

    def output_table(self) -> torch.Tensor:
        return self.net_.item.weight
