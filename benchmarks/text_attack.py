"""The stealthy text attack (Zhang et al., ACL 2024) as a robustness check on MovieLens-100K: how far
small title edits move long-tail items up the zero-shot language-model ranker and a trained
LLM-ESR, what they do to overall quality, and what the text purifier (the defence) undoes, at
what cost.

    python benchmarks/text_attack.py [--targets 20] [--seed 0] [--edits char] [--max-words 2]
        [--candidates 8] [--max-queries 60] [--only llmesr,llm] [--threads 2]
        [--llmesr-epochs 30] [--anchor-share 0.4] [--k 10] [--adaptive]
        [--llm-contexts 20] [--llm-candidates 10] [--llm-anchors 8] [--llm-k 3] [--llm-history 5]
        [--out benchmarks/results/text_attack.json]

**Targets**: ``--targets`` items drawn with ``--seed`` from the long tail of the whole data (not
among the most popular items holding 80% of the ratings, at least ``--min-pop`` ratings, with a
title); their ids, titles and rating counts are recorded. Each target's owner edits only that
title (``recforge.robustness.StealthyTextAttack``: ``--edits`` kinds, at most ``--max-words`` words,
``--candidates`` variants per word and kind, ``--max-queries`` scored titles per target, the
authors' word-importance order; the all-MiniLM-L6-v2 similarity of the edited title to the
original is recorded, and enforced with ``--min-similarity``).

**(b) LLM-ESR** (dual-view, SASRec backbone, the project defaults; ``--llmesr-epochs`` at most,
early stopping on validation NDCG@10): leave-one-out split, full ranking of every item, history
excluded. For each target, the users evaluated are the test users without the target in their
history; ``--anchor-share`` of them (the authors' 40%, drawn with the seed) are the anchor users
the attack queries (the black-box attacker's view: the target's rank among every item,
``--k`` for exposure). The edited title changes the target's text vector (the item text with the
title replaced, re-encoded by the model's encoder) and nothing else. Recorded per target over all
evaluated users: rank before, after the attack and after the defence (the purifier on the edited
title), exposure@k. Overall quality: test NDCG@10 / HR@10 (all users, and the tail-item group)
with the clean titles, with every target's edited title at once, and with the defence.
``--adaptive``: also attack the defended model (the attacker queries through the purifier).

**(a) the zero-shot language-model ranker** (``recforge.llm``: SmolLM2-135M-Instruct, P(Yes) of a
prompt with the user's profile and ``--llm-history`` most recent training ratings; no tuning):
the task's sampled listwise protocol, ``--llm-contexts`` liked test rows (test seed 0), each with
``--llm-candidates`` candidates (the liked item and negatives the user never rated). For each
target, the contexts whose user never rated it; the target is scored as one more candidate of
each and ranked among the context's candidates (pessimistic ties). ``--llm-anchors`` contexts are
the attacker's anchors; ranks are reported over all the target's contexts. The edited title
changes every prompt it appears in. Overall quality: HR@10 / NDCG@10 / AUC of the liked items over
the candidate sets enlarged by every target (the attacked items compete with the liked ones),
with the clean titles, the edited ones and the defended ones. SAMPLED LISTWISE: not a ranking of
the catalogue.

**Defence** (``recforge.robustness.TextPurifier``, fitted on the clean catalogue titles; every
title is purified before scoring): cost = seconds to fit, seconds to purify the whole catalogue,
how many clean titles it changes (0 by construction), and the scoring seconds it adds.

Results go to ``benchmarks/results/text_attack.json`` and ``.md`` (the JSON is written after each
part).
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
RESULTS = HERE / "results"


def target_scores(scorer, titles, item: int, title: str, rows) -> np.ndarray:
    """The scores of ``item`` for ``rows`` when its title is ``title`` (the rest of the table unchanged)."""
    table = list(titles)
    table[item] = title
    return scorer(table, rows, np.full((len(rows), 1), item))[:, 0]


def _ranks(own: np.ndarray, others: np.ndarray) -> np.ndarray:
    """1 + competitors scored at least as high (pessimistic ties); NaN/-inf own scores rank last."""
    own = np.where(np.isnan(own), -np.inf, own)
    return 1 + (others >= own[:, None]).sum(1)


def _rank_summary(before: np.ndarray, after: np.ndarray, defended: np.ndarray, k: int) -> dict:
    return {"users": int(len(before)),
            "mean_rank": {"before": float(before.mean()), "after": float(after.mean()),
                          "defended": float(defended.mean())},
            "median_rank": {"before": float(np.median(before)), "after": float(np.median(after)),
                            "defended": float(np.median(defended))},
            f"exposure@{k}": {"before": float(np.mean(before <= k)), "after": float(np.mean(after <= k)),
                              "defended": float(np.mean(defended <= k))},
            "users_moved_up": float(np.mean(after < before)), "users_moved_down": float(np.mean(after > before)),
            "median_rank_change": float(np.median(after - before))}


def _attack_record(r, pur) -> dict:
    d = r.as_dict()
    d.pop("ranks_before")
    d.pop("ranks_after")
    d["defended"] = pur.purify(r.adversarial)
    return d


def pick_targets(ds, n: int, seed: int, min_pop: int, titles: list[str]) -> tuple[list[dict], dict]:
    from recforge.evaluation.evaluator import head_items

    pop = np.bincount(ds.interactions["item_id"].to_numpy(), minlength=ds.n_items + 1)
    head = head_items(pop, rule="share:0.8")
    pool = [i for i in range(1, ds.n_items + 1) if not head[i] and pop[i] >= min_pop and titles[i].strip()]
    chosen = np.sort(np.random.default_rng(seed).choice(pool, size=min(n, len(pool)), replace=False))
    raw = ds.decode_items(chosen)
    return [{"item": int(i), "raw_id": str(r), "title": titles[int(i)], "ratings": int(pop[i])}
            for i, r in zip(chosen, raw)], {"pool": len(pool), "head_items": int(head.sum()), "min_pop": min_pop,
                                            "rule": "not in the head (share:0.8 of all ratings)"}


def make_attack(args, encoder):
    from recforge.robustness import StealthyTextAttack

    return StealthyTextAttack(edits=tuple(args.edits.split(",")), max_words=args.max_words,
                              max_char_distance=args.max_char_distance, min_similarity=args.min_similarity,
                              encoder=encoder, candidates=args.candidates, k=args.k, max_queries=args.max_queries,
                              seed=args.seed)


# ---- (b) LLM-ESR ------------------------------------------------------------------------------------
def run_llmesr(args, ds, titles, targets, pur, encoder) -> dict:
    from recforge.data.split import make_split
    from recforge.evaluation.evaluator import evaluate
    from recforge.models import registry
    from recforge.pipeline import eval_sets
    from recforge.robustness.scorers import SemanticModelScorer
    from recforge.semantic.text import item_texts

    t0 = time.perf_counter()
    split = make_split(ds, "loo")
    valid, test = eval_sets(split)
    model = registry.create("llmesr", epochs=args.llmesr_epochs, seed=args.seed, verbose=False)
    model.attach_dataset(ds)
    model.fit(split, valid)
    fit_seconds = time.perf_counter() - t0
    scorer = SemanticModelScorer(model, test, item_texts(ds, model.template), titles)
    attack = make_attack(args, encoder)
    n_users = len(test)
    rows = np.arange(n_users)
    every = np.arange(1, ds.n_items + 1)
    tq = time.perf_counter()
    clean = scorer(titles, rows, every)  # (users, items): the competitors of every target
    clean_seconds = time.perf_counter() - tq
    hist = [set(scorer._rows[r].tolist()) for r in rows]

    def quality(table):
        with scorer.applied(table):
            res = evaluate(model, test, ks=[10], popularity=split.item_popularity)
        m = res.metrics
        tail = res.groups.get("item:tail", {})
        return {"ndcg@10": m["ndcg@10"], "hr@10": m["hr@10"], "tail ndcg@10": tail.get("ndcg@10"),
                "tail hr@10": tail.get("hr@10")}

    per_target, adv_table, def_table = [], list(titles), list(titles)
    rng = np.random.default_rng(args.seed)
    for tg in targets:
        t = tg["item"]
        elig = np.array([r for r in rows if t not in hist[r]])
        n_anchor = max(1, int(round(args.anchor_share * len(elig))))
        anchors = np.sort(rng.choice(elig, size=n_anchor, replace=False))
        r = attack.attack(t, titles, scorer, anchors)
        others = np.delete(clean[elig], t - 1, axis=1)
        def own(title):
            return target_scores(scorer, titles, t, title, elig)

        defended_title = pur.purify(r.adversarial)
        before, after = _ranks(own(titles[t]), others), _ranks(own(r.adversarial), others)
        defended = _ranks(own(defended_title), others)
        rec = {**tg, "attack": _attack_record(r, pur), "eval": _rank_summary(before, after, defended, args.k)}
        if args.adaptive:
            ra = attack.attack(t, titles, pur.wrap(scorer), anchors)
            adaptive = _ranks(own(pur.purify(ra.adversarial)), others)
            rec["adaptive"] = {"adversarial": ra.adversarial, "after_defence": pur.purify(ra.adversarial),
                               "mean_rank": float(adaptive.mean()), "median_rank": float(np.median(adaptive)),
                               f"exposure@{args.k}": float(np.mean(adaptive <= args.k)), "queries": ra.queries}
        per_target.append(rec)
        adv_table[t], def_table[t] = r.adversarial, defended_title
        e = rec["eval"]
        print(f"llmesr item {t} {titles[t]!r} -> {r.adversarial!r}: mean rank {e['mean_rank']['before']:.0f} -> "
              f"{e['mean_rank']['after']:.0f} (defended {e['mean_rank']['defended']:.0f}), {r.queries} queries, "
              f"{r.seconds:.1f} s", flush=True)
    td = time.perf_counter()
    purified_catalogue = pur.transform(titles)
    purify_seconds = time.perf_counter() - td
    q = {"clean": quality(titles), "attacked": quality(adv_table), "defended": quality(def_table)}
    if purified_catalogue != titles:
        q["clean, defended"] = quality(purified_catalogue)
    tq = time.perf_counter()
    scorer(def_table, rows, every)
    defended_scoring = time.perf_counter() - tq
    return {"model": {"name": "llmesr", "variant": model.protocol_notes().get("variant"),
                      "epochs_cap": args.llmesr_epochs, "best_epoch": model.history_.get("best_epoch"),
                      "fit_seconds": round(fit_seconds, 1)},
            "protocol": {"split": "leave-one-out", "ranking": "full (every item, history excluded, pessimistic ties)",
                         "evaluated_users": "test users without the target in their history",
                         "anchor_share": args.anchor_share, "k": args.k},
            "targets": per_target, "summary": summarise(per_target, args.k), "quality": q,
            "defence_cost": {"purify_catalogue_seconds": round(purify_seconds, 4),
                             "clean_titles_changed": int(sum(a != b for a, b in zip(purified_catalogue, titles))),
                             "scoring_seconds_clean": round(clean_seconds, 3),
                             "scoring_seconds_defended_table": round(defended_scoring, 3)},
            "seconds": round(time.perf_counter() - t0, 1)}


def summarise(per_target: list[dict], k: int) -> dict:
    ev = [p["eval"] for p in per_target]
    if not ev:
        return {}
    out = {"targets": len(ev), "edited": int(sum(p["attack"]["adversarial"] != p["attack"]["original"]
                                                 for p in per_target))}
    for part in ("before", "after", "defended"):
        out[f"mean_rank_{part}"] = float(np.mean([e["mean_rank"][part] for e in ev]))
        out[f"median_rank_{part}"] = float(np.median([e["median_rank"][part] for e in ev]))
        out[f"exposure@{k}_{part}"] = float(np.mean([e[f"exposure@{k}"][part] for e in ev]))
    out["targets_moved_up"] = int(sum(e["mean_rank"]["after"] < e["mean_rank"]["before"] for e in ev))
    out["mean_word_edits"] = float(np.mean([p["attack"]["word_edits"] for p in per_target]))
    out["mean_char_distance"] = float(np.mean([p["attack"]["char_distance"] for p in per_target]))
    sims = [p["attack"]["similarity"] for p in per_target if p["attack"]["similarity"] is not None]
    out["mean_similarity"] = float(np.mean(sims)) if sims else None
    out["mean_queries"] = float(np.mean([p["attack"]["queries"] for p in per_target]))
    out["mean_attack_seconds"] = float(np.mean([p["attack"]["seconds"] for p in per_target]))
    return out


# ---- (a) the zero-shot language-model ranker ---------------------------------------------------------
def run_llm(args, ds, split, test, cfg, titles, targets, pur, encoder) -> dict:
    import polars as pl

    from recforge.llm import prompts as P
    from recforge.llm import task
    from recforge.llm.rella import PromptData
    from recforge.robustness.scorers import LLMPromptScorer

    t0 = time.perf_counter()
    cands = task.listwise_candidates(cfg, split, test)
    n = int(cfg["eval"]["listwise"])
    items = cands["item_id"].to_numpy().reshape(-1, n).astype(np.int64)
    contexts = cands.filter(pl.col("label") == 1).sort("target")
    est = task.model_class("rella")(**task.llm_params(cfg, False))
    fmt = P.PromptFormat(cfg["llm"]["template"], cfg["llm"]["item_line"], cfg["llm"]["target_line"])
    data = PromptData(split, fmt)
    est.fit(data)
    scorer = LLMPromptScorer(est, data, contexts)
    n_ctx = len(contexts)
    ctx = np.arange(n_ctx)
    clean = scorer(titles, ctx, items)  # (contexts, N); column 0 is the liked item
    base_seconds = scorer.seconds
    rated = pl.concat([split.train.select("user_id", "item_id"), split.test.select("user_id", "item_id")])
    rated = {u: set(v) for u, v in rated.group_by("user_id").agg(pl.col("item_id")).iter_rows()}
    users = contexts["user_id"].to_list()
    attack = make_attack(args, encoder)
    attack.k = args.llm_k
    rng = np.random.default_rng(args.seed)
    per_target, extra = [], {"clean": {}, "attacked": {}, "defended": {}}
    for tg in targets:
        t = tg["item"]
        elig = np.array([c for c in ctx if t not in rated.get(users[c], set())])
        if len(elig) == 0:
            continue
        anchors = np.sort(rng.choice(elig, size=min(args.llm_anchors, len(elig)), replace=False))
        q0 = scorer.prompts_scored
        r = attack.attack(t, titles, scorer, anchors, candidates=items[anchors])
        def own(title):
            return target_scores(scorer, titles, t, title, elig)

        defended_title = pur.purify(r.adversarial)
        s = {"clean": own(titles[t]), "attacked": own(r.adversarial), "defended": own(defended_title)}
        others = clean[elig]
        before, after, defended = (_ranks(s[p], others) for p in ("clean", "attacked", "defended"))
        for p in s:
            for c, v in zip(elig, s[p]):
                extra[p].setdefault(int(c), []).append(float(v))
        rec = {**tg, "contexts": int(len(elig)), "anchors": int(len(anchors)), "attack": _attack_record(r, pur),
               "eval": _rank_summary(before, after, defended, args.llm_k),
               "prompts_scored": scorer.prompts_scored - q0}
        per_target.append(rec)
        e = rec["eval"]
        print(f"llm item {t} {titles[t]!r} -> {r.adversarial!r}: mean rank {e['mean_rank']['before']:.1f} -> "
              f"{e['mean_rank']['after']:.1f} of {n + 1} (defended {e['mean_rank']['defended']:.1f}), "
              f"{rec['prompts_scored']} prompts, {r.seconds:.0f} s", flush=True)

    def quality(part):
        ranks = []
        for c in ctx:
            pos = clean[c, 0]
            negs = np.concatenate([clean[c, 1:], np.asarray(extra[part].get(int(c), []))])
            ranks.append((1 + (negs >= pos).sum(), 1 + len(negs)))
        r = np.array([a for a, _ in ranks], dtype=np.float64)
        size = np.array([b for _, b in ranks], dtype=np.float64)
        m = task.listwise_metrics(r)
        return {"hr@10": m["hr@10"], "ndcg@10": m["ndcg@10"], "mrr": m["mrr"],
                "auc": float(np.mean(1 - (r - 1) / np.maximum(size - 1, 1))), "mean_set_size": float(size.mean())}

    standard = task.listwise_metrics(task.target_ranks(clean, np.eye(n, dtype=bool)[np.zeros(n_ctx, dtype=int)]))
    return {"model": {"name": "rella (zero-shot)", "backbone": est.backbone_,
                      "retrieval": est.retrieval, "k": est.k, "max_tokens": est.max_tokens},
            "protocol": {"label": task.listwise_label(n), "contexts": n_ctx, "candidates": n,
                         "negatives": task.LISTWISE_NEGATIVES, "test_seed": int(cfg["data"]["test_seed"]),
                         "target_contexts": "contexts whose user never rated the target", "anchors": args.llm_anchors,
                         "k": args.llm_k, "ties": "pessimistic"},
            "standard_listwise_clean": standard, "targets": per_target, "summary": summarise(per_target, args.llm_k),
            "quality_enlarged_sets": {p: quality(p) for p in ("clean", "attacked", "defended")},
            "prompts_scored": scorer.prompts_scored, "scoring_seconds": round(scorer.seconds, 1),
            "baseline_scoring_seconds": round(base_seconds, 1), "seconds": round(time.perf_counter() - t0, 1)}


# ---- report ------------------------------------------------------------------------------------------
def markdown(res: dict) -> str:
    s = res["settings"]
    lines = [f"MovieLens-100K, {len(res['targets'])} long-tail targets (seed {s['seed']}), edits {s['edits']}, "
             f"at most {s['max_words']} words, {s['candidates']} variants per word, {s['max_queries']} queries "
             f"per target; {res['machine']}", ""]
    for part, label in (("llm", "zero-shot LLM ranker (SAMPLED LISTWISE)"), ("llmesr", "LLM-ESR (full ranking)")):
        if part not in res:
            continue
        p = res[part]
        sm = p["summary"]
        k = p["protocol"]["k"]
        lines += [f"**{label}**: {sm.get('targets', 0)} targets, {sm.get('edited', 0)} edited, "
                  f"{sm.get('targets_moved_up', 0)} moved up; mean word edits {sm.get('mean_word_edits', 0):.2f}, "
                  f"char distance {sm.get('mean_char_distance', 0):.2f}, similarity to the original "
                  f"{sm.get('mean_similarity') or float('nan'):.3f} ({res.get('similarity_encoder')}); "
                  f"{p['seconds']:.0f} s", "",
                  "| | mean rank | median rank | exposure@%d |" % k, "|---|---|---|---|"]
        for part_name in ("before", "after", "defended"):
            lines.append(f"| {part_name} | {sm.get(f'mean_rank_{part_name}', float('nan')):.1f} | "
                         f"{sm.get(f'median_rank_{part_name}', float('nan')):.1f} | "
                         f"{sm.get(f'exposure@{k}_{part_name}', float('nan')):.3f} |")
        q = p.get("quality") or p.get("quality_enlarged_sets")
        lines += ["", "| titles | " + " | ".join(next(iter(q.values())).keys()) + " |",
                  "|---|" + "---|" * len(next(iter(q.values())))]
        for name, m in q.items():
            lines.append(f"| {name} | " + " | ".join("–" if v is None else f"{v:.4f}" for v in m.values()) + " |")
        lines.append("")
    if "defence" in res:
        d = res["defence"]
        cost = res.get("llmesr", {}).get("defence_cost", {})
        lines.append(f"Defence ({d['name']}): fit {d['fit_seconds']:.3f} s on {d['titles']} titles"
                     + (f"; purifying the catalogue {cost['purify_catalogue_seconds']:.3f} s, clean titles changed "
                        f"{cost['clean_titles_changed']}" if cost else "") + ".")
        adaptive = [t["adaptive"] for t in res.get("llmesr", {}).get("targets", []) if "adaptive" in t]
        if adaptive:
            lines.append(f"Adaptive attack through the purifier (LLM-ESR): mean rank "
                         f"{np.mean([a['mean_rank'] for a in adaptive]):.1f} after the defence.")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--data", default="../shared/data/movielens-100k")
    ap.add_argument("--targets", type=int, default=20)
    ap.add_argument("--min-pop", type=int, default=5)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--edits", default="char")
    ap.add_argument("--max-words", type=int, default=2)
    ap.add_argument("--max-char-distance", type=int, default=None)
    ap.add_argument("--min-similarity", type=float, default=None)
    ap.add_argument("--candidates", type=int, default=8)
    ap.add_argument("--max-queries", type=int, default=60)
    ap.add_argument("--k", type=int, default=10)
    ap.add_argument("--encoder", default=None, help="similarity encoder (default: the packaged all-MiniLM-L6-v2)")
    ap.add_argument("--only", default="llmesr,llm")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--llmesr-epochs", type=int, default=30)
    ap.add_argument("--anchor-share", type=float, default=0.4)
    ap.add_argument("--adaptive", action="store_true")
    ap.add_argument("--llm-contexts", type=int, default=20)
    ap.add_argument("--llm-candidates", type=int, default=10)
    ap.add_argument("--llm-anchors", type=int, default=8)
    ap.add_argument("--llm-k", type=int, default=3)
    ap.add_argument("--llm-history", type=int, default=5)
    ap.add_argument("--llm-max-tokens", type=int, default=320)
    ap.add_argument("--out", default=str(RESULTS / "text_attack.json"))
    args = ap.parse_args(argv)

    import torch

    from recforge.llm import task
    from recforge.robustness import TextPurifier
    from recforge.robustness.scorers import title_table
    from recforge.semantic.encoder import get_encoder

    torch.set_num_threads(args.threads)
    only = set(args.only.split(","))
    out = Path(args.out)
    settings = {k: v for k, v in vars(args).items() if k not in ("out",)}
    res = {"settings": settings, "machine": f"{platform.machine()}, PyTorch {torch.__version__}, "
                                            f"{args.threads} threads", "date": time.strftime("%Y-%m-%d")}
    cfg = task.resolve("rella", args.data, {
        "model.retrieval": "recent", "model.k": args.llm_history, "model.threads": args.threads,
        "llm.max_tokens": args.llm_max_tokens, "eval.listwise": args.llm_candidates,
        "eval.listwise_targets": args.llm_contexts, "data.test_prompts": 1000, "seed": args.seed})
    ds, split, test, _ = task.prepare(cfg)
    titles = title_table(ds)
    targets, pool = pick_targets(ds, args.targets, args.seed, args.min_pop, titles)
    res["targets"], res["target_pool"] = targets, pool
    tf = time.perf_counter()
    pur = TextPurifier().fit(titles[1:])
    res["defence"] = {"name": "TextPurifier", "max_distance": pur.max_distance, "min_length": pur.min_length,
                      "fit_seconds": round(time.perf_counter() - tf, 4), "titles": len(titles) - 1}
    encoder = get_encoder(args.encoder, progress=False)
    res["similarity_encoder"] = encoder.name
    res["attack_budget"] = make_attack(args, encoder).budget()
    out.parent.mkdir(parents=True, exist_ok=True)
    if "llmesr" in only:
        res["llmesr"] = run_llmesr(args, ds, titles, targets, pur, encoder)
        out.write_text(json.dumps(res, indent=2, default=float))
    if "llm" in only:
        res["llm"] = run_llm(args, ds, split, test, cfg, titles, targets, pur, encoder)
        out.write_text(json.dumps(res, indent=2, default=float))
    md = markdown(res)
    out.with_suffix(".md").write_text(md + "\n")
    print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
