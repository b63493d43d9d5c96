"""APGL4SR: SASRec with an adaptive global item graph and personalised graph attention bias.

Yin, Wang, Xu, Wu, Zhao, Guo, Liu, Tang, Lian & Chen, "APGL4SR: A Generic Framework with Adaptive
and Personalized Global Collaborative Information in Sequential Recommendation", CIKM 2023.
Reference code: USTC-StarTeam/APGL4SR (``src/models.py``, ``src/trainers.py``, ``src/main.py``,
``src/scripts/run_*.sh``), read for every default below.

What is implemented (N = n_items + 1 rows, row 0 the padding item, which has no edge):

* **Global graph, from the training part only.** For every training sequence and every item,
  an edge to each of the next ``window`` items with weight ``1 / distance``, summed over all
  sequences (``C``); ``A = C + C^T + I`` over the catalogue. Two normalisations of it, both as in
  the authors' code: ``Â = D^-1 A + A D^-1`` with ``D`` the number of non-zeros of each row (a
  sum, not the symmetric product, and a count, not the weighted degree: ``degree @ sparse_matrix
  + sparse_matrix @ degree`` in ``global_graph_construction``), used by the attention bias and
  the graph learner; and ``S = D^-1/2 B D^-1/2`` over the binary pattern ``B`` of ``A``, used to
  propagate embeddings (the code propagates with DGL's ``GraphConv`` without passing the edge
  weights, so its default ``norm='both'`` over the unweighted graph applies). The graph is fitted
  in ``prepare_fit`` from ``Split.train_sequences``, never from validation or test items, and is
  saved with the model.
* **Adaptive global graph (the graph learner, low-rank).** The refined graph is
  ``G = S + graph_noise * (Â P)(Â Q)^T`` with learnable ``P, Q`` (N x ``graph_rank``), never
  materialised: propagation computes ``S e + graph_noise * (Â P)((Â Q)^T e)``, which costs
  ``O(nnz * r + N * r * d)`` instead of the ``O(N^2 d)`` of a dense N x N graph. The paper calls
  its accelerator SVD-based; the released code has two low-rank forms of the adaptive view, both
  offered: ``graph_view=learned`` (default, what the scripts run) is the learned ``US``/``V``
  factorisation above (rank ``4 * hidden`` in the code, the default here); ``graph_view=svd`` is
  the code's ``--svd`` variant, the fixed rank-``graph_rank`` truncated SVD ``U diag(s) V^T`` of
  ``Â`` (``torch.svd_lowrank`` on the sparse graph with 4 power iterations, the code's call on the
  dense graph with the default 2; computed once before training), propagating
  ``U diag(s) (V^T e)``.
* **Self-supervised graph loss.** Item embeddings (the SASRec item table) are propagated for
  ``graph_layers`` layers through the adaptive view and through ``S``, each view the mean of its
  layer outputs including the input (LightGCN style); for the distinct target items of the batch
  (the code's ``_gsl_contrastive_learning(target_pos)``) the two views are pulled together by InfoNCE over cosine similarities at
  ``graph_temperature`` (both cross-view and same-view negatives, as the code's ``NCELoss``;
  :func:`recforge.training.losses.info_nce`), weight ``gcl_weight``. The total loss is the
  next-item loss plus ``gcl_weight`` times this loss; ``gcl_weight=0`` leaves the next-item loss
  alone.
* **Personalised graph bias (relative positional encoding).** In every attention layer and
  head, the score of query position ``t`` (item ``a``) for key position ``s <= t`` (item ``b``)
  gets ``att_bias * w_u * Â[a, b]`` added before the softmax, where ``w_u = Softsign(MLP(e_u))``
  is a learned scalar per user (user embedding, Linear-ReLU-Linear, as the code's
  ``adaption_layer``). ``bias_graph=adaptive`` adds the learned part ``graph_noise * P_a . Q_b``
  (the code's ``--gsl_weight``, which, as here, reads the raw factors rather than ``Â P`` and
  ``Â Q``). Only items at or before ``t`` enter, so scoring stays causal.

Choices the paper leaves open or where we depart from the code:

* the backbone is this package's SASRec (pre-LN blocks, ``loss=ce`` full softmax by default,
  dropout 0.2, ``n_layers=2``, ``n_heads=1``; see :mod:`recforge.models.sequential.sasrec`); the
  authors' scripts run a post-LN encoder with BCE and one negative, dropout 0.5, 2 heads, 1 layer
  (Beauty) or 2 (Yelp), ``batch_size 256``;
* the authors' scripts also train a CL4SRec-style sequence contrastive loss (``--contrast_type
  Hybrid``, ``cf_weight 0.1``), i.e. APGL4SR over a CL4SRec backbone; that part belongs to the
  backbone, not to APGL4SR's framework, and is not included;
* users unknown at training (user index -1) get the weight of the mean user embedding, so a raw
  history is scored with the population's typical bias strength (the code has no unknown users);
* defaults from the code: ``window`` 2 (``--k``), ``graph_layers`` 2 (``--gnn_layers``),
  ``graph_noise`` 0.05, ``graph_rank`` 4 x hidden, ``gcl_weight`` 0.1, ``graph_temperature`` 0.2
  (``--graph_temp``), ``att_bias`` 1, ``bias_graph=fixed`` and ``graph_view=learned`` (the scripts
  pass neither ``--gsl_weight`` nor ``--svd``); the abstract describes the personalised
  correlations as extracted from the adaptive graph, which ``bias_graph=adaptive`` follows;
* the learned factors are initialised from N(0, 0.02) like every weight of the code
  (``--load_graph``, starting from saved factors, is not offered).
"""

from __future__ import annotations

import numpy as np
import scipy.sparse as sp
import torch
import torch.nn.functional as F
from torch import nn

from recforge.errors import ConfigError
from recforge.models.sequential.modules import Block, Layout, TransformerEncoder, init_weights
from recforge.models.sequential.sasrec import SASRec
from recforge.training.losses import info_nce

GRAPH_VIEWS = ("learned", "svd")
BIAS_GRAPHS = ("fixed", "adaptive")


# ---- the global graph ------------------------------------------------------------------------
def transition_graph(indptr: np.ndarray, items: np.ndarray, n_items: int, window: int) -> sp.csr_matrix:
    """``A = C + C^T + I`` of (n_items + 1)^2: ``C[a, b]`` sums ``1 / d`` over every training
    sequence where ``b`` follows ``a`` at distance ``d <= window``. Row and column 0 stay empty."""
    n = n_items + 1
    seg = np.repeat(np.arange(len(indptr) - 1), np.diff(indptr))
    src, dst, val = [], [], []
    for d in range(1, window + 1):
        same = seg[:-d] == seg[d:] if len(items) > d else np.zeros(0, dtype=bool)
        src.append(items[:-d][same] if len(items) > d else items[:0])
        dst.append(items[d:][same] if len(items) > d else items[:0])
        val.append(np.full(int(same.sum()), 1.0 / d))
    c = sp.coo_matrix((np.concatenate(val), (np.concatenate(src), np.concatenate(dst))), shape=(n, n)).tocsr()
    eye = sp.diags(np.r_[0.0, np.ones(n_items)])
    return (c + c.T + eye).tocsr()


def normalise(a: sp.csr_matrix) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(index (2, nnz) row-major, Â values, S values)``: ``Â = D^-1 A + A D^-1`` and
    ``S = D^-1/2 B D^-1/2`` (B the binary pattern of A), D the non-zero count of each row."""
    a = a.tocoo()
    order = np.lexsort((a.col, a.row))
    row, col, val = a.row[order].astype(np.int64), a.col[order].astype(np.int64), a.data[order]
    deg = np.bincount(row, minlength=a.shape[0]).astype(np.float64)
    inv = np.divide(1.0, deg, out=np.zeros_like(deg), where=deg > 0)
    a_hat = val * (inv[row] + inv[col])
    s = np.sqrt(inv[row] * inv[col])
    return np.stack([row, col]), a_hat.astype(np.float32), s.astype(np.float32)


def svd_factors(adj: torch.Tensor, rank: int, niter: int = 4) -> tuple[torch.Tensor, torch.Tensor]:
    """``(U diag(s), V)`` of the rank-``rank`` truncated SVD of ``adj`` (dense or sparse COO)."""
    q = min(rank, adj.shape[0], adj.shape[1])
    u, s, v = torch.svd_lowrank(adj, q=q, niter=niter)
    return u * s, v


# ---- the network -----------------------------------------------------------------------------
class BiasedBlock(Block):
    """A SASRec block whose attention scores take an additive bias per (query, key) pair."""

    def attention(self, x, layout, causal, biases=None):
        if biases is None:
            return super().attention(x, layout, causal)
        d, h = x.shape[1], self.n_heads
        qkv = self.qkv(x)
        outs = []
        for g, bias in zip(layout.groups, biases):
            grid = qkv.new_zeros(g.n_rows, g.width, 3 * d).index_put((g.row, g.slot), qkv[g.tok])
            q, k, v = grid.view(g.n_rows, g.width, 3, h, d // h).permute(2, 0, 3, 1, 4)
            allowed = torch.ones(g.width, g.width, dtype=torch.bool, device=x.device).tril_()
            mask = bias.masked_fill(~allowed, -torch.inf)  # (rows, 1, w, w): the bias and causality
            if self.training and self.attn_drop.threshold:
                w = (q @ k.transpose(-1, -2)) * (q.shape[-1] ** -0.5) + mask
                out = self.attn_drop(torch.softmax(w, -1)) @ v
            else:
                out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
            outs.append(out.transpose(1, 2).reshape(g.n_rows, g.width, d)[g.row, g.slot])
        if not outs:
            return self.proj(x)
        merged = outs[0] if len(outs) == 1 else torch.cat(outs).index_select(0, layout.merge_index)
        return self.proj(merged)

    def forward(self, x, layout, causal, biases=None):
        x = x + self.drop(self.attention(self.ln1(x), layout, causal, biases))
        return x + self.drop(self.feed_forward(self.ln2(x)))


class APGL4SRNet(TransformerEncoder):
    """SASRec's causal pre-LN encoder with biased blocks, user embeddings and the adaptation MLP,
    the learned graph factors and the fitted graph (non-persistent buffers: saved as model state)."""

    def __init__(self, n_users: int, n_items: int, graph: dict, rank: int, learned: bool, **encoder):
        super().__init__(n_items + 1, **encoder)
        hidden = self.item.embedding_dim
        self.blocks = nn.ModuleList(
            BiasedBlock(hidden, blk.n_heads, blk.ff1.out_features, blk.drop.p, blk.attn_drop.p, True,
                        encoder.get("activation", "gelu"), blk.ln1.eps) for blk in self.blocks)
        self.user = nn.Embedding(max(n_users, 1), hidden)
        self.adapt = nn.Sequential(nn.Linear(hidden, hidden), nn.ReLU(), nn.Linear(hidden, 1), nn.Softsign())
        n = n_items + 1
        self.p = nn.Parameter(torch.zeros(n, rank)) if learned else None
        self.q = nn.Parameter(torch.zeros(n, rank)) if learned else None
        index = torch.as_tensor(graph["index"], dtype=torch.int64)
        self.register_buffer("g_index", index, persistent=False)
        self.register_buffer("g_keys", index[0] * n + index[1], persistent=False)  # sorted: row-major
        self.register_buffer("g_adj", torch.as_tensor(graph["adj"]), persistent=False)
        self.register_buffer("g_prop", torch.as_tensor(graph["prop"]), persistent=False)
        self.n_nodes = n

    def sparse(self, values: torch.Tensor) -> torch.Tensor:
        return torch.sparse_coo_tensor(self.g_index, values, (self.n_nodes, self.n_nodes),
                                       is_coalesced=True, check_invariants=False)

    def adjacency(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        """``Â[a, b]`` elementwise for broadcastable item tensors (0 where there is no edge)."""
        a, b = torch.broadcast_tensors(a, b)
        if len(self.g_keys) == 0:
            return torch.zeros(a.shape, device=a.device)
        key = (a * self.n_nodes + b).reshape(-1)
        pos = torch.searchsorted(self.g_keys, key).clamp_(max=len(self.g_keys) - 1)
        hit = self.g_keys[pos] == key
        return torch.where(hit, self.g_adj[pos], 0.0).view(a.shape)

    def forward(self, seqs: torch.Tensor, weight: torch.Tensor | None = None, noise: float = 0.0) -> torch.Tensor:
        """``weight`` (B,): each row's bias scale (``att_bias * w_u``); None: no bias (plain SASRec).
        ``noise`` > 0 adds ``noise * P_a . Q_b`` to the bias (the adaptive part)."""
        if seqs.shape[1] > self.pos.num_embeddings:
            seqs = seqs[:, -self.pos.num_embeddings :]
        layout = Layout(seqs, right=True)
        tokens = seqs[layout.rows, layout.cols]
        pos = layout.cols + (self.pos.num_embeddings - seqs.shape[1])
        x = self.drop(self.item(tokens) * self.scale + self.pos(pos))
        biases = None if weight is None else self.biases(layout, tokens, weight, noise)
        for blk in self.blocks:
            x = blk(x, layout, True, biases)
        return layout.to_padded(self.ln(x))

    def biases(self, layout: Layout, tokens: torch.Tensor, weight: torch.Tensor, noise: float) -> list:
        out = []
        for g in layout.groups:
            items = tokens.new_zeros(g.n_rows, g.width).index_put((g.row, g.slot), tokens[g.tok])
            rows = layout.rows.new_zeros(g.n_rows).index_put((g.row,), layout.rows[g.tok])
            rel = self.adjacency(items.unsqueeze(2), items.unsqueeze(1))
            if noise:
                rel = rel + noise * (self.p[items] @ self.q[items].transpose(1, 2))
            out.append((weight[rows].view(-1, 1, 1) * rel).unsqueeze(1))
        return out


class APGL4SR(SASRec):
    name = "apgl4sr"

    def __init__(self, window: int = 2, graph_layers: int = 2, graph_rank: int | None = None,
                 graph_noise: float = 0.05, graph_view: str = "learned", gcl_weight: float = 0.1,
                 graph_temperature: float = 0.2, att_bias: float = 1.0, bias_graph: str = "fixed", **sasrec):
        super().__init__(**sasrec)
        if int(window) != window or window < 1:
            raise ConfigError(f"window={window}: must be an integer >= 1 (how many next items each item links to)")
        if int(graph_layers) != graph_layers or graph_layers < 1:
            raise ConfigError(f"graph_layers={graph_layers}: must be an integer >= 1")
        if graph_rank is not None and (int(graph_rank) != graph_rank or graph_rank < 1):
            raise ConfigError(f"graph_rank={graph_rank}: must be an integer >= 1, or null for 4 x hidden")
        if graph_noise < 0:
            raise ConfigError(f"graph_noise={graph_noise}: must be >= 0 (the weight of the learned graph)")
        if graph_view not in GRAPH_VIEWS:
            raise ConfigError(f"graph_view={graph_view!r}: choose learned (the adaptive low-rank graph) or svd "
                              f"(the fixed truncated SVD of the global graph)")
        if gcl_weight < 0:
            raise ConfigError(f"gcl_weight={gcl_weight}: must be >= 0 (0 switches the graph loss off)")
        if graph_temperature <= 0:
            raise ConfigError(f"graph_temperature={graph_temperature}: must be > 0")
        if att_bias < 0:
            raise ConfigError(f"att_bias={att_bias}: must be >= 0 (0 switches the attention bias off)")
        if bias_graph not in BIAS_GRAPHS:
            raise ConfigError(f"bias_graph={bias_graph!r}: choose fixed (the global graph) or adaptive "
                              f"(plus the learned part)")
        if bias_graph == "adaptive" and graph_view != "learned":
            raise ConfigError("bias_graph=adaptive needs graph_view=learned (the learned factors it reads); "
                              "set graph_view=learned or bias_graph=fixed")
        self.window, self.graph_layers, self.graph_rank = window, graph_layers, graph_rank
        self.graph_noise = graph_noise
        self.graph_view, self.gcl_weight, self.graph_temperature = graph_view, gcl_weight, graph_temperature
        self.att_bias, self.bias_graph = att_bias, bias_graph

    @property
    def rank(self) -> int:
        return 4 * self.hidden if self.graph_rank is None else int(self.graph_rank)

    def protocol_notes(self) -> dict:
        return super().protocol_notes() | {
            "graph": f"transitions within {self.window} items of the training sequences, weight 1/distance",
            "graph_view": self.graph_view, "graph_rank": self.rank, "gcl_weight": self.gcl_weight,
            "att_bias": self.att_bias, "bias_graph": self.bias_graph}

    # ---- fit ----------------------------------------------------------------------------------
    def prepare_fit(self, split) -> None:
        super().prepare_fit(split)
        self.fit_graph(*split.train_sequences)

    def fit_graph(self, indptr: np.ndarray, items: np.ndarray) -> None:
        """The global graph of the training sequences ``(indptr, items)``; sets ``graph_``."""
        index, adj, prop = normalise(transition_graph(indptr, items, self.n_items_, int(self.window)))
        self.graph_ = {"index": torch.from_numpy(index), "adj": torch.from_numpy(adj), "prop": torch.from_numpy(prop)}

    def build(self, n_users, n_items):
        graph = getattr(self, "graph_", None)
        if graph is None:
            raise ConfigError("apgl4sr: the global graph is fitted from the training data; call fit first")
        net = APGL4SRNet(
            n_users, n_items, graph, self.rank, self.graph_view == "learned",
            max_len=self.max_len, hidden=self.hidden, n_layers=self.n_layers, n_heads=self.n_heads,
            inner=self.inner, dropout=self.dropout,
            attn_dropout=self.dropout if self.attn_dropout is None else self.attn_dropout,
            causal=True, norm_first=True, activation=self.activation, scale_embeddings=True)
        init_weights(net)
        if net.p is not None:
            nn.init.normal_(net.p, std=0.02)
            nn.init.normal_(net.q, std=0.02)
        return net

    def before_training(self, split, valid=None) -> None:
        self._svd = None
        if self.graph_view == "svd" and self.gcl_weight:
            with torch.no_grad():
                self._svd = svd_factors(self.net_.sparse(self.net_.g_adj), self.rank)

    def on_device(self, device: torch.device) -> None:
        super().on_device(device)
        if getattr(self, "_svd", None) is not None:
            self._svd = tuple(t.to(device) for t in self._svd)

    def make_batch(self, rows, rng):
        batch = super().make_batch(rows, rng)
        batch["user"] = torch.from_numpy(self._sample_user[rows].astype(np.int64))
        return batch

    # ---- model --------------------------------------------------------------------------------
    def user_weight(self, users: torch.Tensor) -> torch.Tensor:
        """``att_bias * Softsign(MLP(e_u))`` per row; users outside the table (-1: unknown) get
        the mean user embedding."""
        table = self.net_.user.weight
        known = (users >= 0) & (users < table.shape[0])
        emb = torch.where(known.unsqueeze(1), table[users.clamp(0, table.shape[0] - 1)], table.mean(0))
        return self.att_bias * self.net_.adapt(emb).squeeze(1)

    def encode(self, seqs: torch.Tensor, users: torch.Tensor | None = None) -> torch.Tensor:
        if not self.att_bias:
            return self.net_(seqs)
        if users is None:
            users = torch.full((seqs.shape[0],), -1, dtype=torch.long, device=seqs.device)
        noise = self.graph_noise if self.bias_graph == "adaptive" else 0.0
        return self.net_(seqs, self.user_weight(users), noise)

    def propagate(self, adaptive: bool) -> torch.Tensor:
        """Item embeddings (N, d) propagated ``graph_layers`` times through the adaptive view
        (``adaptive``) or the fixed graph ``S``; the mean of every layer's output and the input."""
        net = self.net_
        emb = net.item.weight[: net.n_nodes]
        s = net.sparse(net.g_prop)
        if adaptive and self.graph_view == "learned":
            a = net.sparse(net.g_adj)
            left, right = torch.sparse.mm(a, net.p), torch.sparse.mm(a, net.q)
        layers = [emb]
        for _ in range(self.graph_layers):
            if not adaptive:
                emb = torch.sparse.mm(s, emb)
            elif self.graph_view == "learned":
                emb = torch.sparse.mm(s, emb) + self.graph_noise * (left @ (right.T @ emb))
            else:
                us, v = self._svd
                emb = us @ (v.T @ emb)
            layers.append(emb)
        return torch.stack(layers).mean(0)

    def graph_loss(self, items: torch.Tensor) -> torch.Tensor:
        """InfoNCE between the adaptive and the fixed view of ``items`` (distinct, > 0)."""
        z1, z2 = self.propagate(True)[items], self.propagate(False)[items]
        return info_nce(z1, z2, self.graph_temperature, similarity="cos")

    def extra_loss(self, batch, hidden):
        if not self.gcl_weight:
            return None
        items = torch.unique(batch["tgt"])
        return self.gcl_weight * self.graph_loss(items[items > 0])

    def loss(self, batch: dict) -> torch.Tensor:
        hidden = self.encode(batch["inp"], batch["user"])
        total = self.next_item_loss(hidden, batch["tgt"], batch.get("neg"))
        extra = self.extra_loss(batch, hidden)
        return total if extra is None else total + extra

    def score(self, hist) -> torch.Tensor:
        """Scores (batch, n_items + 1) on the model's device, from the history items and the user
        index (its bias weight; -1 for an unknown user)."""
        with torch.no_grad():
            users = torch.as_tensor(np.asarray(hist.users), dtype=torch.long, device=self.device_)
            h = self.encode(self.score_input(hist), users)[:, -1]
            return h @ self.output_table().T
