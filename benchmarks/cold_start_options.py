"""Re-evaluate a trained new-item run under other cold-start options (the cold path is fitted at evaluation time).

The run's best checkpoint is loaded once; for every option set (``key=value`` pairs of the ``cold_start*``
configuration keys, comma-separated; ``reference`` = ``cold_start=none``) its validation, test, hybrid
(``test_new_items``), cold and warm Recall@20 are printed, plus the validation split restricted to new items
ranked among new items (``valid_cold``: the split that selects cold-start options without the test set)::

    python benchmarks/cold_start_options.py --run RUN reference cold_start=ridge \
        cold_start=ridge,cold_start_scale=1.5 cold_start=knn,cold_start_k=50 [--json F]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from dgmrec import api
from dgmrec.data.impute import FeatureOptions, prepare_features
from dgmrec.evaluation.protocol import Evaluator
from dgmrec.models.base import cold_demand
from dgmrec.models.coldstart import ColdStart, ColdStartOptions


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", required=True)
    parser.add_argument("options", nargs="+")
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    lr = api.load_run(args.run)
    ds, model = lr.dataset, lr.model
    if ds.new_items is None or model.cold_start is None:
        raise SystemExit("needs a new-item run of a model with a cold path")
    new = ds.new_items.astype(bool)
    ev = Evaluator.from_pairs(ds.train_matrix(), {"valid": ds.valid, "valid_cold": ds.valid, "test": ds.test,
                                                  "test_new_items": ds.test_new_only, "test_cold": ds.test,
                                                  "test_warm": ds.test},
                              ks=[20], metrics=["recall"],
                              candidates={"valid_cold": new, "test_cold": new, "test_warm": ~new})
    feats = prepare_features(ds, FeatureOptions.from_config(lr.config))
    features = [torch.as_tensor(feats[m]) for m in ds.modalities]
    rows = {}
    for text in args.options:
        pairs = {} if text == "reference" else dict(kv.split("=", 1) for kv in text.split(","))
        options = ColdStartOptions.from_config(pairs)  # the current defaults, whatever the run used
        model.cold_start = ColdStart(options, features, torch.as_tensor(ds.observed), torch.as_tensor(new),
                                     demand=cold_demand(ds), seen=ds.train_matrix())
        with torch.no_grad():
            model.prepare_eval()
            rows[text] = {s: round(ev.evaluate(model.score_users, s)[0]["recall@20"], 5) for s in ev.splits}
        print(f"{text:50s} " + " ".join(f"{s}={v:.4f}" for s, v in rows[text].items()), flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps({"run": str(args.run), "recall@20": rows}, indent=2))


if __name__ == "__main__":
    main()
