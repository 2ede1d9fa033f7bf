"""Items added to a trained run vs the same items present at training time as new items.

``make-base`` takes a new-item dataset (MMRec folder with ``<name>_new_items.inter``), picks ``--n`` new items
(half observing one modality only, half observing every modality; ``--seed``), and writes:

* ``OUT/data``: the dataset without those items (items re-indexed; their rows removed from every split and
  feature matrix; the mask as ``observed.npz``);
* ``OUT/items``: their features (``<modality>.npy``, NaN rows where unobserved), ``items.npy`` (their ids in the
  full dataset) and ``ids.txt``.

Train the same model and configuration on the full dataset (run A) and on ``OUT/data`` (run B), then
``measure`` adds the items to run B (:func:`dgmrec.add_items`) and compares, on the items' held-out (test)
interactions, their cold Recall@20 (ranked among the new items) in run B with what they score in run A, and
how often they enter users' top-20 lists (full ranking, training items excluded)::

    python benchmarks/cold_start_add_items.py make-base --data DIR --mask MASK --modalities image,audio \
        --out OUT [--n 100] [--seed 0]
    dgmrec train ... --setting new-items --out RUN_A          # full dataset
    dgmrec train ... --data OUT/data --mask OUT/data/observed.npz --setting new-items --out RUN_B
    python benchmarks/cold_start_add_items.py measure --run-a RUN_A --run-b RUN_B --items OUT/items [--json F]
    python benchmarks/cold_start_add_items.py summary F1.json F2.json ...   # several seed pairs, one table

Besides the added items, ``measure`` reports the cold Recall@20 of the *other* new items in both runs (what run
B, trained without the added items, does for new items in general), the bootstrap standard error over users of
the added items' Recall@20, the per-user rank agreement of the two runs' scores of the added items, and a check
of the addition path on run A: the same items added to run A again, as duplicates, get the originals'
representations.
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

import numpy as np
import torch
from scipy.stats import spearmanr

from dgmrec import api
from dgmrec.data.mmrec import write_inter, write_mmrec
from dgmrec.evaluation.protocol import Evaluator, rank_items


def _without(n_items: int, picked: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The items kept when ``picked`` are removed (bool mask) and every item's index among the kept ones."""
    keep = np.ones(n_items, dtype=bool)
    keep[picked] = False
    return keep, np.cumsum(keep) - 1


def make_base(args: argparse.Namespace) -> None:
    spec = api.DatasetSpec(args.data, modalities=args.modalities.split(","), mask=args.mask, setting="new-items")
    ds = spec.load()
    full = api.DatasetSpec(args.data, modalities=args.modalities.split(","), mask=args.mask).load()
    rng = np.random.default_rng(args.seed)
    n_obs = ds.observed.sum(axis=1)
    one = np.flatnonzero(ds.new_items & (n_obs == 1))
    every = np.flatnonzero(ds.new_items & (n_obs == ds.n_modalities))
    picked = np.sort(np.concatenate([rng.choice(one, args.n // 2, replace=False),
                                     rng.choice(every, args.n - args.n // 2, replace=False)]))
    keep, new_id = _without(ds.n_items, picked)

    def drop(pairs: np.ndarray) -> np.ndarray:
        pairs = pairs[keep[pairs[:, 1]]]
        return np.stack([pairs[:, 0], new_id[pairs[:, 1]]], axis=1)

    out = Path(args.out)
    if out.exists():
        shutil.rmtree(out)
    base = full.__class__(name=ds.name, n_users=ds.n_users, n_items=int(keep.sum()), train=drop(full.train),
                          valid=drop(full.valid), test=drop(full.test),
                          features={m: x[keep] for m, x in ds.features.items()}, observed=ds.observed[keep])
    write_mmrec(base, out / "data")
    write_inter(out / "data" / f"{ds.name}_new_items.inter", (drop(ds.train), drop(ds.valid)))
    items = out / "items"
    items.mkdir(parents=True)
    for j, m in enumerate(ds.modalities):
        np.save(items / f"{m}.npy", np.where(ds.observed[picked, j, None], ds.features[m][picked], np.nan))
    np.save(items / "items.npy", picked)
    (items / "ids.txt").write_text("".join(f"item{i}\n" for i in picked))
    print(f"{len(picked)} items ({len(picked) - args.n // 2} observing every modality) -> {out}")


def cold_recall(lr: api.LoadedRun, items: np.ndarray, test: np.ndarray) -> tuple[dict[str, float], np.ndarray]:
    """Recall@20 (ranked among the run's new items) on ``test`` pairs of ``items``, and the per-user vector."""
    ds = lr.dataset
    pairs = test[np.isin(test[:, 1], items)]
    ev = Evaluator.from_pairs(ds.train_matrix(), {"cold": pairs}, ks=[20], metrics=["recall", "ndcg"],
                              candidates={"cold": ds.new_items.astype(bool)})
    with torch.no_grad():
        lr.model.prepare_eval()
        mean, per_user = ev.evaluate(lr.model.score_users, "cold")
    return mean, per_user["recall@20"]


def in_top20(lr: api.LoadedRun, items: np.ndarray) -> dict[str, float]:
    ds = lr.dataset
    users = np.flatnonzero(np.diff(ds.train_matrix().indptr) > 0)
    with torch.no_grad():
        lr.model.prepare_eval()
        top, _ = rank_items(lr.model.score_users, users, ds.train_matrix(), 20)
    hit = np.isin(top, items)
    return {"items_in_some_top20": len(np.intersect1d(top.ravel(), items)),
            "users_with_one_in_top20": round(float(hit.any(axis=1).mean()), 4),
            "share_of_top20_slots": round(float(hit.mean()), 5),
            "share_of_items": round(len(items) / ds.n_items, 5)}


def measure(args: argparse.Namespace) -> None:
    folder = Path(args.items)
    picked = np.load(folder / "items.npy")
    run_a = api.load_run(args.run_a)
    run_b = api.load_run(args.run_b)
    ds_a = run_a.dataset
    feats = {m: np.load(folder / f"{m}.npy") for m in ds_a.modalities}
    res = api.add_items(run_b, feats, item_ids=(folder / "ids.txt").read_text().split(),
                        out=Path(args.run_b) / "added_items_benchmark")
    # every item in run B's numbering (users are unchanged): kept items re-indexed, the picked ones as added
    keep, new_id = _without(ds_a.n_items, picked)
    a_to_b = np.where(keep, new_id, -1)
    a_to_b[picked] = res.items
    test_b = np.stack([ds_a.test[:, 0], a_to_b[ds_a.test[:, 1]]], axis=1)
    test_a = ds_a.test[np.isin(ds_a.test[:, 1], picked)]
    mean_a, users_a = cold_recall(run_a, picked, ds_a.test)
    mean_b, users_b = cold_recall(res.run, res.items, test_b)
    # the other new items, in both runs (run B after the addition, so both rank among the same new items)
    other = np.flatnonzero(ds_a.new_items.astype(bool) & keep)
    other_a, _ = cold_recall(run_a, other, ds_a.test)
    other_b, _ = cold_recall(res.run, a_to_b[other], test_b)
    agreement = _rank_agreement(run_a, picked, res.run, res.items, test_a[:, 0])
    report = {
        "items": len(picked), "test_pairs": len(test_a),
        "present_at_training": {**{k: round(v, 5) for k, v in mean_a.items()}, **in_top20(run_a, picked)},
        "added_after_training": {**{k: round(v, 5) for k, v in mean_b.items()}, **in_top20(res.run, res.items)},
        "relative_difference_recall@20": round((mean_b["recall@20"] - mean_a["recall@20"])
                                               / max(mean_a["recall@20"], 1e-12), 4),
        "users": len(users_a),
        "standard_error_over_users_recall@20": {"present": _bootstrap_se(users_a), "added": _bootstrap_se(users_b)},
        "other_new_items_recall@20": {"items": len(other), "present_run": round(other_a["recall@20"], 5),
                                      "added_run": round(other_b["recall@20"], 5)},
        "rank_agreement_spearman": agreement,
    }
    # adds the items to run A again: last, after everything that reads run A
    report["duplicates_added_to_run_a_max_difference"] = _duplicates(run_a, picked, feats, folder)
    print(json.dumps(report, indent=2))
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2))


def _bootstrap_se(per_user: np.ndarray, draws: int = 2000) -> float:
    """Bootstrap standard error (over users) of the mean of a per-user metric vector."""
    v = np.asarray(per_user, dtype=np.float64)
    rng = np.random.default_rng(0)
    return round(float(np.std([v[rng.integers(0, len(v), len(v))].mean() for _ in range(draws)])), 5)


def _rank_agreement(run_a: api.LoadedRun, items_a: np.ndarray, run_b: api.LoadedRun, items_b: np.ndarray,
                    users: np.ndarray) -> float:
    """Median over ``users`` of the Spearman correlation of the two runs' scores of the same items."""
    users_t = torch.as_tensor(np.unique(users))
    with torch.no_grad():
        run_a.model.prepare_eval()
        run_b.model.prepare_eval()
        sa = run_a.model.score_users(users_t)[:, torch.as_tensor(items_a)].float().numpy()
        sb = run_b.model.score_users(users_t)[:, torch.as_tensor(items_b)].float().numpy()
    return round(float(np.median([spearmanr(x, y)[0] for x, y in zip(sa, sb, strict=True)])), 4)


def _duplicates(run_a: api.LoadedRun, picked: np.ndarray, feats: dict[str, np.ndarray], folder: Path) -> float:
    """The items added to run A again, as duplicates: the largest difference between a duplicate's representation
    and its original's (zero up to rounding: the addition path gives an item what training-time cold items get)."""
    res = api.add_items(run_a, feats, item_ids=[f"duplicate-{i}" for i in picked],
                        out=Path(folder).parent / "duplicates_added_to_run_a")
    with torch.no_grad():
        res.run.model.prepare_eval()
        reps = res.run.model.eval_representations()
    assert reps is not None
    items = reps[1]
    return float((items[torch.as_tensor(res.items)] - items[torch.as_tensor(picked)]).abs().max())


def summary(args: argparse.Namespace) -> None:
    """One Markdown row per measured seed pair, and the means over the pairs."""
    rows = [(Path(f).stem, json.loads(Path(f).read_text())) for f in args.records]
    print("| pair | items | present (A) | added (B) | relative | SE over users, A / B "
          "| other new items: A / B | rank agreement |")
    print("|---|---|---|---|---|---|---|---|")
    for name, r in rows:
        se = r.get("standard_error_over_users_recall@20", {})
        other = r.get("other_new_items_recall@20", {})
        print(f"| {name} | {r['items']} | {r['present_at_training']['recall@20']:.4f} "
              f"| {r['added_after_training']['recall@20']:.4f}"
              f" | {100 * r['relative_difference_recall@20']:+.1f} % | {se.get('present', float('nan')):.4f} / "
              f"{se.get('added', float('nan')):.4f} | {other.get('present_run', float('nan')):.4f} / "
              f"{other.get('added_run', float('nan')):.4f} | {r.get('rank_agreement_spearman', float('nan')):.2f} |")
    a = float(np.mean([r["present_at_training"]["recall@20"] for _, r in rows]))
    b = float(np.mean([r["added_after_training"]["recall@20"] for _, r in rows]))
    print(f"\nmean over {len(rows)} pairs: present {a:.4f}, added {b:.4f}, relative {100 * (b - a) / a:+.1f} %")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("make-base")
    p.add_argument("--data", required=True)
    p.add_argument("--mask", default=None)
    p.add_argument("--modalities", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--n", type=int, default=100)
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(fn=make_base)
    q = sub.add_parser("measure")
    q.add_argument("--run-a", required=True)
    q.add_argument("--run-b", required=True)
    q.add_argument("--items", required=True)
    q.add_argument("--json", default=None)
    q.set_defaults(fn=measure)
    r = sub.add_parser("summary")
    r.add_argument("records", nargs="+", help="JSON records written by measure --json")
    r.set_defaults(fn=summary)
    args = parser.parse_args()
    args.fn(args)


if __name__ == "__main__":
    main()
