"""The user-item graph of graph collaborative filtering models, and propagation on it.

Node layout: users are nodes ``0 .. n_users - 1``, item ``i`` (1..n_items) is node
``n_users + i``; node ``n_users`` is the padding item 0, which has no edges. With the training
matrix ``R`` (n_users, n_items + 1) the adjacency is ``A = [[0, R], [R^T, 0]]`` and its symmetric
normalisation ``D^-1/2 A D^-1/2`` (``D`` the degrees; isolated nodes get 0).

Propagation multiplies a dense (n_nodes, d) matrix by the normalised adjacency, a SciPy CSR
matrix turned into a torch sparse CSR tensor. Because that matrix is symmetric, the backward pass
is the same product (:class:`SparseMM` with ``adj`` as its own transpose), so torch never transposes it.
"""

from __future__ import annotations

import warnings

import numpy as np
import scipy.sparse as sp
import torch
import torch.nn.functional as F


def bipartite_adjacency(r: sp.spmatrix) -> sp.csr_matrix:
    """Binary symmetric adjacency ``[[0, R], [R^T, 0]]`` of a user x item matrix ``R``."""
    r = sp.csr_matrix(r, dtype=np.float32)
    r.sum_duplicates()
    r.eliminate_zeros()  # before binarising: an explicitly stored 0 is not an edge
    r.data[:] = 1.0
    return sp.bmat([[None, r], [r.T, None]], format="csr", dtype=np.float32)


def normalize_symmetric(a: sp.spmatrix) -> sp.csr_matrix:
    """``D^-1/2 A D^-1/2`` with ``D`` the row sums of ``A`` (rows of isolated nodes stay 0)."""
    a = sp.csr_matrix(a, dtype=np.float32)
    deg = np.asarray(a.sum(1), dtype=np.float64).ravel()
    inv = np.zeros_like(deg)
    nz = deg > 0
    inv[nz] = deg[nz] ** -0.5
    d = sp.diags(inv.astype(np.float32))
    out = (d @ a @ d).tocsr()
    out.sort_indices()
    return out.astype(np.float32)


def normalized_adjacency(r: sp.spmatrix) -> sp.csr_matrix:
    """The symmetric-normalised adjacency of the user-item graph of ``R``."""
    return normalize_symmetric(bipartite_adjacency(r))


def to_torch(a: sp.csr_matrix, device: torch.device | str | None = None) -> torch.Tensor:
    """A SciPy CSR matrix as a torch sparse CSR tensor (float32), on ``device`` (None: the CPU)."""
    a = sp.csr_matrix(a, dtype=np.float32)
    t = csr_tensor(torch.from_numpy(a.indptr.astype(np.int64)), torch.from_numpy(a.indices.astype(np.int64)),
                   torch.from_numpy(a.data), a.shape)
    return t if device is None or torch.device(device).type == "cpu" else t.to(device)


def csr_tensor(crow: torch.Tensor, col: torch.Tensor, values: torch.Tensor, size) -> torch.Tensor:
    """``torch.sparse_csr_tensor`` without its "sparse CSR support is in beta" warning."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return torch.sparse_csr_tensor(crow, col, values, size=size)


class SparseMM(torch.autograd.Function):
    """``a @ x`` for a sparse ``a`` whose transpose ``a_t`` is given: the gradient is ``a_t @ grad``
    (no transpose of ``a`` built at every backward pass, as ``torch.sparse.mm``'s own gradient does)."""

    @staticmethod
    def forward(ctx, a, a_t, x):
        ctx.a_t = a_t
        return a @ x

    @staticmethod
    def backward(ctx, grad):
        return None, None, ctx.a_t @ grad.contiguous()


def torch_pair(m: sp.csr_matrix, device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """``(m, mᵀ)`` as torch sparse CSR tensors on ``device``: the argument of :func:`sparse_mm`."""
    return to_torch(m, device), to_torch(sp.csr_matrix(m.T), device)


def sparse_mm(pair: tuple[torch.Tensor, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
    """``a @ x`` for ``pair = (a, aᵀ)`` (:func:`torch_pair`), differentiable in ``x``; in fp32 (see
    :func:`spmm`)."""
    if torch.is_autocast_enabled(x.device.type):
        with torch.autocast(x.device.type, enabled=False):
            return sparse_mm(pair, x.float())
    a, a_t = pair
    return SparseMM.apply(a, a_t, x) if x.requires_grad else a @ x


class EdgeList:
    """The edges of a binary sparse (targets x sources) matrix, for products whose weights vary per
    edge and per call (attention, routing): :func:`edge_mm` and :func:`edge_dot` work on torch
    sparse CSR tensors built on these edges, so no (edges x dim) tensor is ever materialised.

    ``src``/``tgt`` (E,): each edge's source and target, in CSR order (targets ascending);
    ``mean`` (E,): ``1 / in-degree`` of the edge's target (the row-mean weights). The transposed
    layout, needed only by backward passes, is built on first use."""

    def __init__(self, m: sp.spmatrix, device=None):
        m = sp.csr_matrix(m, dtype=np.float32, copy=True)
        m.sum_duplicates()
        m.eliminate_zeros()  # a stored 0 is no edge
        m.sort_indices()
        self.shape = m.shape
        dev = torch.device(device) if device is not None else torch.device("cpu")
        self.crow = torch.from_numpy(m.indptr.astype(np.int64)).to(dev)
        self.src = torch.from_numpy(m.indices.astype(np.int64)).to(dev)
        deg = np.diff(m.indptr)
        tgt = np.repeat(np.arange(m.shape[0], dtype=np.int64), deg)
        self.tgt = torch.from_numpy(tgt).to(dev)
        self.mean = torch.from_numpy((1.0 / np.maximum(deg, 1)).astype(np.float32)[tgt]).to(dev)
        self._pattern = self._t = None

    def __len__(self) -> int:
        return int(self.src.numel())

    def matrix(self, values: torch.Tensor) -> torch.Tensor:
        """The (targets x sources) CSR tensor with ``values`` (E,) on the edges."""
        return csr_tensor(self.crow, self.src, values, self.shape)

    def matrix_t(self, values: torch.Tensor) -> torch.Tensor:
        """The transposed (sources x targets) CSR tensor with ``values`` (E, in edge order) on the edges."""
        if self._t is None:
            perm = torch.argsort(self.src, stable=True)
            crow = torch.zeros(self.shape[1] + 1, dtype=torch.int64, device=self.src.device)
            crow[1:] = torch.cumsum(torch.bincount(self.src, minlength=self.shape[1]), 0)
            self._t = (perm, crow, self.tgt[perm])
        perm, crow, col = self._t
        return csr_tensor(crow, col, values[perm], (self.shape[1], self.shape[0]))

    def dot(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        """``⟨a[tgt[e]], b[src[e]]⟩`` per edge (E,), without gradient (a sampled dense-dense product)."""
        if self._pattern is None or self._pattern.dtype != a.dtype or self._pattern.device != a.device:
            self._pattern = self.matrix(torch.ones(len(self), dtype=a.dtype, device=a.device))
        return torch.sparse.sampled_addmm(self._pattern, a.contiguous(), b.contiguous().T, beta=0.0).values()


class EdgeMM(torch.autograd.Function):
    """``out[v] = Σ_{e: tgt[e] = v} values[e] · x[src[e]]``, differentiable in ``values`` and ``x``."""

    @staticmethod
    def forward(ctx, edges, values, x):
        ctx.edges = edges
        ctx.save_for_backward(values, x)
        return edges.matrix(values) @ x

    @staticmethod
    def backward(ctx, grad):
        values, x = ctx.saved_tensors
        edges, grad = ctx.edges, grad.contiguous()
        g_values = edges.dot(grad, x) if ctx.needs_input_grad[1] else None
        g_x = edges.matrix_t(values) @ grad if ctx.needs_input_grad[2] else None
        return None, g_values, g_x


class EdgeDot(torch.autograd.Function):
    """``⟨a[tgt[e]], b[src[e]]⟩`` per edge, differentiable in ``a`` and ``b``."""

    @staticmethod
    def forward(ctx, edges, a, b):
        ctx.edges = edges
        ctx.save_for_backward(a, b)
        return edges.dot(a, b)

    @staticmethod
    def backward(ctx, grad):
        a, b = ctx.saved_tensors
        edges, grad = ctx.edges, grad.contiguous()
        g_a = edges.matrix(grad) @ b if ctx.needs_input_grad[1] else None
        g_b = edges.matrix_t(grad) @ a if ctx.needs_input_grad[2] else None
        return None, g_a, g_b


def edge_mm(edges: EdgeList, values: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """(targets, d): per target the sum of its sources' rows of ``x`` (sources, d) weighted by the
    edges' ``values`` (E,); in fp32 (see :func:`spmm`)."""
    if torch.is_autocast_enabled(x.device.type):
        with torch.autocast(x.device.type, enabled=False):
            return edge_mm(edges, values.float(), x.float())
    if values.requires_grad or x.requires_grad:
        return EdgeMM.apply(edges, values, x)
    return edges.matrix(values) @ x


def edge_dot(edges: EdgeList, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """(E,): per edge the dot product of its target's row of ``a`` and its source's row of ``b``;
    in fp32."""
    if torch.is_autocast_enabled(a.device.type):
        with torch.autocast(a.device.type, enabled=False):
            return edge_dot(edges, a.float(), b.float())
    if a.requires_grad or b.requires_grad:
        return EdgeDot.apply(edges, a, b)
    return edges.dot(a, b)


def spmm(adj: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """``adj @ x`` (symmetric ``adj``), differentiable in ``x``. Always in fp32: under mixed
    precision (``precision=bf16|fp16``) the sparse product leaves autocast, as sparse kernels
    have no half-precision versions on every device (none on the CPU)."""
    if torch.is_autocast_enabled(x.device.type):
        with torch.autocast(x.device.type, enabled=False):
            return spmm(adj, x.float())
    if x.requires_grad:
        return SparseMM.apply(adj, adj, x)  # symmetric: the transpose is adj itself
    return adj @ x


def propagate(adj: torch.Tensor, ego: torch.Tensor, n_layers: int, include_ego: bool = True,
              noise_eps: float = 0.0) -> torch.Tensor:
    """LightGCN propagation: ``E_k = Â E_{k-1}`` for ``k = 1..n_layers``, combined by the mean of
    ``E_0..E_K`` (``include_ego``) or of ``E_1..E_K``.

    ``noise_eps > 0`` adds SimGCL's perturbation after every layer:
    ``E_k += eps * sign(E_k) * normalize(U)`` with ``U ~ Uniform[0, 1)`` row-normalised."""
    layers = [ego] if include_ego or n_layers == 0 else []
    e = ego
    for _ in range(n_layers):
        e = spmm(adj, e)
        if noise_eps > 0:
            e = e + noise_eps * torch.sign(e) * F.normalize(torch.rand_like(e), dim=-1)
        layers.append(e)
    if len(layers) == 1:
        return layers[0]
    return torch.stack(layers, 0).mean(0)


def split_nodes(e: torch.Tensor, n_users: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(users, items) rows of a node matrix; items include the padding row 0."""
    return e[:n_users], e[n_users:]


def drop_edges(r: sp.csr_matrix, drop: float, rng: np.random.Generator) -> sp.csr_matrix:
    """Edge dropout: every user-item edge is removed with probability ``drop`` (both directions
    together, so the adjacency stays symmetric)."""
    r = sp.csr_matrix(r)
    coo = r.tocoo()
    keep = rng.random(coo.nnz) >= drop
    return sp.csr_matrix((coo.data[keep], (coo.row[keep], coo.col[keep])), shape=r.shape)


def drop_nodes(r: sp.csr_matrix, drop: float, rng: np.random.Generator) -> sp.csr_matrix:
    """Node dropout: every user and every item is removed with probability ``drop``, with all its
    edges (the node itself stays, isolated)."""
    r = sp.csr_matrix(r)
    coo = r.tocoo()
    keep_u = rng.random(r.shape[0]) >= drop
    keep_i = rng.random(r.shape[1]) >= drop
    keep = keep_u[coo.row] & keep_i[coo.col]
    return sp.csr_matrix((coo.data[keep], (coo.row[keep], coo.col[keep])), shape=r.shape)
