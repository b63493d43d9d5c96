"""Item-text encoding speed of the packaged all-MiniLM-L6-v2 on this machine.

    python benchmarks/semantic_encode.py [--data PATH] [--n 1024] [--threads 2] [--batch-size 16] [--no-onnx]

Encodes ``n`` distinct item texts of a catalogue (default MovieLens latest-small: titles, genres
and tags through the default template) with the float model and with int8 dynamic quantisation,
on PyTorch and, when onnxruntime is installed (the ``text`` extra), on the ONNX Runtime backend
(float and int8; the one-off export into ``$RECFORGE_CACHE/onnx`` is timed apart, as
``onnx_prepare_seconds``, and is near zero once cached). Each encoder's vectors are compared with
the PyTorch float32 ones (mean cosine). It reports items per second of wall time and per
CPU-second (the latter is what the encoder gets from the cores it is actually given: on a shared
machine the wall-clock figure depends on the other jobs; see ``load_average``). It also times a
second pass through the vector cache, which must encode nothing. Writes
``benchmarks/results/semantic_encode.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent


def _time(encoder, texts) -> dict:
    encoder.encode(texts[:64], progress=False)  # warm-up: kernels, allocator
    w, c = time.perf_counter(), time.process_time()
    vecs = encoder.encode(texts, progress=False)
    wall, cpu = time.perf_counter() - w, time.process_time() - c
    return {"items": len(texts), "wall_seconds": round(wall, 2), "cpu_seconds": round(cpu, 2),
            "items_per_second": round(len(texts) / wall, 1), "items_per_cpu_second": round(len(texts) / cpu, 1),
            "_vecs": vecs}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", default="../shared/data/movielens-latest-small")
    ap.add_argument("--n", type=int, default=1024)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--no-onnx", action="store_true", help="skip the ONNX Runtime backend")
    ap.add_argument("--out", default=str(HERE / "results" / "semantic_encode.json"))
    args = ap.parse_args(argv)

    import torch

    from recforge.config import DATA_DEFAULTS
    from recforge.pipeline import load_dataset
    from recforge.semantic.encoder import TextEncoder
    from recforge.semantic.store import VectorCache
    from recforge.semantic.text import item_texts

    torch.set_num_threads(args.threads)
    texts = list(dict.fromkeys(t for t in item_texts(load_dataset(dict(DATA_DEFAULTS, path=args.data))) if t))
    texts = texts[: args.n]
    tokens = None
    res = {"data": args.data, "n_texts": len(texts), "mean_chars": round(float(np.mean([len(t) for t in texts])), 1),
           "threads": args.threads, "batch_size": args.batch_size, "cpus": os.cpu_count(),
           "load_average_before": [round(x, 2) for x in os.getloadavg()]}
    t = time.perf_counter()
    fp32 = TextEncoder(batch_size=args.batch_size, progress=False)
    fp32.model
    res["load_seconds"] = round(time.perf_counter() - t, 2)
    tok = fp32.model.tokenizer(texts, truncation=True, max_length=fp32.model.max_seq_length)["input_ids"]
    tokens = float(np.mean([len(x) for x in tok]))
    res["mean_tokens"] = round(tokens, 1)
    # padding: tokens run (each batch padded to its longest text) over real tokens, with the
    # texts ordered by characters (the previous order) and by tokens (the encoders' order)
    lengths = np.array([len(x) for x in tok])
    for key, order in (("padding_by_chars", np.argsort([-len(t) for t in texts], kind="stable")),
                       ("padding_by_tokens", np.argsort(-lengths, kind="stable"))):
        runs = [lengths[order[s : s + args.batch_size]] for s in range(0, len(texts), args.batch_size)]
        res[key] = round(float(sum(r.max() * len(r) for r in runs) / lengths.sum()), 3)
    res["float32"] = _time(fp32, texts)
    int8 = TextEncoder(batch_size=args.batch_size, progress=False, quantize=True)
    res["int8"] = _time(int8, texts)
    a, b = res["float32"].pop("_vecs"), res["int8"].pop("_vecs")
    res["int8"]["mean_cosine_to_float32"] = round(float((a * b).sum(1).mean()), 4)
    if not args.no_onnx:
        from recforge.errors import ConfigError

        for key, quantize in (("onnx_float32", False), ("onnx_int8", True)):
            try:
                enc = TextEncoder(batch_size=args.batch_size, progress=False, quantize=quantize, backend="onnx",
                                  threads=args.threads)
            except ConfigError as exc:  # onnxruntime / onnx not installed
                res[key] = {"skipped": str(exc)}
                continue
            t = time.perf_counter()
            enc.onnx_model  # export (first run only) and load
            prepare = round(time.perf_counter() - t, 2)
            res[key] = _time(enc, texts)
            res[key]["onnx_prepare_seconds"] = prepare
            v = res[key].pop("_vecs")
            res[key]["mean_cosine_to_float32"] = round(float((a * v).sum(1).mean()), 4)
            res[key]["min_cosine_to_float32"] = round(float((a * v).sum(1).min()), 4)
    with tempfile.TemporaryDirectory() as tmp:
        cache = VectorCache(tmp)
        enc = TextEncoder(batch_size=args.batch_size, progress=False)
        enc._model = fp32.model
        cache.vectors(texts, enc, progress=False)
        t = time.perf_counter()
        _, stats = cache.vectors(texts, enc, progress=False)
        res["cache_hit"] = {"seconds": round(time.perf_counter() - t, 3), "encoded": stats["encoded"],
                            "items_per_second": round(len(texts) / max(time.perf_counter() - t, 1e-9))}
    res["load_average_after"] = [round(x, 2) for x in os.getloadavg()]
    Path(args.out).write_text(json.dumps(res, indent=2))
    print(json.dumps(res, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
