"""The ``recforge`` command.

    recforge train MODEL --data PATH_OR_NAME [key=value ...]
    recforge evaluate RUN [--sampled N] [--ks 5,10,20]
    recforge recommend RUN --user RAW_ID [-k 10]      |  --history ITEM [ITEM ...]
    recforge compare RUN_A RUN_B
    recforge bench --models pop,ease --data synthetic --seeds 0,1,2 [key=value ...]
    recforge data prepare INPUT --out DIR [options]   |  recforge data describe INPUT
    recforge train --resume RUN [key=value ...]      |  recforge train --config best.yaml
    recforge train MODEL --data D --nproc 2 [--device cuda] [--precision bf16]
    recforge tune MODEL --data D --trials 30 [key=value ...]
    recforge predict RUN --out topk.parquet [-k 10] [--users FILE] [--nproc N]
    recforge models                                    |  recforge demo
    recforge export RUN --out DIR                      |  recforge serve DIR [--host 127.0.0.1 --port 8000]
    recforge embed DATA [--template T] [--encoder PATH] [--out FILE]  |  --marc [--dim 64] [--llm PATH]

Bad input prints one line naming the problem and the fix, and exits with status 2.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path

from recforge.errors import RecForgeError

DATA_FLAGS = [
    ("--format", "format", "force a reader: table, ml-100k, ml-1m, ml-latest, sequence, recbole, userbehavior, "
                           "lightgcn, split-tables"),
    ("--user-col", "user_col", "column holding user ids (tables)"),
    ("--item-col", "item_col", "column holding item ids (tables)"),
    ("--time-col", "time_col", "column holding timestamps; 'none' when the file has no time (row order is used)"),
    ("--rating-col", "rating_col", "column holding ratings"),
    ("--behavior-col", "behavior_col", "column holding behaviour types"),
    ("--items", "items", "item table file joined on the item id (titles, tags, ...)"),
    ("--item-key", "item_key", "item id column of the --items file"),
    ("--sep", "sep", "field separator of a text table"),
    ("--time-format", "time_format", "strptime format of text timestamps"),
    ("--min-user", "min_user", "k-core: minimum interactions per user"),
    ("--min-item", "min_item", "k-core: minimum interactions per item"),
    ("--rating-threshold", "rating_threshold", "keep ratings >= this value (implicit feedback)"),
    ("--dedupe", "dedupe", "first | last | none: repeated (user, item) pairs"),
    ("--behaviors", "behaviors", "comma-separated behaviours to keep (e.g. buy,cart)"),
]


def _add_data_flags(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("data options")
    for flag, dest, help_ in DATA_FLAGS:
        g.add_argument(flag, dest=f"d_{dest}", default=None, help=help_)
    g.add_argument("--no-cache", dest="d_no_cache", action="store_true", help="do not read or write the preparation cache")


def _data_overrides(args) -> list[str]:
    out = [f"data.{dest}={getattr(args, f'd_{dest}')}" for _, dest, _ in DATA_FLAGS
           if getattr(args, f"d_{dest}", None) is not None]
    if getattr(args, "d_no_cache", False):
        out.append("data.cache=false")
    return out


def _data_cfg(args, path) -> dict:
    from recforge.config import DATA_DEFAULTS, parse_value

    cfg = dict(DATA_DEFAULTS, path=str(path))
    for o in _data_overrides(args):
        k, v = o.split("=", 1)
        cfg[k.split(".", 1)[1]] = parse_value(v)
    return cfg


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="recforge", description="Recommender systems from raw logs to evaluated models.")
    p.add_argument("-v", "--verbose", action="store_true", help="log more")
    sub = p.add_subparsers(dest="cmd", required=True)
    from recforge.tuning import add_parser as add_tune_parser

    t = sub.add_parser("train", help="train and evaluate a model; prints the run folder last")
    t.add_argument("model", nargs="?", help="a model name (recforge models); optional with --config or --resume")
    t.add_argument("--data", help="a file, a dataset folder, or a name (synthetic, ml-100k, ...)")
    t.add_argument("overrides", nargs="*", help="key=value (model.hidden=64, split.method=temporal, seed=1)")
    t.add_argument("--out", default="runs", help="folder for run folders (default: runs)")
    t.add_argument("--quiet", action="store_true", help="no progress bars")
    t.add_argument("--config", help="a resolved config YAML (a run's config.yaml, or best.yaml of recforge tune)")
    t.add_argument("--resume", metavar="RUN", help="continue the training of RUN from its last checkpoint "
                   "(a run folder, or the .partial-* folder a killed run left)")
    t.add_argument("--device", help="auto | cpu | cuda | cuda:N | mps (PyTorch models; default auto)")
    t.add_argument("--precision", help="fp32 | bf16 | fp16 mixed precision (PyTorch models; default fp32)")
    t.add_argument("--nproc", type=int, default=1, help="data-parallel training in N processes (torch.distributed: "
                   "gloo on CPUs, nccl on GPUs); the global batch stays batch_size")
    _add_data_flags(t)

    e = sub.add_parser("evaluate", help="re-evaluate a run on its test split")
    e.add_argument("run")
    e.add_argument("--sampled", default=None, help="sampled-negative ranking: N or N:popularity (default: full ranking)")
    e.add_argument("--ks", default=None, help="cut-offs, e.g. 5,10,20")
    e.add_argument("--exclude", default=None, choices=["auto", "history", "none", "target_behavior"],
                   help="items removed from each ranking (default: the run's setting)")
    e.add_argument("--ties", default=None, choices=["pessimistic", "expected", "optimistic", "index"],
                   help="how items scored like the target count (default: the run's setting)")
    e.add_argument("--head-items", default=None, help="head/tail rule: share:0.8, top:0.2 or count:20")
    e.add_argument("--device", default=None, help="where a PyTorch model scores: auto | cpu | cuda | cuda:N | mps "
                   "(default: the device it was trained with; cpu for a GPU-trained run on a machine without one)")
    e.add_argument("--json", action="store_true")

    r = sub.add_parser("recommend", help="top-k items for a user (raw ids in, raw ids out)")
    r.add_argument("run")
    r.add_argument("--user", default=None)
    r.add_argument("--history", nargs="+", default=None, help="raw item ids, oldest first (for a new user)")
    r.add_argument("-k", type=int, default=10)
    r.add_argument("--device", default=None, help="where a PyTorch model scores: auto | cpu | cuda | cuda:N | mps "
                   "(default: the device it was trained with)")
    r.add_argument("--json", action="store_true")

    c = sub.add_parser("compare", help="paired t-test and Wilcoxon test between two runs")
    c.add_argument("run_a", help="a run folder, or comma-separated run folders (seeds) averaged per user")
    c.add_argument("run_b", help="the same for the other model")
    c.add_argument("--metrics", default=None, help="comma-separated, default hr@10,ndcg@10,hr@20,ndcg@20,mrr")
    c.add_argument("--json", action="store_true")

    b = sub.add_parser("bench", help="models x datasets x seeds, then a leaderboard")
    b.add_argument("--models", required=True, help="comma-separated model names")
    b.add_argument("--data", required=True, help="comma-separated data paths or names")
    b.add_argument("--seeds", default="0,1,2")
    b.add_argument("overrides", nargs="*")
    b.add_argument("--out", default="runs")
    b.add_argument("--groups", choices=["item", "hist", "all", "none"], default="item",
                   help="group columns of the table: tail/head items (default), history-length bins, both or none")

    d = sub.add_parser("data", help="prepare or describe data")
    dsub = d.add_subparsers(dest="data_cmd", required=True)
    dp = dsub.add_parser("prepare", help="read, clean, k-core and encode; write Parquet")
    dp.add_argument("input")
    dp.add_argument("--out", required=True)
    _add_data_flags(dp)
    dd = dsub.add_parser("describe", help="statistics of a dataset")
    dd.add_argument("input")
    dd.add_argument("--json", action="store_true")
    dd.add_argument("--template", default=None,
                    help="item text template shown in the preview (default: the text models' default template)")
    _add_data_flags(dd)

    ex = sub.add_parser("export", help="write a checksummed serving artifact of a run")
    ex.add_argument("run")
    ex.add_argument("--out", required=True, help="folder to create (must not exist or be empty)")
    sv = sub.add_parser("serve", help="serve an exported artifact over HTTP (needs the 'serve' extra)")
    sv.add_argument("artifact")
    sv.add_argument("--host", default="127.0.0.1")
    sv.add_argument("--port", type=int, default=8000)
    sv.add_argument("--events", default="events.sqlite", help="SQLite file of the event log (default: events.sqlite)")
    sv.add_argument("--threads", type=int, default=1, help="compute threads of PyTorch, BLAS and FAISS (default: 1)")
    sv.add_argument("--ann-threshold", type=int, default=100_000,
                    help="use the FAISS index above this many items (default: 100000)")
    sv.add_argument("--device", help="auto | cpu | cuda | cuda:N | mps for PyTorch models (default: the device of "
                    "training; cpu serves a GPU-trained model on a machine without one)")
    sv.add_argument("--workers", type=int, default=1,
                    help="worker processes over the one artifact and event log (default: 1; about one per core)")

    em = sub.add_parser("embed", help="write the semantic item table of a dataset (needs the 'text' extra)")
    em.add_argument("input", help="a file, a dataset folder, or a name")
    em.add_argument("--template", default=None, help="item text template, e.g. '{title}. Genres: {genres}'")
    em.add_argument("--encoder", default=None, help="local sentence-transformers model folder (default: packaged MiniLM)")
    em.add_argument("--out", default=None, help="Parquet file to write (default: <data>.semantic.parquet)")
    em.add_argument("--batch-size", type=int, default=16, help="texts per encoder call (16 is fastest on CPUs)")
    em.add_argument("--quantize", action="store_true", help="int8 weights for the encoder (faster, vectors differ slightly)")
    em.add_argument("--backend", choices=["torch", "onnx"], default="torch",
                    help="run the encoder on PyTorch or on ONNX Runtime (exported once, cached; fastest with --quantize)")
    mg = em.add_argument_group("MARC (compressed language-model vectors, recforge/semantic/marc.py; needs the 'llm' extra)")
    mg.add_argument("--marc", action="store_true", help="compress the language model's layer states of the item texts "
                    "with MARC, trained on the training part of the data's split (--split)")
    mg.add_argument("--llm", default=None, help="causal language model folder or .gguf (default: packaged SmolLM2-135M)")
    mg.add_argument("--dim", type=int, default=64, help="size of the compressed vectors (default: 64)")
    mg.add_argument("--layers", default="auto", help="layers read: auto (1/6..6/6 of the depth), all, mid, final or 5,10,15")
    mg.add_argument("--split", default="auto", help="split whose training part MARC learns from: the one the sequential "
                    "model will be evaluated on (default: auto, the data's default, leave-one-out)")
    mg.add_argument("--epochs", type=int, default=30, help="most epochs of MARC's training (early stopping; default: 30)")
    mg.add_argument("--seed", type=int, default=0)
    em.add_argument("--json", action="store_true")
    _add_data_flags(em)

    pl_ = sub.add_parser("plot", help="PNG of a run's training curve and per-group metrics (needs matplotlib)")
    pl_.add_argument("run")
    pl_.add_argument("--out", default=None, help="PNG file (default: RUN/plot.png)")

    pr = sub.add_parser("predict", help="top-k of every user of a run (or of a list) to a Parquet file")
    pr.add_argument("run")
    pr.add_argument("--out", required=True, help="the Parquet file to write (user_id, rank, item_id, score)")
    pr.add_argument("-k", type=int, default=10)
    pr.add_argument("--users", help="only these users: a text file with one raw id per line, or CSV/Parquet "
                    "with a user_id column")
    pr.add_argument("--device", help="auto | cpu | cuda | cuda:N | mps (default: the device of training)")
    pr.add_argument("--nproc", type=int, default=1, help="score the users in N processes (shards)")
    pr.add_argument("--batch-size", type=int, default=1024)
    pr.add_argument("--quiet", action="store_true", help="no progress bar")
    pr.add_argument("--input", help="CTR runs: feature rows to score (CSV, Parquet or libSVM; default: the run's "
                    "test rows); writes one probability per label")

    add_tune_parser(sub)

    sub.add_parser("models", help="list the models")
    dm = sub.add_parser("demo", help="train the baselines on the built-in synthetic data and print a leaderboard")
    dm.add_argument("--out", default="runs")
    dm.add_argument("--seeds", default="0")
    return p


def _ints(text: str) -> list[int]:
    try:
        return [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise RecForgeError(f"{text!r}: expected comma-separated integers like 0,1,2") from None


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    args.argv = argv
    # key=value overrides may stand anywhere after the verb, before or after the flags
    if args.cmd in ("train", "bench", "tune"):
        args.overrides = list(args.overrides) + [x for x in extra if "=" in x and not x.startswith("-")]
        extra = [x for x in extra if not ("=" in x and not x.startswith("-"))]
    if extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    console = logging.StreamHandler()
    console.setLevel(logging.INFO if args.verbose else logging.WARNING)
    console.setFormatter(logging.Formatter("%(levelname)s %(message)s"))
    logging.getLogger().addHandler(console)
    try:
        return _dispatch(args) or 0
    except RecForgeError as exc:
        print(f"recforge: error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print("recforge: interrupted", file=sys.stderr)
        return 130
    finally:
        if "recforge.training.distributed" in sys.modules:  # leave a process group cleanly
            sys.modules["recforge.training.distributed"].shutdown()


def _dispatch(args) -> int | None:
    import recforge.api as api

    if args.cmd == "train":
        run = _train(args)
        if run is not None and run.path is not None:  # None: other processes of a data-parallel run
            _print_metrics(run.metrics)
            print(run.path)
    elif args.cmd == "evaluate":
        res = api.evaluate(args.run, sampled=args.sampled, ks=_ints(args.ks) if args.ks else None,
                           exclude=args.exclude, ties=args.ties, head_items=args.head_items, device=args.device)
        print(json.dumps(res, indent=2) if args.json else _metrics_table(res["test"], res["protocol"]))
    elif args.cmd == "recommend":
        recs = api.recommend(args.run, user=args.user, history=args.history, k=args.k, device=args.device)
        if args.json:
            print(json.dumps(recs))
        else:
            for i, r in enumerate(recs, 1):
                print(f"{i:>3}  {r['item_id']}  {r['score']:.4f}")
    elif args.cmd == "compare":
        res = api.compare(args.run_a.split(","), args.run_b.split(","), args.metrics.split(",") if args.metrics else None)
        print(json.dumps(res, indent=2) if args.json else _compare_table(res))
    elif args.cmd == "bench":
        board = api.bench(args.models.split(","), args.data.split(","), _ints(args.seeds), args.overrides,
                          out=args.out, progress=_progress_line, groups=args.groups)
        from recforge.reports.leaderboard import format_leaderboard

        print(format_leaderboard(board, args.groups))
        print(board["folder"])
    elif args.cmd == "data":
        _data_cmd(args)
    elif args.cmd == "embed" and args.marc:
        from recforge.errors import ConfigError
        from recforge.semantic.marc import marc_embed

        if args.encoder or args.quantize or args.backend != "torch":
            raise ConfigError("--marc reads a language model (--llm PATH), not a sentence encoder: drop --encoder, "
                              "--quantize and --backend")
        res = marc_embed(_data_cfg(args, args.input), out=args.out, split_cfg={"method": args.split},
                         template=args.template, backbone=args.llm, layers=args.layers, progress=not args.json,
                         dim=args.dim, epochs=args.epochs, seed=args.seed)
        print(json.dumps(res, indent=2) if args.json else
              f"{res['items']} items, {res['dim']}-d MARC vectors (layers {res['layers']}, weights "
              f"{res['layer_weights']}; {res['language_model_texts']} texts read by the language model) in "
              f"{res['seconds']} s -> {res['out']}")
    elif args.cmd == "embed":
        from recforge.semantic.store import embed

        res = embed(_data_cfg(args, args.input), out=args.out, template=args.template, encoder=args.encoder,
                    batch_size=args.batch_size, quantize=args.quantize, backend=args.backend)
        print(json.dumps(res, indent=2) if args.json else
              f"{res['items']} items ({res['encoded']} encoded, {res['cached']} from cache, {res['empty']} without text)"
              f" in {res['seconds']} s -> {res['out']}")
    elif args.cmd == "plot":
        from recforge.reports.plots import plot_run
        from recforge.runs import Run

        print(plot_run(Run.load(args.run).path, args.out))
    elif args.cmd == "predict":
        from recforge import ctr
        from recforge.runs import Run

        if ctr.is_ctr_run(Run.load(args.run)):  # CTR: click probabilities of feature rows
            res = ctr.predict(args.run, args.out, rows=args.input, device=args.device)
            unseen = "; ".join(f"{k} {v['count']}" for k, v in res["unseen"].items())
            print(f"{res['rows']} rows scored in {res['seconds']} s -> {res['out']}"
                  + (f" (values unseen in training, scored as out-of-vocabulary: {unseen})" if unseen else ""))
            return 0
        if args.nproc != 1:
            return _relaunch(args)
        from recforge.predict import predict, read_user_file

        res = predict(args.run, args.out, k=args.k, users=read_user_file(args.users) if args.users else None,
                      device=args.device, batch_size=args.batch_size, verbose=not args.quiet)
        from recforge.training.distributed import is_main

        if is_main():
            print(f"{res['users']} users x top-{res['k']} in {res['seconds']} s ({res['processes']} process(es)) "
                  f"-> {res['out']}")
    elif args.cmd == "tune":
        from recforge.tuning import run_from_args

        return run_from_args(args)
    elif args.cmd == "models":
        from recforge.models import registry

        from recforge.llm.task import LLM_MODELS

        for name in registry.available():
            print(name)
        for name in LLM_MODELS:  # language models (the llm extra): recforge train rella --data movielens-100k
            print(name)
    elif args.cmd == "demo":
        return _demo(args)
    elif args.cmd == "export":
        from recforge.runs import Run
        from recforge.serving.artifact import export_artifact

        if Run.load(args.run).metrics.get("task") == "llm":
            raise RecForgeError(f"{args.run}: a language-model run has no serving artifact yet; its test predictions "
                                "are in predictions_test.parquet")
        print(export_artifact(args.run, args.out))
    elif args.cmd == "serve":
        from recforge.serving.app import run_server

        if args.device:
            from recforge.training.device import resolve_device

            resolve_device(args.device)  # an absent device stops here, with the fix
            os.environ["RECFORGE_DEVICE"] = args.device

        run_server(args.artifact, host=args.host, port=args.port, events_path=args.events, threads=args.threads,
                   ann_threshold=args.ann_threshold, workers=args.workers)
    return 0


def _relaunch(args):
    """Run this same command in ``args.nproc`` processes (torch.distributed); None when done."""
    from recforge.training.distributed import launch

    argv = list(sys.argv[1:] if args.argv is None else args.argv)
    drop = {i for i, a in enumerate(argv) if a == "--nproc" or a.startswith("--nproc=")}
    drop |= {i + 1 for i in drop if argv[i] == "--nproc"}
    code = launch(args.nproc, [a for i, a in enumerate(argv) if i not in drop])
    if code:
        raise RecForgeError(f"{args.cmd} failed in one of its {args.nproc} processes (exit status {code}); "
                            "its error is printed above")
    return None


def _train(args):
    import yaml

    import recforge.api as api

    if args.nproc != 1:
        return _relaunch(args)
    overrides = _data_overrides(args) + list(args.overrides)
    if args.model and "=" in args.model:  # `recforge train --config F key=value`: no model name
        overrides.insert(0, args.model)
        args.model = None
    for flag in ("device", "precision"):
        if getattr(args, flag):
            overrides.append(f"model.{flag}={getattr(args, flag)}")
    config = None
    if args.config:
        path = Path(args.config)
        if not path.is_file():
            raise RecForgeError(f"--config {path}: no such file; give a config YAML (a run's config.yaml or best.yaml)")
        config = yaml.safe_load(path.read_text())
        if not isinstance(config, dict) or not isinstance(config.get("model"), dict) or "name" not in config["model"]:
            raise RecForgeError(f"--config {path}: not a recforge config (needs a model section with a name)")
    if not (args.model or config or args.resume):
        raise RecForgeError("train needs a model name, --config FILE or --resume RUN")
    if args.data is None and config is None and not args.resume:
        raise RecForgeError("train needs --data PATH_OR_NAME (or --config FILE / --resume RUN)")
    return api.train(args.model, args.data, overrides, out=args.out, verbose=not args.quiet, config=config,
                     resume=args.resume)


def _progress_line(model, data, seed, run) -> None:
    t = run.metrics["test"]
    print(f"  {data:<12} {model:<10} seed {seed}: ndcg@10 {t['ndcg@10']:.4f}  hr@10 {t['hr@10']:.4f}"
          f"  ({run.metrics['timing']['fit_seconds']:.1f} s fit)", file=sys.stderr, flush=True)


def _demo(args) -> int:
    import recforge.api as api
    from recforge.models import registry
    from recforge.reports.leaderboard import format_leaderboard

    models = [m for m in ("pop", "itemknn", "ease", "bpr", "sasrec") if m in registry.available()]
    print(f"RecForge demo: {', '.join(models)} on the built-in synthetic dataset "
          "(leave-one-out, full ranking over all items)", file=sys.stderr)
    # short training budgets keep the demo within a few minutes on 2 cores; `recforge train` uses the full defaults
    budget = {"bpr": ["epochs=30"], "sasrec": ["epochs=15", "patience=3"]}
    print("  (demo budgets: " + "; ".join(f"{m} {' '.join(v)}" for m, v in budget.items() if m in models) + ")",
          file=sys.stderr)
    board = api.bench(models, ["synthetic"], _ints(args.seeds), out=args.out, progress=_progress_line,
                      model_overrides=budget)
    print(format_leaderboard(board))
    print(board["folder"])
    return 0


def _data_cmd(args) -> None:
    from recforge.pipeline import load_dataset

    cfg = _data_cfg(args, args.input)
    if args.data_cmd == "prepare":
        out = Path(args.out)
        if out.exists() and any(out.iterdir()):
            raise RecForgeError(f"{out}: folder exists and is not empty; choose another --out or remove it")
        ds = load_dataset(cfg)
        import shutil
        import tempfile

        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=".tmp-", dir=out.parent))
        try:
            ds.save(tmp)
            if out.exists():
                out.rmdir()
            tmp.rename(out)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        s = ds.summary()
        print(f"{s['users']} users, {s['items']} items, {s['interactions']} interactions -> {out}")
    else:
        from recforge.data.describe import describe, format_description

        d = describe(load_dataset(cfg), template=args.template)
        print(json.dumps(d, indent=2, default=str) if args.json else format_description(d))


def _metrics_table(m: dict, protocol: dict) -> str:
    if protocol.get("task") == "llm":
        from recforge.ctr import format_metrics

        sample = protocol.get("test_sample", {}).get("prompts", "?")
        return format_metrics(m, protocol).replace("test (CTR,", f"test (language model, pointwise on {sample} "
                                                   "sampled prompts,", 1)
    if protocol.get("task") == "ctr":
        from recforge.ctr import format_metrics

        return format_metrics(m, protocol)
    keys = [k for k in ("hr@5", "ndcg@5", "hr@10", "ndcg@10", "hr@20", "ndcg@20", "recall@10", "precision@10",
                        "map@10", "mrr", "coverage@10", "n_users") if k in m]
    label = protocol.get("label", "full ranking")
    if protocol.get("target_behavior"):
        label += f"; target behaviour {protocol['target_behavior']}"
    lines = [f"test ({label}):"] + [f"  {k:<13} {m[k]:.4f}" if isinstance(m[k], float) else f"  {k:<13} {m[k]}" for k in keys]
    return "\n".join(lines)


def _print_metrics(metrics: dict) -> None:
    print(_metrics_table(metrics["test"], metrics["protocol"]))
    if metrics.get("test_listwise"):  # a language-model run's sampled listwise ranking, labelled as such
        from recforge.llm.task import format_listwise

        print(format_listwise(metrics))
    for g, vals in metrics.get("groups", {}).items():
        print(f"  {g:<13} ndcg@10 {vals.get('ndcg@10', float('nan')):.4f}  hr@10 {vals.get('hr@10', float('nan')):.4f}"
              f"  (users {vals.get('n_users')})")


def _compare_table(res: dict) -> str:
    if res.get("task") == "ctr":
        from recforge.ctr import format_compare

        return format_compare(res)
    n_a, n_b = res.get("n_runs", [1, 1])
    seeds = f" (per-user means over {n_a} and {n_b} runs)" if max(n_a, n_b) > 1 else ""
    lines = [f"A: {res['a']}", f"B: {res['b']}{seeds}", *[f"warning: {w}" for w in res["warnings"]],
             f"{'metric':<10} {'A':>8} {'B':>8} {'diff':>9} {'rel':>8} {'t-test p':>10} {'wilcoxon p':>11}  users"]
    for r in res["rows"]:
        lines.append(f"{r['metric']:<10} {r['a']:>8.4f} {r['b']:>8.4f} {r['diff']:>+9.4f} {r['rel']:>+8.1%} "
                     f"{r['t_test_p']:>10.2e} {r['wilcoxon_p']:>11.2e}  {r['n_users']}")
    return "\n".join(lines)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
