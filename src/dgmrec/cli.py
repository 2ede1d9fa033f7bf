"""Command-line interface (``dgmrec --help``): a thin layer over :mod:`dgmrec.api`.

Bad input of any kind prints one line ``error: <file or field>: <problem>`` and exits with code 2.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Annotated, Any

import numpy as np
import typer
from rich.console import Console
from rich.table import Table

from dgmrec import __version__, api
from dgmrec.cli_study import study_app
from dgmrec.data.dataset import RecDataset
from dgmrec.errors import DataError, InputError

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Multimodal recommendation with missing modalities (DGMRec and baselines).")
data_app = typer.Typer(no_args_is_help=True, help="Validate datasets, generate masks and splits, write the example "
                                                    "catalogue.")
app.add_typer(data_app, name="data")
app.add_typer(study_app, name="study")
config_app = typer.Typer(no_args_is_help=True, help="Show the configuration a training run would use.")
app.add_typer(config_app, name="config")
# piped output is not cut at 80 columns (tables would lose digits)
console = Console() if sys.stdout.isatty() else Console(width=160)

ModelOpt = Annotated[str, typer.Option("--model", "-m", help="Model name (see `dgmrec models`).")]
DataOpt = Annotated[str, typer.Option("--data", "-d",
                                      help="MMRec dataset folder, or 'synthetic' / 'synthetic(seed=N)'.")]
ModalitiesOpt = Annotated[str | None, typer.Option("--modalities", help="Comma-separated subset, e.g. image,audio.")]
MaskOpt = Annotated[Path | None, typer.Option("--mask", help="Mask file: reference pickle or plain .npz.")]
LettersOpt = Annotated[str | None, typer.Option("--mask-letters",
                                                help="Letter map of pickled masks, default t=text,v=image,a=audio.")]
SettingOpt = Annotated[str, typer.Option("--setting", help="missing or new-items.")]
DeviceOpt = Annotated[str, typer.Option("--device", help="cpu, cuda or auto.")]


def _print_version(value: bool) -> None:
    if value:
        print(f"dgmrec {__version__}")
        raise typer.Exit()


@app.callback()
def _root(version: Annotated[bool, typer.Option("--version", help="Print the version and exit.", is_eager=True,
                                                callback=_print_version)] = False) -> None:
    """Multimodal recommendation with missing modalities (DGMRec and baselines)."""


def _metrics_table(title: str, rows: dict[str, dict[str, float]], *, row_header: str = "split",
                   ks: list[int] | None = None, metrics: list[str] | None = None) -> Table:
    """One row per (row, cut-off), one column per metric: every metric@K the rows hold (or those asked for)."""
    present = [k for r in rows.values() for k in r if "@" in k]
    names = metrics or list(dict.fromkeys(k.split("@")[0] for k in present))
    cutoffs = ks or sorted({int(k.split("@")[1]) for k in present})
    table = Table(title=title)
    table.add_column(row_header)
    table.add_column("K", justify="right")
    for name in names:
        table.add_column(name, justify="right")
    for label, r in rows.items():
        for i, k in enumerate(cutoffs):
            table.add_row(label, str(k), *[f"{r[f'{m}@{k}']:.4f}" if f"{m}@{k}" in r else "–" for m in names],
                          end_section=i == len(cutoffs) - 1)
    return table


@app.command()
def train(
    model: ModelOpt,
    data: DataOpt,
    out: Annotated[Path, typer.Option("--out", "-o", help="Run directory to write.")],
    modalities: ModalitiesOpt = None,
    mask: MaskOpt = None,
    mask_letters: LettersOpt = None,
    setting: SettingOpt = "missing",
    config: Annotated[Path | None, typer.Option("--config", help="YAML configuration file.")] = None,
    set_: Annotated[list[str] | None, typer.Option("--set", help="key=value override (repeatable).")] = None,
    seed: Annotated[int | None, typer.Option("--seed", help="Random seed (default: config seed, 999).")] = None,
    device: DeviceOpt = "cpu",
    resume: Annotated[bool, typer.Option("--resume", help="Continue an interrupted run in --out.")] = False,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace the run already in --out.")] = False,
    no_best: Annotated[bool, typer.Option("--no-best", help="Ignore the shipped per-dataset best config.")] = False,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No progress bar.")] = False,
    threads: Annotated[int | None, typer.Option(
        "--threads", min=0, help="CPU threads of PyTorch (config key threads; 0 = PyTorch's default).")] = None,
    precision: Annotated[str | None, typer.Option(
        "--precision", help="Training precision: fp32, bf16 or fp16 (CUDA) (config key precision).")] = None,
) -> None:
    """Train a model, evaluate it with the full-ranking protocol and write RUN_DIR/results.json and curves.png.

    An --out that already holds a run is refused unless --resume (continue it) or --overwrite (replace it).

    Started by torchrun, every process trains its share of each batch (docs/distributed.md).
    """
    from dgmrec.config import CHOICES, parse_set

    if precision is not None and precision not in CHOICES["precision"]:
        raise InputError(f"unknown precision {precision!r}; known: {', '.join(CHOICES['precision'])}",
                         source="--precision")
    overrides = parse_set(set_ or [])
    overrides.update({k: v for k, v in (("threads", threads), ("precision", precision)) if v is not None})
    spec = api.DatasetSpec(data, modalities=modalities, mask=mask, mask_letters=mask_letters, setting=setting)
    results = api.train(model, spec, out=out, config_file=config, overrides=overrides, seed=seed,
                        device=device, resume=resume, overwrite=overwrite, progress=not quiet,
                        use_best=not no_best)
    if os.environ.get("RANK", "0") != "0":
        return  # one summary per distributed run, from rank 0
    rows = {"valid": results["valid"], "test": results["test"]}
    if "test_new_items" in results:
        rows["test (new items)"] = results["test_new_items"]
    stopped = ", stopped early" if results["early_stopped"] else ""
    console.print(_metrics_table(
        f"{results['model']} on {results['dataset']}: best epoch {results['best_epoch']} of "
        f"{results['epochs_run']}{stopped}",
        rows, ks=[int(k) for k in results["config"]["topk"]], metrics=list(results["config"]["metrics"])))
    console.print(f"results: {Path(out) / 'results.json'} ({results['seconds_per_epoch']:.2f} s/epoch)",
                  soft_wrap=True)
    console.print(f"curves:  {Path(out) / 'curves.png'}", soft_wrap=True)


_HEADER_NAMES = {"user", "users", "userid", "user_id", "original_id", "id"}


def _users_option(value: str, ds: RecDataset, original: bool) -> list[str]:
    """The users of ``--users``: a file with one id per line (first CSV column; a header line such as
    ``user`` or ``original_id`` is skipped) or an inline comma-separated list. Unknown ids are errors."""
    path = Path(value)
    if path.is_file():
        try:
            lines = path.read_text(encoding="utf-8-sig").splitlines()
        except (OSError, UnicodeDecodeError) as exc:
            raise DataError(f"cannot read users file ({exc})", source=str(path)) from None
        tokens = [line.split(",")[0].strip() for line in lines]
        tokens = [t for t in tokens if t]
        if tokens and tokens[0].lower() in _HEADER_NAMES:
            try:
                ds.user_index(tokens[:1], original=original)
            except DataError:
                tokens = tokens[1:]  # a header line, not a user
        if not tokens:
            raise DataError("no user ids in the file", source=str(path))
        try:
            ds.user_index(tokens, source=str(path), original=original)
        except DataError as exc:
            raise DataError(str(exc).removeprefix(f"{path}: "), source=f"--users {path}") from None
        return tokens
    tokens = [t.strip() for t in value.split(",") if t.strip()]
    if not tokens:
        raise InputError("no user ids given", source="--users")
    try:
        ds.user_index(tokens, source="--users", original=original)
    except DataError as exc:
        if len(tokens) == 1 and ("/" in tokens[0] or Path(tokens[0]).suffix):  # a file name with a typo?
            raise DataError(f"{str(exc).removeprefix('--users: ')}, and no file of that name",
                            source="--users") from None
        raise
    return tokens


@app.command()
def recommend(
    run: Annotated[Path, typer.Option("--run", help="Run directory written by `dgmrec train`.")],
    k: Annotated[int, typer.Option("--k", help="Items per user.")] = 10,
    users: Annotated[str | None, typer.Option(
        "--users", help="Users to recommend to: comma-separated ids (user_0,user_7) or a file with one id per "
                        "line (default: every user).")] = None,
    exclude: Annotated[str, typer.Option("--exclude",
                                         help="train (the protocol's mask), seen (any split) or none.")] = "seen",
    out: Annotated[Path | None, typer.Option("--out", "-o", help="CSV file to write (default: print).")] = None,
    internal_ids: Annotated[bool, typer.Option(
        "--internal-ids", help="Users and items as internal indices instead of the dataset's original ids.")] = False,
    device: DeviceOpt = "cpu",
) -> None:
    """Top-K recommendations as CSV user,rank,item,score, in the dataset's original ids where it has id maps
    (user_ids.csv / item_ids.csv)."""
    lr = api.load_run(run, device)
    chosen = _users_option(users, lr.dataset, not internal_ids) if users is not None else None
    table = api.recommend(lr, k=k, users=chosen, exclude=exclude, ids="internal" if internal_ids else "raw")
    if out is None:
        table.to_csv(sys.stdout, index=False, float_format="%.6f")
        return
    out.parent.mkdir(parents=True, exist_ok=True)
    table.to_csv(out, index=False, float_format="%.6f")
    console.print(f"{len(table)} recommendations for {table['user'].nunique()} users written to {out}")


@app.command()
def generate(
    run: Annotated[Path, typer.Option("--run", help="Run directory of a generative model (DGMRec).")],
    out: Annotated[Path, typer.Option("--out", "-o", help="Folder to write (MMRec format).")],
    device: DeviceOpt = "cpu",
) -> None:
    """Write every modality's completed features (generated rows for missing items), the mask and the id maps."""
    folder = api.generate(run, out, device=device)
    console.print(f"completed features written to {folder}")


@app.command()
def retrieval(
    run: Annotated[Path, typer.Option("--run", help="Run directory of DGMRec.")],
    truth: Annotated[Path | None, typer.Option(
        "--truth", help="Folder with the true <modality>_feat.npy files (default: the run's own dataset, whose "
                        "masked rows still hold their features).")] = None,
    nn_k: Annotated[int, typer.Option("--nn-k", help="Neighbours of the NN-imputation baseline.")] = 10,
    similarity: Annotated[str, typer.Option(
        "--similarity", help="cosine, or centered (cosine after removing the observed mean feature).")] = "cosine",
    out: Annotated[Path | None, typer.Option("--out", help="JSON file for the results.")] = None,
    device: DeviceOpt = "cpu",
) -> None:
    """Cross-modal retrieval (Hit@10/@20, mean rank) of generated features vs every imputation strategy."""
    lr = api.load_run(run, device)
    res = api.retrieval(lr, truth, nn_k=nn_k, similarity=similarity)
    ds = lr.dataset
    chance = res["chance"]
    table = Table(title=f"Cross-modal retrieval ({lr.model.name}, {ds.name}, {similarity} similarity; "
                        f"chance: Hit@10 {chance['hit@10']:.4f}, rank 0.5)")
    for col in ("modality", "missing", "items", "query", "Hit@10", "Hit@20", "rank"):
        table.add_column(col, justify="left" if col in ("modality", "query") else "right")
    names = {"generated": f"{lr.model.name} generated", **{s: f"{s} imputation" for s in res["methods"][1:]}}
    groups = [(str(r["modality"]), str(r["missing"]), str(r["items"]), r) for r in res["rows"]]
    groups += [("all", level, "", summary) for level, summary in sorted(res["by_missing_level"].items())]
    for modality, level, items, values in groups:
        for i, method in enumerate(res["methods"]):
            cells = [f"{values[f'{method}_{key}']:.4f}" if f"{method}_{key}" in values else "–"
                     for key in ("hit@10", "hit@20", "rank")]
            last = i == len(res["methods"]) - 1
            table.add_row(*((modality, level, items) if i == 0 else ("", "", "")), names[method], *cells,
                          end_section=last)
    console.print(table)
    target = out or Path(run) / "retrieval.json"
    target.write_text(json.dumps(res, indent=2))
    console.print(f"results: {target}")


@app.command("add-items")
def add_items(
    run: Annotated[Path, typer.Option("--run", help="Run directory written by `dgmrec train`.")],
    features: Annotated[list[Path], typer.Option(
        "--features", help="Folder of <modality>.npy (or <modality>_feat.npy) files, or such files (repeatable); "
                           "one row per new item, a NaN row where a modality is unobserved.")],
    ids: Annotated[Path | None, typer.Option("--ids", help="Text file with one item id per line.")] = None,
    out: Annotated[Path | None, typer.Option("--out", help="Record folder (default: RUN/added_items).")] = None,
    device: DeviceOpt = "cpu",
) -> None:
    """Add items to a trained run from their features: recommendable at once, without retraining."""
    arrays: dict[str, np.ndarray] = {}
    for path in [f for p in features for f in (sorted(p.glob("*.npy")) if p.is_dir() else [p])]:
        name = path.stem.removesuffix("_feat")
        if name in arrays:
            raise InputError(f"modality '{name}' is given twice", source=str(path))
        try:
            arrays[name] = np.load(path, allow_pickle=False)
        except (OSError, ValueError) as exc:
            raise DataError(f"cannot read features ({exc})", source=str(path)) from None
    if not arrays:
        raise InputError("no .npy feature file found", source="--features")
    item_ids = None
    if ids is not None:
        try:
            item_ids = [line.strip() for line in ids.read_text(encoding="utf-8").splitlines() if line.strip()]
        except (OSError, UnicodeDecodeError) as exc:
            raise DataError(f"cannot read ids ({exc})", source=str(ids)) from None
    res = api.add_items(run, arrays, item_ids=item_ids, out=out, device=device)
    console.print(f"added {len(res.ids)} items (item indices {res.items[0]}..{res.items[-1]}) to {run}; "
                  f"recorded in {res.folder}")


@app.command()
def models() -> None:
    """List the models: what each is and what it needs (features), handles (missing modalities) or writes."""
    from dgmrec.models import available_models, get_model_class

    table = Table(title="models (train with --model NAME; options: dgmrec config show --model NAME)")
    for col in ("model", "item features", "missing-aware", "generates features", "description"):
        table.add_column(col)
    for name in available_models():
        cls = get_model_class(name)
        needs = f"{max(1, cls.min_modalities)}+ modalities" if cls.uses_features else "none"
        table.add_row(name, needs, "yes" if cls.missing_aware else "no", "yes" if cls.generates else "no",
                      cls.summary)
    console.print(table)
    console.print("missing-aware: uses which modalities are missing beyond filling them in (graphs, losses or "
                  "generation); generates features: `dgmrec generate` writes completed feature files")


@app.command()
def demo(
    out: Annotated[Path, typer.Option("--out", "-o", help="Folder for the demo runs.")] = Path("runs/demo"),
    epochs: Annotated[int, typer.Option("--epochs", help="Training epochs per model.")] = 40,
    device: DeviceOpt = "cpu",
) -> None:
    """Train DGMRec and the CF references on the embedded synthetic dataset and print a results table."""
    ds = api.load_dataset(api.SYNTHETIC)
    st = ds.statistics()
    console.print(f"synthetic dataset: {st['users']} users, {st['items']} items, {st['interactions']} interactions, "
                  f"modalities {st['modalities']}, items by number of missing modalities "
                  f"{st['items_by_missing_count']}")
    rows: dict[str, dict[str, float]] = {}
    extra: dict[str, Any] = {}
    # DGMRec with the recommended preset: generated rows that live in the original feature space
    generation = {"preset": "recommended"}
    for name in ("DGMRec", "LightGCN", "MFBPR"):
        extra_options = generation if name == "DGMRec" else {}
        res = api.train(name, ds, out=out / name, overrides={"epochs": epochs, "eval_step": 5, **extra_options},
                        device=device, progress=True, overwrite=True)
        rows[name] = res["test"]
        extra[name] = {"best_epoch": res["best_epoch"], "seconds_per_epoch": res["seconds_per_epoch"]}
    console.print(_metrics_table("Test metrics on the synthetic dataset (full ranking)", rows, row_header="model",
                                 ks=[10, 20]))
    ret = api.retrieval(out / "DGMRec", device=device)
    one = ret["by_missing_level"].get("1", {})
    every = ret["by_missing_level"].get(str(len(ds.modalities)), {})
    console.print(f"DGMRec ran with {', '.join(f'{k}={v}' for k, v in generation.items())}")
    console.print(f"cross-modal retrieval of masked features, Hit@10 (chance {ret['chance']['hit@10']:.4f}): "
                  f"items missing one modality: DGMRec {one.get('generated_hit@10', float('nan')):.4f}, "
                  f"nearest-neighbour imputation {one.get('nn_hit@10', float('nan')):.4f}; items missing every "
                  f"modality: DGMRec {every.get('generated_hit@10', float('nan')):.4f}")
    (out / "summary.json").write_text(json.dumps({"test": rows, "runs": extra, "retrieval": ret}, indent=2))
    console.print(f"runs and summary written to {out}")


# ---------------------------------------------------------------------------------------------- config
@config_app.command("show")
def config_show(
    model: ModelOpt,
    data: Annotated[str | None, typer.Option(
        "--data", "-d", help="Dataset folder, 'synthetic', or a dataset name (baby, tiktok, ...): adds the "
                             "dataset's and the best layers.")] = None,
    config: Annotated[Path | None, typer.Option("--config", help="YAML configuration file.")] = None,
    set_: Annotated[list[str] | None, typer.Option("--set", help="key=value override (repeatable).")] = None,
    no_best: Annotated[bool, typer.Option("--no-best", help="Ignore the shipped per-dataset best config.")] = False,
) -> None:
    """Every configuration key of a model: its resolved value, the layer that set it and what it means.

    Layers, later ones winning: overall < dataset < model < best < file (--config) < set (--set).
    """
    from dgmrec.config import parse_set

    shown = api.explain_config(model, data, config_file=config, overrides=parse_set(set_ or []),
                               use_best=not no_best)
    table = Table(title=f"configuration of {shown.model}" + (f" on {shown.dataset}" if shown.dataset else "")
                  + f" (layers used: {', '.join(shown.layers)})")
    for col in ("key", "value", "layer", "meaning"):
        table.add_column(col, overflow="fold")
    for e in shown.entries:
        value = json.dumps(e.value) if isinstance(e.value, list | bool) or e.value is None else str(e.value)
        table.add_row(e.key, value, e.layer, e.meaning)
    console.print(table)
    for note in shown.notes:
        console.print(f"note: {note}")


@app.command()
def serve(
    run: Annotated[Path, typer.Option("--run", help="Run directory written by `dgmrec train`.")],
    host: Annotated[str, typer.Option("--host", help="Address to listen on.")] = "127.0.0.1",
    port: Annotated[int, typer.Option("--port", min=1, max=65535, help="Port to listen on.")] = 8000,
    ann_above: Annotated[int, typer.Option("--ann-above", help="Similar items from a faiss HNSW index above this "
                                                               "many items; exact below.")] = 100_000,
    max_body_mb: Annotated[float, typer.Option("--max-body-mb", help="Largest request body (MiB).")] = 8.0,
    export: Annotated[Path | None, typer.Option("--export", help="Write the feedback received so far as "
                                                                 "user,item,timestamp CSV to this file and exit "
                                                                 "(for `dgmrec data import`).")] = None,
    export_items: Annotated[Path | None, typer.Option("--export-items", help="Write the added items (ids, "
                                                                             "completed features, mask) into "
                                                                             "this folder and exit.")] = None,
    device: DeviceOpt = "cpu",
) -> None:
    """Serve a run over HTTP: recommendations, similar items, new items, feedback (needs the serve extra)."""
    if export is not None or export_items is not None:
        from dgmrec.serving.store import STORE_NAME, Store, export_feedback
        from dgmrec.serving.store import export_items as write_items

        if not (run / STORE_NAME).is_file():
            raise DataError("no serving store (the run was never served)", source=str(run / STORE_NAME))
        store = Store(run / STORE_NAME)
        try:
            if export is not None:
                console.print(f"{export_feedback(store, export)} interactions -> {export}")
            if export_items is not None:
                console.print(f"{write_items(store, export_items)} added items -> {export_items}")
        finally:
            store.close()
        return
    try:
        from dgmrec.serving.app import serve as run_server
    except ImportError as exc:
        raise InputError(f"the serve extra is not installed ({exc.name} missing): pip install 'dgmrec[serve]'",
                         source="serve") from None
    if max_body_mb <= 0:
        raise InputError("must be positive", source="--max-body-mb")
    run_server(run, host=host, port=port, ann_above=ann_above, max_body_bytes=int(max_body_mb * 1024 * 1024),
               device=device)


# ------------------------------------------------------------------------------------------------ data
@data_app.command("example")
def data_example(
    out: Annotated[Path, typer.Argument(help="Folder to write (created).")],
    seed: Annotated[int, typer.Option("--seed", help="Seed of the drawing.")] = 0,
) -> None:
    """Write a small raw shop catalogue: interactions.csv (string ids), items.csv (descriptions, some empty),
    images/*.png (some items without), some-users.txt. Input for `dgmrec dataset build` (docs/own-catalogue.md)."""
    from dgmrec.data.example import write_example_catalogue

    cat = write_example_catalogue(out, seed=seed)
    console.print(f"wrote {cat.interactions} ({cat.n_interactions} interactions of {cat.n_users} users), "
                  f"{cat.items} ({cat.n_items} items; empty descriptions: {', '.join(cat.empty_descriptions)}) "
                  f"and {cat.images}/ (no image: {', '.join(cat.without_image)}); {cat.users} lists three users")


@data_app.command("check")
def data_check(
    folder: Annotated[Path, typer.Argument(help="MMRec dataset folder.")],
    modalities: ModalitiesOpt = None,
    mask: MaskOpt = None,
    mask_letters: LettersOpt = None,
    setting: SettingOpt = "missing",
) -> None:
    """Validate a dataset folder and print its statistics."""
    ds = api.DatasetSpec(folder, modalities=modalities, mask=mask, mask_letters=mask_letters, setting=setting).load()
    st = ds.statistics()
    table = Table(title=f"dataset {ds.name}: OK")
    table.add_column("statistic")
    table.add_column("value", justify="right")
    for k, v in st.items():
        if k == "feature_scale":  # one row per modality: mean row L2 norm, mean per-dimension std (observed rows)
            for m, sc in v.items():
                table.add_row(f"scale of {m}", f"row L2 norm {sc['mean_row_norm']:.4g}, "
                                               f"per-dimension std {sc['mean_dim_std']:.4g}")
        else:
            table.add_row(k, str(v))
    console.print(table)


@data_app.command("make-mask")
def data_make_mask(
    folder: Annotated[Path, typer.Argument(help="MMRec dataset folder.")],
    ratio: Annotated[float, typer.Option("--ratio", help="Fraction of items that miss at least one modality.")],
    out: Annotated[Path, typer.Option("--out", "-o", help="Mask file to write (.npz plain, or .npy pickle).")],
    seed: Annotated[int, typer.Option("--seed", help="Seed of the missing draw.")] = 1225,
    new_item_seed: Annotated[int, typer.Option("--new-item-seed", help="Seed of the new-item strata.")] = 1111,
    modalities: ModalitiesOpt = None,
) -> None:
    """Generate a missing-modality mask with the reference recipe (cold/warm x new/old strata)."""
    from dgmrec.data.masks import generate_missing_mask, mask_to_key_dict, save_plain_mask

    ds = api.load_dataset(folder, modalities=modalities)
    counts = np.bincount(ds.train[:, 1], minlength=ds.n_items)
    observed = generate_missing_mask(counts, ds.n_modalities, ratio, seed=seed, new_seed=new_item_seed)
    if out.suffix == ".npy":
        np.save(out, mask_to_key_dict(observed, ds.modalities), allow_pickle=True)
    else:
        save_plain_mask(out, observed, ds.modalities)
    miss = (~observed).sum(axis=1)
    console.print(f"mask written to {out}: items by number of missing modalities "
                  f"{ {k: int((miss == k).sum()) for k in range(ds.n_modalities + 1)} }")


@data_app.command("make-new-items")
def data_make_new_items(
    folder: Annotated[Path, typer.Argument(help="MMRec dataset folder.")],
    out: Annotated[Path, typer.Option("--out", "-o", help="<name>_new_items.inter file to write.")],
    fraction: Annotated[float, typer.Option("--fraction", help="Fraction of cold and of warm items.")] = 0.2,
    seed: Annotated[int, typer.Option("--seed", help="Seed of the draw.")] = 1111,
) -> None:
    """Generate the new-item split: training rows of 20 % of the items (cold and warm) are removed."""
    from dgmrec.data.masks import draw_new_items
    from dgmrec.data.mmrec import make_new_item_split, write_inter

    ds = api.load_dataset(folder)
    drawn = draw_new_items(np.bincount(ds.train[:, 1], minlength=ds.n_items), fraction=fraction, seed=seed)
    split = make_new_item_split(ds, drawn)  # decides which drawn items are new items
    write_inter(out, (split.train, ds.valid, ds.test))
    console.print(f"{int(drawn.sum())} items drawn, {int(split.new_items.sum())} of them with training rows are "
                  f"the new items; {len(ds.train) - len(split.train)} training rows removed; written to {out}")


@data_app.command("import")
def data_import(
    interactions: Annotated[Path, typer.Argument(help="CSV/TSV/Parquet with user, item and time columns.")],
    out: Annotated[Path, typer.Option("--out", "-o", help="Folder to write.")],
    name: Annotated[str, typer.Option("--name", help="Dataset name (the .inter stem).")],
    user_column: Annotated[str, typer.Option("--user-column")] = "user",
    item_column: Annotated[str, typer.Option("--item-column")] = "item",
    time_column: Annotated[str, typer.Option("--time-column")] = "timestamp",
) -> None:
    """Remap raw ids and split chronologically per user 8:1:1 into <name>.inter (+ id maps)."""
    from dgmrec.data.mmrec import write_inter
    from dgmrec.data.raw import ITEM_IDS_NAME, USER_IDS_NAME, read_raw_interactions, write_id_table

    raw = read_raw_interactions(interactions, user_column, item_column, time_column or None)
    write_inter(out / f"{name}.inter", raw.splits())
    write_id_table(out / USER_IDS_NAME, raw.user_ids, "userID")
    write_id_table(out / ITEM_IDS_NAME, raw.item_ids, "itemID")
    console.print(f"{len(raw.users)} interactions, {len(raw.user_ids)} users, {len(raw.item_ids)} items "
                  f"-> {out / (name + '.inter')}")


def _mount_optional() -> None:
    try:
        from dgmrec import cli_features
    except ImportError:
        return
    app.add_typer(cli_features.features_app, name="features")
    app.add_typer(cli_features.dataset_app, name="dataset")


_mount_optional()


def _usage_error_types() -> tuple[type[BaseException], ...]:
    """The exception classes the installed typer raises for command-line usage errors.

    typer exposes them through its public ``typer.exceptions`` module (recent releases, which bundle their own
    copy of click) or, in older releases, through ``click``; both are looked up so that neither kind of release
    lets a usage error escape as a traceback.
    """
    import importlib

    types: list[type[BaseException]] = []
    for module, name in (("typer.exceptions", "TyperException"), ("click.exceptions", "ClickException")):
        try:
            types.append(getattr(importlib.import_module(module), name))
        except (ImportError, AttributeError):
            continue
    return tuple(types)


def _usage_line(exc: BaseException) -> str:
    """One line for a usage error: the command path and the problem (typer's message names the option)."""
    message = exc.format_message() if hasattr(exc, "format_message") else str(exc)
    message = " ".join(str(message).split())
    ctx = getattr(exc, "ctx", None)
    where = getattr(ctx, "command_path", "") or "dgmrec"
    return f"error: {where}: {message}"


def _flags_take_no_value(command: Any) -> Any:
    """Give every flag of ``command`` and its subcommands (``--help`` included) an empty metavar, so that help
    lists ``--resume`` rather than ``--resume <bool>`` (recent typer releases print the type of flags)."""
    ctx = command.context_class(command) if hasattr(command, "context_class") else None
    help_option = command.get_help_option(ctx) if ctx is not None and hasattr(command, "get_help_option") else None
    for param in [*command.params, *([help_option] if help_option is not None else [])]:
        if getattr(param, "is_flag", False) and getattr(param, "metavar", None) is None:
            param.metavar = ""
    for sub in getattr(command, "commands", {}).values():
        _flags_take_no_value(sub)
    return command


def _log_to_stderr() -> None:
    """Notes of the library (``logging.getLogger("dgmrec")``) go to stderr as they are."""
    import logging

    class StderrHandler(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            print(self.format(record), file=sys.stderr)  # the current stderr, also when it was replaced

    logger = logging.getLogger("dgmrec")
    if not logger.handlers:
        logger.addHandler(StderrHandler())
        logger.setLevel(logging.INFO)
        logger.propagate = False


def main(argv: list[str] | None = None) -> None:
    """Entry point: run the CLI, turning bad input and usage errors into one line on stderr and exit code 2."""
    usage_errors = _usage_error_types()
    _log_to_stderr()
    try:
        command = _flags_take_no_value(typer.main.get_command(app))
        code = command(args=argv, standalone_mode=False, prog_name="dgmrec")
    except InputError as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(2)
    except (typer.Exit, typer.Abort) as exc:
        sys.exit(getattr(exc, "exit_code", 1))
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(130)
    except usage_errors as exc:
        if type(exc).__name__ == "NoArgsIsHelpError":  # a bare group: show its help
            print(exc.format_message() if hasattr(exc, "format_message") else exc)  # type: ignore[union-attr]
            sys.exit(0)
        print(_usage_line(exc), file=sys.stderr)
        sys.exit(int(getattr(exc, "exit_code", 2)) or 2)
    if isinstance(code, int) and code:  # a command that asked to exit with a status (typer.Exit)
        sys.exit(code)

if __name__ == "__main__":
    main()
