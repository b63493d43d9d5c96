"""Building blocks of the sequential models: a Transformer encoder over left-padded item
sequences (causal or bidirectional, pre-LN or post-LN) and weight initialisation."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

ACTIVATIONS = {"gelu": F.gelu, "relu": F.relu}


def set_transformer_params(model, hidden: int, n_layers: int, n_heads: int, inner: int, dropout: float,
                           attn_dropout: float | None, activation: str) -> None:
    """Check and store the Transformer hyper-parameters shared by SASRec and BERT4Rec."""
    from recforge.errors import ConfigError

    if activation not in ACTIVATIONS:
        raise ConfigError(f"activation={activation!r}: choose one of {', '.join(ACTIVATIONS)}")
    if hidden % n_heads:
        raise ConfigError(f"hidden={hidden} must be a multiple of n_heads={n_heads}")
    model.hidden, model.n_layers, model.n_heads, model.inner = hidden, n_layers, n_heads, inner
    model.dropout, model.attn_dropout, model.activation = dropout, attn_dropout, activation


def init_weights(module: nn.Module, std: float = 0.02) -> None:
    """Normal(0, std) for linear and embedding weights, zero biases, unit layer norms; the
    padding row of an embedding stays zero."""
    for m in module.modules():
        if isinstance(m, nn.Linear):
            nn.init.normal_(m.weight, std=std)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Embedding):
            nn.init.normal_(m.weight, std=std)
            if m.padding_idx is not None:
                with torch.no_grad():
                    m.weight[m.padding_idx].zero_()
        elif isinstance(m, nn.LayerNorm):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)


class Dropout(nn.Module):
    """Inverted dropout whose mask comes from random bytes: one 64-bit random draw gives the
    mask of eight elements, many times faster on CPU than ``torch.nn.Dropout`` (Bernoulli
    sampling per element was a fifth of a SASRec training step). The drop probability is
    rounded to a multiple of 1/256 (0.2 → 51/256 ≈ 0.199) and the kept values are scaled by
    the exact inverse keep rate, so expectations are preserved. Uses PyTorch's global generator
    (seeded by ``torch.manual_seed``)."""

    def __init__(self, p: float):
        super().__init__()
        if not 0.0 <= p < 1.0:
            raise ValueError(f"dropout probability must be in [0, 1), got {p}")
        self.p = p
        self.threshold = int(round(p * 256))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.threshold == 0:
            return x
        n = x.numel()
        bits = torch.empty((n + 7) // 8, dtype=torch.int64, device=x.device).random_(-(2**63), 2**63 - 1)
        keep = bits.view(torch.uint8)[:n].view(x.shape) >= self.threshold
        return x * keep.to(x.dtype).mul_(256.0 / (256 - self.threshold))

    def extra_repr(self) -> str:
        return f"p={self.p}"


class Layout:
    """Where the valid tokens of a left-padded (B, L) batch sit.

    The encoders work on the valid tokens only, packed as a (T, d) matrix (T = number of
    non-padding items), so that embeddings, projections, feed-forward networks and layer norms
    cost nothing for padding (most of a batch on short-sequence data: Beauty's training
    sequences have 5.7 inputs on average for a window of 50). Only attention (and a recurrence)
    needs a grid: the tokens are scattered into a zero-filled (rows, width, ...) tensor, each row
    starting at column 0 (``right=True``, padding on the right: a causal mask alone is then
    exact) or ending at the last column (left padding), and gathered back afterwards.

    ``to_grid``/``from_grid`` use one grid for the whole batch (width: its longest row).
    :attr:`groups` split the rows by length (widths 8, 16, 32, ...) so that attention, whose
    cost grows with rows x width², is not paid at the batch's longest length by every row.
    """

    MIN_WIDTH = 8

    def __init__(self, seqs: torch.Tensor, right: bool):
        b, length = seqs.shape
        self.right = right
        self.valid = seqs > 0
        self.lengths = self.valid.sum(1)
        self.rows, self.cols = self.valid.nonzero(as_tuple=True)
        self.batch, self.width = b, length
        self.lmax = int(self.lengths.max()) if b else 0
        if right:
            self.slot = self.cols - (length - self.lengths)[self.rows]
        else:
            self.slot = self.cols - (length - self.lmax)
        self._groups = None

    def to_grid(self, x: torch.Tensor) -> torch.Tensor:
        """(T, ...) tokens to a zero-filled (B, lmax, ...) grid."""
        grid = x.new_zeros((self.batch, self.lmax) + tuple(x.shape[1:]))
        return grid.index_put((self.rows, self.slot), x)

    def from_grid(self, grid: torch.Tensor) -> torch.Tensor:
        return grid[self.rows, self.slot]

    def to_padded(self, x: torch.Tensor) -> torch.Tensor:
        """(T, d) tokens back to the input's left-padded (B, L, d) layout, zeros at padding."""
        out = x.new_zeros((self.batch, self.width) + tuple(x.shape[1:]))
        return out.index_put((self.rows, self.cols), x)

    @property
    def groups(self) -> list["Group"]:
        if self._groups is None:
            self._groups = self._make_groups()
        return self._groups

    def _make_groups(self) -> list["Group"]:
        lengths = self.lengths
        width = torch.full_like(lengths, self.MIN_WIDTH)
        while bool((width < lengths).any()):
            width = torch.where(width < lengths, width * 2, width)
        width = torch.minimum(width, torch.full_like(width, max(self.lmax, 1)))
        token_width = width[self.rows]
        groups = []
        for w in torch.unique(token_width).tolist():
            tok = (token_width == w).nonzero().squeeze(1)
            rows_here = (width == w) & (lengths > 0)
            local = torch.cumsum(rows_here, 0) - 1  # row index inside the group's grid
            n_rows = int(rows_here.sum())
            rows = self.rows[tok]
            if self.right:
                slot = self.cols[tok] - (self.width - lengths[rows])
            else:
                slot = self.cols[tok] - (self.width - w)
            mask = None
            if not self.right:
                lens = lengths[rows_here]
                cols = torch.arange(w, device=lens.device)
                mask = (cols.unsqueeze(0) >= (w - lens).unsqueeze(1)).view(n_rows, 1, 1, w)
            groups.append(Group(tok, local[rows], slot, n_rows, w, mask))
        if len(groups) > 1:  # where each token lands when the groups' outputs are concatenated
            self.merge_index = torch.argsort(torch.cat([g.tok for g in groups]))
        return groups


class Group:
    """Tokens of the rows that share one attention grid: ``tok`` indexes the packed tokens,
    ``row``/``slot`` their place in the (n_rows, width) grid, ``key_mask`` the valid keys
    (bidirectional attention only)."""

    __slots__ = ("tok", "row", "slot", "n_rows", "width", "key_mask")

    def __init__(self, tok, row, slot, n_rows, width, key_mask):
        self.tok, self.row, self.slot, self.n_rows, self.width, self.key_mask = tok, row, slot, n_rows, width, key_mask


class Block(nn.Module):
    """Multi-head self-attention and a position-wise feed-forward network, each with a residual
    connection, dropout and layer normalisation (before the sub-layer when ``norm_first``,
    after the residual sum otherwise). Works on packed tokens (see :class:`Layout`)."""

    def __init__(self, hidden: int, n_heads: int, inner: int, dropout: float, attn_dropout: float,
                 norm_first: bool, activation: str = "gelu", eps: float = 1e-8):
        super().__init__()
        if hidden % n_heads:
            raise ValueError(f"hidden ({hidden}) must be a multiple of n_heads ({n_heads})")
        self.n_heads, self.norm_first = n_heads, norm_first
        self.qkv = nn.Linear(hidden, 3 * hidden)
        self.proj = nn.Linear(hidden, hidden)
        self.ln1 = nn.LayerNorm(hidden, eps=eps)
        self.ln2 = nn.LayerNorm(hidden, eps=eps)
        self.ff1 = nn.Linear(hidden, inner)
        self.ff2 = nn.Linear(inner, hidden)
        self.drop = Dropout(dropout)
        self.attn_drop = Dropout(attn_dropout)
        self.act = ACTIVATIONS[activation]

    def attention(self, x: torch.Tensor, layout: Layout, causal: bool) -> torch.Tensor:
        d, h = x.shape[1], self.n_heads
        qkv = self.qkv(x)
        outs = []
        for g in layout.groups:
            grid = qkv.new_zeros(g.n_rows, g.width, 3 * d).index_put((g.row, g.slot), qkv[g.tok])
            q, k, v = grid.view(g.n_rows, g.width, 3, h, d // h).permute(2, 0, 3, 1, 4)
            if self.training and self.attn_drop.threshold:
                # explicit attention so that the weights go through the fast dropout
                w = (q @ k.transpose(-1, -2)) * (q.shape[-1] ** -0.5)
                allowed = (torch.ones(g.width, g.width, dtype=torch.bool, device=w.device).tril_() if causal
                           else g.key_mask)
                w = w.masked_fill(~allowed, -torch.inf)
                out = self.attn_drop(torch.softmax(w, -1)) @ v
            else:
                out = F.scaled_dot_product_attention(q, k, v, attn_mask=None if causal else g.key_mask,
                                                     is_causal=causal)
            outs.append(out.transpose(1, 2).reshape(g.n_rows, g.width, d)[g.row, g.slot])
        if not outs:
            return self.proj(x)
        if len(outs) == 1:
            merged = outs[0]  # one group holds every token, in token order
        else:
            merged = torch.cat(outs).index_select(0, layout.merge_index)
        return self.proj(merged)

    def feed_forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.ff2(self.drop(self.act(self.ff1(x))))

    def forward(self, x: torch.Tensor, layout: Layout, causal: bool) -> torch.Tensor:
        if self.norm_first:
            x = x + self.drop(self.attention(self.ln1(x), layout, causal))
            return x + self.drop(self.feed_forward(self.ln2(x)))
        x = self.ln1(x + self.drop(self.attention(x, layout, causal)))
        return self.ln2(x + self.drop(self.feed_forward(x)))


class TransformerEncoder(nn.Module):
    """Item + learned position embeddings and a stack of :class:`Block`.

    Input: left-padded item ids (B, L), 0 = padding; output (B, L, hidden) in the same layout,
    zeros at padding. Positions are counted back from the most recent item (the last column
    always has position ``max_len - 1``), as in SASRec's left-padded windows.

    * causal: a valid position sees itself and the earlier valid positions;
    * bidirectional: every position sees every valid position of its row.

    Padding is never computed on (see :class:`Layout`); the result is the same as running the
    padded batch with exact masks.
    """

    def __init__(self, n_tokens: int, max_len: int, hidden: int, n_layers: int, n_heads: int, inner: int,
                 dropout: float, attn_dropout: float, causal: bool, norm_first: bool,
                 activation: str = "gelu", scale_embeddings: bool = False, eps: float = 1e-8):
        super().__init__()
        self.causal, self.norm_first, self.scale = causal, norm_first, hidden**0.5 if scale_embeddings else 1.0
        self.item = nn.Embedding(n_tokens, hidden, padding_idx=0)
        self.pos = nn.Embedding(max_len, hidden)
        self.drop = Dropout(dropout)
        self.blocks = nn.ModuleList(
            Block(hidden, n_heads, inner, dropout, attn_dropout, norm_first, activation, eps) for _ in range(n_layers)
        )
        # pre-LN: a final norm after the stack; post-LN: a norm on the embeddings
        self.ln = nn.LayerNorm(hidden, eps=eps)

    def forward(self, seqs: torch.Tensor) -> torch.Tensor:
        if seqs.shape[1] > self.pos.num_embeddings:
            seqs = seqs[:, -self.pos.num_embeddings :]
        layout = Layout(seqs, right=self.causal)
        tokens = seqs[layout.rows, layout.cols]
        pos = layout.cols + (self.pos.num_embeddings - seqs.shape[1])
        x = self.item(tokens) * self.scale + self.pos(pos)
        if not self.norm_first:
            x = self.ln(x)
        x = self.drop(x)
        for blk in self.blocks:
            x = blk(x, layout, self.causal)
        if self.norm_first:
            x = self.ln(x)
        return layout.to_padded(x)
