"""Runs one RecBole 1.2.1 model inside RecBole's own virtual environment (never imports RecForge).

Started by ``benchmarks/vs_recbole.py``; reads a JSON job from argv[1] and writes a JSON result to
argv[2]: data preparation time, per-epoch training and validation seconds with the validation
score, the wall time at which the best validation score was reached, and test metrics of the
best checkpoint. Training stops at RecBole's own early stopping or when ``budget_seconds`` have
passed (recorded as ``stopped_by_budget``).
"""

from __future__ import annotations

import json
import resource
import sys
import time


class BudgetReached(Exception):
    pass


def main() -> int:
    job = json.loads(open(sys.argv[1]).read())
    out_path = sys.argv[2]
    import torch

    torch.set_num_threads(int(job["threads"]))
    from recbole.config import Config
    from recbole.data import create_dataset, data_preparation
    from recbole.trainer import Trainer
    from recbole.utils import get_model, init_logger, init_seed

    config = Config(model=job["model"], dataset=job["dataset"], config_dict=job["config"])
    init_seed(config["seed"], config["reproducibility"])
    init_logger(config)
    t0 = time.perf_counter()
    dataset = create_dataset(config)
    train_data, valid_data, test_data = data_preparation(config, dataset)
    prep_seconds = time.perf_counter() - t0
    model = get_model(config["model"])(config, train_data._dataset).to(config["device"])

    epochs: list[dict] = []

    class TimedTrainer(Trainer):
        def _train_epoch(self, *a, **kw):
            t = time.perf_counter()
            loss = super()._train_epoch(*a, **kw)
            epochs.append({"epoch": len(epochs) + 1, "train_seconds": round(time.perf_counter() - t, 2),
                           "loss": float(sum(loss) if isinstance(loss, tuple) else loss)})
            return loss

        def _valid_epoch(self, *a, **kw):
            t = time.perf_counter()
            res = super()._valid_epoch(*a, **kw)
            epochs[-1]["valid_seconds"] = round(time.perf_counter() - t, 2)
            epochs[-1]["valid_score"] = float(res[0])
            return res

    trainer = TimedTrainer(config, model)
    t_fit = time.perf_counter()
    budget = float(job["budget_seconds"])
    stopped_by_budget = False

    def callback(epoch_idx, valid_score):
        epochs[-1]["elapsed"] = round(time.perf_counter() - t_fit, 2)
        if time.perf_counter() - t_fit > budget:
            raise BudgetReached

    try:
        trainer.fit(train_data, valid_data, verbose=True, saved=True, show_progress=False, callback_fn=callback)
    except BudgetReached:
        stopped_by_budget = True
    fit_seconds = time.perf_counter() - t_fit
    scored = [e for e in epochs if "valid_score" in e] or epochs[-1:]
    best = max(scored, key=lambda e: e.get("valid_score", 0.0))
    test = trainer.evaluate(test_data, load_best_model=True, model_file=trainer.saved_model_file)
    result = {
        "library": "RecBole 1.2.1", "torch": torch.__version__, "threads": torch.get_num_threads(),
        "prep_seconds": round(prep_seconds, 1), "fit_seconds": round(fit_seconds, 1),
        "train_samples": len(train_data.dataset), "epochs": epochs, "best_epoch": best["epoch"],
        "best_valid": best.get("valid_score"), "seconds_to_best": best.get("elapsed"),
        "stopped_by_budget": stopped_by_budget, "test": {k: float(v) for k, v in test.items()},
        "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0, 1),
    }
    with open(out_path, "w") as f:
        json.dump(result, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
