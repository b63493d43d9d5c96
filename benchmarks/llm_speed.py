"""Language-model speed and memory: tokens per second for scoring prompts and for LoRA training, on
the CPU (and on a CUDA GPU when there is one), with peak memory; a few minutes on 2 cores.

    python benchmarks/llm_speed.py [--data ../shared/data/movielens-100k] [--prompts 64] [--train-prompts 32]
                                   [--threads 1,2] [--batch-sizes 1,8] [--dtypes float32] [--device auto]
                                   [--out benchmarks/results/llm_speed.json]

The prompts are the language-model task's (``recforge.llm.task``: per-user temporal split, the user's
profile, the 5 most recent earlier training ratings and the target, in SmolLM2-135M-Instruct's chat
template): ``--prompts`` test prompts (``data.test_seed`` 0) are scored by the zero-shot model once per
setting (threads x scoring batch size x dtype, on each device); LoRA (r 8, q/v) is trained for one
epoch on ``--train-prompts`` training targets (batch 8) per thread count and dtype. Tokens count the
prompts' tokens without padding. Every figure is also given as a ratio to the first scoring setting
of its device measured in the same run (the baseline), because machines differ. Peak memory: the
process's resident peak so far on the CPU (it only grows, so a row shows the most any setting up to
it needed), ``torch.cuda.max_memory_allocated`` per setting on a GPU. Each scoring row also gives
the AUC of its scores on these prompts (the pointwise rows score with the prefix cache on, the
default) and the largest difference of P(Yes) from the baseline
setting's, so a faster dtype shows what it costs in the scores. Listwise scoring (``--listwise-targets``
liked test rows, 20 candidates each, as ``eval.listwise=20``) is timed with the prefix cache off and
on (``model.prefix_cache``: each candidate set's shared history runs once), with the largest change
of P(Yes) between the two.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent


def _ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x.strip()]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--data", default="../shared/data/movielens-100k")
    ap.add_argument("--prompts", type=int, default=64)
    ap.add_argument("--train-prompts", type=int, default=32)
    ap.add_argument("--listwise-targets", type=int, default=3, help="listwise targets of 20 candidates each")
    ap.add_argument("--threads", default="1,2", help="CPU intra-op threads to try")
    ap.add_argument("--batch-sizes", default="1,8", help="prompts scored at once")
    ap.add_argument("--dtypes", default="float32", help="e.g. float32,bfloat16")
    ap.add_argument("--device", default="auto", help="cpu, cuda, or auto (the CPU, and cuda when present)")
    ap.add_argument("--out", default=str(HERE / "results" / "llm_speed.json"))
    args = ap.parse_args(argv)
    if not Path(args.data).exists():
        print(f"{args.data}: data not found (the shared datasets live in ../shared/data); nothing run")
        return 2

    import torch

    from recforge.llm import prompts as P
    from recforge.llm import task
    from recforge.llm.backbone import require_llm
    from recforge.evaluation.pointwise import auc
    from recforge.llm.rella import PromptData, ReLLa

    require_llm()
    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else []) if args.device == "auto" else [args.device]
    cfg = task.resolve("rella", args.data, {"data.test_prompts": args.prompts, "data.train_prompts": args.train_prompts,
                                            "model.k": 5, "model.retrieval": "recent", "model.mix": False,
                                            "llm.max_tokens": 320})
    ds, split, test, _ = task.prepare(cfg)
    fmt = P.PromptFormat(cfg["llm"]["template"], cfg["llm"]["item_line"], cfg["llm"]["target_line"])
    targets, _ = task.train_sample(cfg, split)
    cands = task.listwise_candidates({**cfg, "eval": {**cfg["eval"], "listwise": 20,
                                                      "listwise_targets": args.listwise_targets}}, split, test)
    rows = []
    zero_shot = PromptData(split, fmt, None, None)

    def peak(device: str) -> float:
        if device.startswith("cuda"):
            return round(torch.cuda.max_memory_allocated() / 2**20, 1)
        return task.peak_memory_mb()

    def model(device: str, dtype: str, threads: int, **kw) -> ReLLa:
        params = task.llm_params(cfg, False)
        params.update(device=device, dtype=dtype, threads=threads, **kw)
        return ReLLa(**params)

    def record(device, dtype, threads, what, batch, prompts, stats, **extra):
        rows.append({"device": device, "dtype": dtype, "threads": threads, "what": what, "batch": batch,
                     "prompts": prompts, "tokens": stats["tokens"], "seconds": stats["seconds"],
                     "tokens_per_second": stats["tokens_per_second"],
                     "ratio_to_baseline": round(stats["tokens_per_second"] / base, 2), "peak_mb": peak(device), **extra})
        print(json.dumps(rows[-1]), flush=True)

    y = test["label"].to_numpy().astype(np.float64)
    for device in devices:
        base, p_base = None, None
        for dtype in args.dtypes.split(","):
            for threads in (_ints(args.threads) if device == "cpu" else [None]):
                if threads is not None:
                    torch.set_num_threads(threads)
                est = model(device, dtype, threads).fit(zero_shot)  # zero-shot: loads the backbone
                for bs in _ints(args.batch_sizes):
                    est.score_batch_size = bs
                    if device.startswith("cuda"):
                        torch.cuda.reset_peak_memory_stats()
                    _, p = est.predict(zero_shot, test)
                    p = np.asarray(p, dtype=np.float64)
                    base = base or est.last_scoring_["tokens_per_second"]
                    p_base = p if p_base is None else p_base
                    record(device, dtype, threads, "scoring", bs, len(p), est.last_scoring_,
                           max_abs_p_diff_to_baseline=float(np.abs(p - p_base).max()), auc=float(auc(y, p)))
                p_cands = None
                for cache in (False, True):  # one listwise candidate set per target: shared prefixes
                    est.prefix_cache, est.score_batch_size = cache, 8
                    _, pc = est.predict(zero_shot, cands)
                    p_cands = pc if p_cands is None else p_cands
                    record(device, dtype, threads, f"listwise scoring, prefix cache {'on' if cache else 'off'}", 8,
                           len(pc), est.last_scoring_, tokens_computed=est.last_scoring_["prefix_cache"]["tokens_computed"],
                           max_abs_p_diff_to_cache_off=float(np.abs(np.asarray(pc) - p_cands).max()))
                est.prefix_cache = True
                del est
                if device.startswith("cuda"):
                    torch.cuda.reset_peak_memory_stats()
                tuned = model(device, dtype, threads, epochs=1, batch_size=8, lr=1e-3)
                tuned.fit(PromptData(split, fmt, None, targets))
                record(device, dtype, threads, "LoRA training", 8, targets.height, tuned.history_["training"])
                del tuned
    res = {"date": time.strftime("%Y-%m-%d"), "machine": f"{platform.machine()}, PyTorch {torch.__version__}"
           + (f", {torch.cuda.get_device_name(0)}" if "cuda" in devices else ""),
           "backbone": "SmolLM2-135M-Instruct (packaged GGUF, dequantised)" if not cfg["llm"].get("path")
           else cfg["llm"]["path"], "data": Path(args.data).name, "settings": {k: v for k, v in vars(args).items() if k not in ("data", "out")},
           "rows": rows}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(res, indent=1))
    lines = ["| device | dtype | threads | what | batch | prompts | tokens/s | × baseline | peak MB | AUC | max abs P(Yes) diff |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        extra = (f"{r['auc']:.4f} | {r['max_abs_p_diff_to_baseline']:.2g}" if "auc" in r else
                 f"– | {r['max_abs_p_diff_to_cache_off']:.2g} (to cache off)" if "tokens_computed" in r else "– | –")
        lines.append(f"| {r['device']} | {r['dtype']} | {r['threads'] or '–'} | {r['what']} | {r['batch']} | "
                     f"{r['prompts']} | {r['tokens_per_second']:.0f} | {r['ratio_to_baseline']:.2f} | {r['peak_mb']:.0f} | "
                     f"{extra} |")
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
