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
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "sparse CSR support is in beta"
        t = torch.sparse_csr_tensor(torch.from_numpy(a.indptr.astype(np.int64)),
                                    torch.from_numpy(a.indices.astype(np.int64)),
                                    torch.from_numpy(a.data), size=a.shape)
        return t if device is None or torch.device(device).type == "cpu" else t.to(device)


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
