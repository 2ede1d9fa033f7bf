"""Command-line interface (``dgmrec --help``): a thin layer over :mod:`dgmrec.api`.

Bad input of any kind prints one line ``error: <file or field>: <problem>`` and exits with code 2.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated, Any

import numpy as np
import typer
from rich.console import Console
from rich.table import Table

from dgmrec import api
from dgmrec.cli_study import study_app
from dgmrec.errors import DataError, InputError

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Multimodal recommendation with missing modalities (DGMRec and baselines).")
data_app = typer.Typer(no_args_is_help=True, help="Validate datasets and generate masks and splits.")
app.add_typer(data_app, name="data")
app.add_typer(study_app, name="study")
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


def _metrics_table(title: str, rows: dict[str, dict[str, float]], ks: list[int] | None = None,
                   metrics: tuple[str, ...] = ("recall", "ndcg")) -> Table:
    table = Table(title=title)
    table.add_column("split / model")
    keys: list[str] = []
    for r in rows.values():
        keys = sorted((k for k in r if k.split("@")[0] in metrics and (ks is None or int(k.split("@")[1]) in ks)),
                      key=lambda k: (metrics.index(k.split("@")[0]), int(k.split("@")[1])))
        break
    for k in keys:
        table.add_column(k, justify="right")
    for name, r in rows.items():
        table.add_row(name, *[f"{r.get(k, float('nan')):.4f}" for k in keys])
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
    no_best: Annotated[bool, typer.Option("--no-best", help="Ignore the shipped per-dataset best config.")] = False,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No progress bar.")] = False,
) -> None:
    """Train a model, evaluate it with the full-ranking protocol and write RUN_DIR/results.json."""
    from dgmrec.config import parse_set

    spec = api.DatasetSpec(data, modalities=modalities, mask=mask, mask_letters=mask_letters, setting=setting)
    results = api.train(model, spec, out=out, config_file=config, overrides=parse_set(set_ or []), seed=seed,
                        device=device, resume=resume, progress=not quiet, use_best=not no_best)
    rows = {"valid": results["valid"], "test": results["test"]}
    if "test_new_items" in results:
        rows["test (new items only)"] = results["test_new_items"]
    console.print(_metrics_table(f"{results['model']} on {results['dataset']} (best epoch {results['best_epoch']}, "
                                 f"{results['epochs_run']} epochs, {results['seconds_per_epoch']:.2f} s/epoch)",
                                 rows))
    console.print(f"results: {Path(out) / 'results.json'}")


def _read_users(path: Path) -> list[int]:
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise DataError(f"cannot read users file ({exc})", source=str(path)) from None
    users = []
    for lineno, line in enumerate(text.splitlines(), 1):
        tok = line.strip().split(",")[0].strip()
        if not tok or (lineno == 1 and not tok.lstrip("-").isdigit()):
            continue  # blank line or header
        if not tok.lstrip("-").isdigit():
            raise DataError(f"line {lineno}: {tok!r} is not an integer user id", source=str(path))
        users.append(int(tok))
    return users


@app.command()
def recommend(
    run: Annotated[Path, typer.Option("--run", help="Run directory written by `dgmrec train`.")],
    k: Annotated[int, typer.Option("--k", help="Items per user.")] = 10,
    users: Annotated[Path | None, typer.Option("--users", help="File with one user id per line.")] = None,
    exclude: Annotated[str, typer.Option("--exclude",
                                         help="train (the protocol's mask), seen (any split) or none.")] = "seen",
    device: DeviceOpt = "cpu",
) -> None:
    """Print top-K recommendations as CSV: user,rank,item,score."""
    table = api.recommend(run, k=k, users=_read_users(users) if users else None, exclude=exclude, device=device)
    table.to_csv(sys.stdout, index=False, float_format="%.6f")


@app.command()
def generate(
    run: Annotated[Path, typer.Option("--run", help="Run directory of a generative model (DGMRec).")],
    out: Annotated[Path, typer.Option("--out", "-o", help="Folder to write (MMRec format).")],
    device: DeviceOpt = "cpu",
) -> None:
    """Write every modality's completed features (generated rows for missing items) and the mask."""
    folder = api.generate(run, out, device=device)
    console.print(f"completed features written to {folder}")


@app.command()
def retrieval(
    run: Annotated[Path, typer.Option("--run", help="Run directory of DGMRec.")],
    truth: Annotated[Path | None, typer.Option(
        "--truth", help="Folder with the true <modality>_feat.npy files [default: the run's own dataset, whose "
                        "masked rows still hold their features].")] = None,
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
    out: Annotated[Path | None, typer.Option("--out", help="Record folder [default: RUN/added_items].")] = None,
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
    """List the available models."""
    from dgmrec.models import available_models

    for name in available_models():
        console.print(name)


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
    # DGMRec with the generation options whose generated rows live in the original feature space
    generation = {"generation_space": "raw", "recon_target": "original", "decoder_fit": "least_squares_generated"}
    for name in ("DGMRec", "LightGCN", "MFBPR"):
        extra_options = generation if name == "DGMRec" else {}
        res = api.train(name, ds, out=out / name, overrides={"epochs": epochs, "eval_step": 5, **extra_options},
                        device=device, progress=True)
        rows[name] = res["test"]
        extra[name] = {"best_epoch": res["best_epoch"], "seconds_per_epoch": res["seconds_per_epoch"]}
    console.print(_metrics_table("Test metrics on the synthetic dataset (full ranking)", rows, ks=[10, 20]))
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


# ------------------------------------------------------------------------------------------------ data
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
    from dgmrec.data.mmrec import write_inter

    ds = api.load_dataset(folder)
    counts = np.bincount(ds.train[:, 1], minlength=ds.n_items)
    new = draw_new_items(counts, fraction=fraction, seed=seed)
    keep = ~new[ds.train[:, 1]]
    write_inter(out, (ds.train[keep], ds.valid, ds.test))
    console.print(f"{int(new.sum())} new items; {int((~keep).sum())} training rows removed; written to {out}")


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


def main(argv: list[str] | None = None) -> None:
    """Entry point: run the CLI, turning bad input and usage errors into one line on stderr and exit code 2."""
    usage_errors = _usage_error_types()
    try:
        code = app(args=argv, standalone_mode=False, prog_name="dgmrec")
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
