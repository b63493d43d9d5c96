"""ONNX Runtime backend of :class:`~recforge.semantic.encoder.TextEncoder` (``backend="onnx"``).

The sentence-transformers model (transformer, pooling and any dense layers) is exported once to
an ONNX graph with ``torch.onnx.export`` and kept under ``$RECFORGE_CACHE/onnx/`` (beside the
vector cache, default ``~/.cache/recforge``), in a folder keyed by the model folder's path and
fingerprint: a second run loads the file and does not export again. The export writes to a
temporary folder that is renamed into place, so an interrupted export leaves nothing half
written. With ``quantize=True`` the graph's matrix products get int8 weights by ONNX Runtime's
dynamic quantisation, per output channel (``model-int8.onnx``, made once from the float graph).

Texts are tokenised once, ordered by token count (longest first) and run in batches padded to
their longest text, so padding is small; the outputs are L2-normalised like the torch path's.

Needs ``onnxruntime`` and ``onnx`` (both in the ``text`` extra); exporting also loads the model
with sentence-transformers and torch, running an exported graph does not.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
import os
import shutil
import uuid
import warnings
from pathlib import Path

import numpy as np

from recforge.data.prepare import cache_dir
from recforge.errors import ConfigError

#: bump when the exported graph changes (export settings, opset): older exports are then ignored
EXPORT_VERSION = 1
OPSET = 17
_INPUTS = ("input_ids", "attention_mask", "token_type_ids")
_NEEDS = ("onnxruntime", "onnx")


def onnx_cache_root() -> Path:
    """``$RECFORGE_CACHE/onnx`` (default ``~/.cache/recforge/onnx``), beside the vector cache."""
    return cache_dir() / "onnx"


def _importable(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):  # a module blocked in sys.modules has no spec
        return False


def require_onnx() -> None:
    """Raise one :class:`ConfigError` naming the fix when onnxruntime or onnx is missing."""
    missing = [m for m in _NEEDS if not _importable(m)]
    if missing:
        raise ConfigError(f"the onnx encoder backend needs {' and '.join(missing)}, which "
                          f"{'is' if len(missing) == 1 else 'are'} not installed: pip install 'recforge[text]' "
                          "(or use the default torch backend)")


def export_folder(model_path: Path, model_id: str, root: Path | None = None) -> Path:
    """The folder of a model's export: named by the encoder's model id (folder name and
    fingerprint) and a hash of the model's resolved path, so another model (or the same one
    changed) is exported anew."""
    where = hashlib.sha256(str(Path(model_path).resolve()).encode()).hexdigest()[:10]
    return (root or onnx_cache_root()) / f"{model_id}-{where}-v{EXPORT_VERSION}"


def _export(model_path: Path, out: Path) -> None:
    """Write ``model.onnx``, the tokenizer and ``export.json`` into folder ``out``."""
    import torch

    from recforge.semantic.encoder import load_sentence_transformer

    # eager attention traces to plain matrix products that ONNX Runtime fuses and quantises well
    st = load_sentence_transformer(model_path, "cpu", model_kwargs={"attn_implementation": "eager"})
    st.eval()
    tok = st.tokenizer
    # two texts of different lengths: the traced graph takes the padded-batch (masked) path
    sample = tok(["a short text", "a somewhat longer text to trace the padded batch path"], padding=True,
                 return_tensors="pt")
    names = [n for n in _INPUTS if n in sample]

    class Graph(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.st = st

        def forward(self, *tensors):
            return self.st(dict(zip(names, tensors)))["sentence_embedding"]

    axes = {n: {0: "batch", 1: "sequence"} for n in names}
    axes["sentence_embedding"] = {0: "batch"}
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # tracer and exporter deprecation notes
        torch.onnx.export(Graph().eval(), tuple(sample[n] for n in names), str(out / "model.onnx"),
                          input_names=names, output_names=["sentence_embedding"], dynamic_axes=axes,
                          opset_version=OPSET, dynamo=False)
    tok.save_pretrained(str(out / "tokenizer"))
    width = getattr(st, "get_embedding_dimension", None) or st.get_sentence_embedding_dimension
    meta = {"model_path": str(model_path), "inputs": names, "max_seq_length": int(st.max_seq_length),
            "dim": int(width()), "opset": OPSET, "torch": torch.__version__,
            "export_version": EXPORT_VERSION}
    (out / "export.json").write_text(json.dumps(meta, indent=2))


def ensure_export(model_path: Path, model_id: str, quantize: bool = False) -> Path:
    """The export folder of a model, exporting (and quantising) only what is not there yet."""
    require_onnx()
    folder = export_folder(model_path, model_id)
    if not (folder / "export.json").exists():
        folder.parent.mkdir(parents=True, exist_ok=True)
        tmp = folder.parent / f".tmp-{folder.name}-{uuid.uuid4().hex[:8]}"
        tmp.mkdir()
        try:
            _export(Path(model_path), tmp)
            try:
                tmp.rename(folder)
            except OSError:  # another process finished the same export first: keep its files
                if not (folder / "export.json").exists():
                    raise
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    if quantize and not (folder / "model-int8.onnx").exists():
        from onnxruntime.quantization import QuantType, quantize_dynamic

        tmp = folder / f".tmp-model-int8-{uuid.uuid4().hex[:8]}.onnx"
        try:
            level = logging.root.manager.disable
            logging.disable(logging.WARNING)  # quiets its advice to pre-process the graph first
            try:
                quantize_dynamic(str(folder / "model.onnx"), str(tmp), weight_type=QuantType.QInt8, per_channel=True)
            finally:
                logging.disable(level)
            os.replace(tmp, folder / "model-int8.onnx")
        finally:
            tmp.unlink(missing_ok=True)
    return folder


class OnnxSentenceModel:
    """An exported sentence encoder run by ONNX Runtime on the CPU.

    ``threads``: ONNX Runtime intra-op threads (None: its default, one per physical core).
    """

    def __init__(self, folder: Path, quantize: bool = False, threads: int | None = None):
        require_onnx()
        import onnxruntime as ort
        from transformers import AutoTokenizer

        self.folder = Path(folder)
        self.meta = json.loads((self.folder / "export.json").read_text())
        opts = ort.SessionOptions()
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        opts.log_severity_level = 3
        if threads:
            opts.intra_op_num_threads = int(threads)
            opts.inter_op_num_threads = 1
        opts.add_session_config_entry("session.intra_op.allow_spinning", "0")  # no busy-waiting on shared cores
        path = self.folder / ("model-int8.onnx" if quantize else "model.onnx")
        self.session = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
        self.inputs = [i.name for i in self.session.get_inputs()]
        self.tokenizer = AutoTokenizer.from_pretrained(str(self.folder / "tokenizer"))
        self.max_seq_length = int(self.meta["max_seq_length"])
        self.dim = int(self.meta["dim"])

    def tokenize(self, texts: list[str]) -> dict[str, list[list[int]]]:
        """Token ids (and masks) of each text, truncated, not padded."""
        enc = self.tokenizer(list(texts), truncation="longest_first", max_length=self.max_seq_length)
        return {n: enc[n] for n in self.inputs}

    def run(self, tokens: dict[str, list[list[int]]], rows) -> np.ndarray:
        """L2-normalised vectors of the texts ``rows`` of ``tokens``, as one padded batch."""
        lengths = [len(tokens["input_ids"][r]) for r in rows]
        width, left = max(lengths), self.tokenizer.padding_side == "left"
        pad = {"input_ids": self.tokenizer.pad_token_id or 0}
        feed = {}
        for name in self.inputs:
            arr = np.full((len(rows), width), pad.get(name, 0), dtype=np.int64)
            for j, (r, n) in enumerate(zip(rows, lengths)):
                if left:
                    arr[j, width - n:] = tokens[name][r]
                else:
                    arr[j, :n] = tokens[name][r]
            feed[name] = arr
        vec = self.session.run(None, feed)[0].astype(np.float32, copy=False)
        norms = np.linalg.norm(vec, axis=1, keepdims=True)
        return vec / np.maximum(norms, 1e-12)
