"""Command line for turning raw item content into features and MMRec dataset folders.

Exports two typer apps that the main CLI mounts: ``features_app`` (``dgmrec features text|image``) and
``dataset_app`` (``dgmrec dataset build``). User errors raise :class:`dgmrec.errors.InputError` subclasses.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from dgmrec.errors import InputError
from dgmrec.features.build import InteractionsSpec, build_dataset
from dgmrec.features.encoders import DEFAULT_IMAGE_ENCODER, DEFAULT_TEXT_ENCODER
from dgmrec.features.pipeline import (
    REPORT_JSON,
    REPORT_TXT,
    ImageSource,
    ModalityResult,
    TextSource,
    extract_image_features,
    extract_text_features,
)
from dgmrec.features.tables import TableFormat, parse_columns, parse_sep

features_app = typer.Typer(
    help="Encode item texts and images into <modality>_feat.npy (missing content = all-NaN rows).",
    no_args_is_help=True,
    add_completion=False,
)
dataset_app = typer.Typer(
    help="Build MMRec dataset folders from raw interactions and item content.",
    no_args_is_help=True,
    add_completion=False,
)


@features_app.callback()
def _features_group() -> None:
    """Encode item texts and images into <modality>_feat.npy (missing content = all-NaN rows)."""


@dataset_app.callback()
def _dataset_group() -> None:
    """Build MMRec dataset folders from raw interactions and item content."""


# ----------------------------------------------------------------------------------------------- options
ItemsOpt = Annotated[Path, typer.Option("--items", help="Items table (CSV, TSV or Parquet), one row per item.")]
IdColumnOpt = Annotated[str, typer.Option("--id-column", help="Item id column of the items table.")]
OutOpt = Annotated[Path, typer.Option("--out", help="Output folder.")]
ItemsSepOpt = Annotated[
    str | None,
    typer.Option("--items-sep", help="Items table field separator (tab, comma, pipe, or a character)."),
]
ItemsNoHeaderOpt = Annotated[
    bool,
    typer.Option("--items-no-header", help="The items table has no header line (fields are named 1, 2, ...)."),
]
ItemsColumnsOpt = Annotated[
    str | None,
    typer.Option("--items-columns", help="Comma-separated names of a headerless items table's fields."),
]
ItemsEncodingOpt = Annotated[str, typer.Option("--items-encoding", help="Text encoding of the items table.")]
TextColumnOpt = Annotated[
    list[str] | None,
    typer.Option("--text-column", help="Text column; repeat to join several columns (newline-separated)."),
]
TextDirOpt = Annotated[Path | None, typer.Option("--text-dir", help="Folder with one text file per item.")]
TextPatternOpt = Annotated[str, typer.Option("--text-pattern", help="Text file name pattern inside --text-dir.")]
TextEncodingOpt = Annotated[str, typer.Option("--text-encoding", help="Encoding of the text files.")]
ImageColumnOpt = Annotated[
    str | None,
    typer.Option("--image-column", help="Column with image paths (relative to the items table's folder)."),
]
ImageDirOpt = Annotated[Path | None, typer.Option("--image-dir", help="Folder of item images.")]
ImagePatternOpt = Annotated[str, typer.Option("--image-pattern", help="Image file name pattern inside --image-dir.")]
DeviceOpt = Annotated[str, typer.Option("--device", help="Torch device: cpu or cuda.")]
CacheOpt = Annotated[
    bool,
    typer.Option("--cache/--no-cache", help="Reuse and update the content-hash cache in OUT/feature_cache."),
]
ProgressOpt = Annotated[bool, typer.Option("--progress/--no-progress", help="Show progress bars on a terminal.")]


def _items_format(sep: str | None, no_header: bool, columns: str | None, encoding: str) -> TableFormat:
    return TableFormat(
        sep=parse_sep(sep, "--items-sep"),
        header=not no_header,
        columns=parse_columns(columns, "--items-columns"),
        encoding=encoding,
        option_prefix="items-",
    )


def _text_source(
    columns: list[str] | None, text_dir: Path | None, pattern: str, encoding: str, modality: str
) -> TextSource:
    cols = tuple(columns or ())
    if cols and text_dir is not None:
        raise InputError("give --text-column or --text-dir, not both", source="--text-dir")
    if not cols and text_dir is None:
        raise InputError("give --text-column (repeatable) or --text-dir", source="features text")
    return TextSource(columns=cols, text_dir=text_dir, pattern=pattern, encoding=encoding, modality=modality)


def _image_source(column: str | None, image_dir: Path | None, pattern: str, modality: str) -> ImageSource:
    if column and image_dir is not None:
        raise InputError("give --image-column or --image-dir, not both", source="--image-dir")
    if not column and image_dir is None:
        raise InputError("give --image-column or --image-dir", source="features image")
    return ImageSource(column=column, image_dir=image_dir, pattern=pattern, modality=modality)


def _warn(line: str) -> None:
    typer.echo(line, err=True)


def _print_result(result: ModalityResult, out: Path) -> None:
    typer.echo(result.summary_line())
    n, d = result.features.shape
    typer.echo(
        f"wrote {out / (result.modality + '_feat.npy')} ({n} x {d}), {out / 'item_ids.csv'}, "
        f"{out / REPORT_JSON}, {out / REPORT_TXT}"
    )


# ---------------------------------------------------------------------------------------------- commands
@features_app.command("text")
def features_text(
    items: ItemsOpt,
    id_column: IdColumnOpt,
    out: OutOpt,
    text_column: TextColumnOpt = None,
    text_dir: TextDirOpt = None,
    text_pattern: TextPatternOpt = "{id}.txt",
    text_encoding: TextEncodingOpt = "utf-8",
    encoder: Annotated[
        str,
        typer.Option("--encoder", help="Registered encoder name or a sentence-transformers model folder."),
    ] = DEFAULT_TEXT_ENCODER,
    batch_size: Annotated[int, typer.Option("--batch-size", min=1, help="Texts per encoder call.")] = 64,
    device: DeviceOpt = "cpu",
    modality: Annotated[str, typer.Option("--modality", help="Output modality name.")] = "text",
    items_sep: ItemsSepOpt = None,
    items_no_header: ItemsNoHeaderOpt = False,
    items_columns: ItemsColumnsOpt = None,
    items_encoding: ItemsEncodingOpt = "utf-8",
    cache: CacheOpt = True,
    progress: ProgressOpt = True,
) -> None:
    """Encode item texts into OUT/<modality>_feat.npy; empty texts become all-NaN rows."""
    source = _text_source(text_column, text_dir, text_pattern, text_encoding, modality)
    result, _ = extract_text_features(
        items, id_column, source, out, encoder=encoder,
        items_fmt=_items_format(items_sep, items_no_header, items_columns, items_encoding),
        device=device, batch_size=batch_size, use_cache=cache, progress=progress, log=_warn,
    )  # fmt: skip
    _print_result(result, out)


@features_app.command("image")
def features_image(
    items: ItemsOpt,
    id_column: IdColumnOpt,
    out: OutOpt,
    image_column: ImageColumnOpt = None,
    image_dir: ImageDirOpt = None,
    image_pattern: ImagePatternOpt = "{id}.jpg",
    encoder: Annotated[
        str,
        typer.Option("--encoder", help="Registered encoder name or an image model file (.pt2, TorchScript)."),
    ] = DEFAULT_IMAGE_ENCODER,
    batch_size: Annotated[int, typer.Option("--batch-size", min=1, help="Images per encoder call.")] = 32,
    device: DeviceOpt = "cpu",
    modality: Annotated[str, typer.Option("--modality", help="Output modality name.")] = "image",
    items_sep: ItemsSepOpt = None,
    items_no_header: ItemsNoHeaderOpt = False,
    items_columns: ItemsColumnsOpt = None,
    items_encoding: ItemsEncodingOpt = "utf-8",
    cache: CacheOpt = True,
    progress: ProgressOpt = True,
) -> None:
    """Encode item images into OUT/<modality>_feat.npy; absent or corrupt images become all-NaN rows."""
    source = _image_source(image_column, image_dir, image_pattern, modality)
    result, _ = extract_image_features(
        items, id_column, source, out, encoder=encoder,
        items_fmt=_items_format(items_sep, items_no_header, items_columns, items_encoding),
        device=device, batch_size=batch_size, use_cache=cache, progress=progress, log=_warn,
    )  # fmt: skip
    _print_result(result, out)


@dataset_app.command("build")
def dataset_build(
    interactions: Annotated[
        Path,
        typer.Option("--interactions", help="Interactions table (CSV, TSV, Parquet, or headerless text)."),
    ],
    user_column: Annotated[str, typer.Option("--user-column", help="User id column.")],
    item_column: Annotated[str, typer.Option("--item-column", help="Item id column.")],
    items: ItemsOpt,
    id_column: IdColumnOpt,
    name: Annotated[str, typer.Option("--name", help="Dataset name (the <name>.inter file).")],
    out: OutOpt,
    time_column: Annotated[
        str | None, typer.Option("--time-column", help="Timestamp column (unix seconds or dates).")
    ] = None,
    rating_column: Annotated[str | None, typer.Option("--rating-column", help="Rating column.")] = None,
    min_rating: Annotated[
        float | None, typer.Option("--min-rating", help="Keep interactions with rating >= this value.")
    ] = None,
    sep: Annotated[
        str | None,
        typer.Option("--sep", help="Interactions field separator (tab, comma, pipe, or a character)."),
    ] = None,
    no_header: Annotated[bool, typer.Option("--no-header", help="The interactions file has no header line.")] = False,
    columns: Annotated[
        str | None,
        typer.Option("--columns", help="Comma-separated names of a headerless interactions file's fields."),
    ] = None,
    encoding: Annotated[str, typer.Option("--encoding", help="Text encoding of the interactions file.")] = "utf-8",
    items_sep: ItemsSepOpt = None,
    items_no_header: ItemsNoHeaderOpt = False,
    items_columns: ItemsColumnsOpt = None,
    items_encoding: ItemsEncodingOpt = "utf-8",
    text_column: TextColumnOpt = None,
    text_dir: TextDirOpt = None,
    text_pattern: TextPatternOpt = "{id}.txt",
    text_encoding: TextEncodingOpt = "utf-8",
    image_column: ImageColumnOpt = None,
    image_dir: ImageDirOpt = None,
    image_pattern: ImagePatternOpt = "{id}.jpg",
    text_encoder: Annotated[
        str, typer.Option("--text-encoder", help="Text encoder name or sentence-transformers model folder.")
    ] = DEFAULT_TEXT_ENCODER,
    image_encoder: Annotated[
        str, typer.Option("--image-encoder", help="Image encoder name or model file.")
    ] = DEFAULT_IMAGE_ENCODER,
    text_batch_size: Annotated[int, typer.Option("--text-batch-size", min=1)] = 64,
    image_batch_size: Annotated[int, typer.Option("--image-batch-size", min=1)] = 32,
    device: DeviceOpt = "cpu",
    cache: CacheOpt = True,
    progress: ProgressOpt = True,
) -> None:
    """Write OUT/<name>.inter, <modality>_feat.npy, observed.npz, item_ids.csv, user_ids.csv, report."""
    text = None
    if text_column or text_dir is not None:
        text = _text_source(text_column, text_dir, text_pattern, text_encoding, "text")
    image = None
    if image_column or image_dir is not None:
        image = _image_source(image_column, image_dir, image_pattern, "image")
    spec = InteractionsSpec(
        path=interactions,
        user_column=user_column,
        item_column=item_column,
        time_column=time_column,
        rating_column=rating_column,
        min_rating=min_rating,
        fmt=TableFormat(sep=parse_sep(sep, "--sep"), header=not no_header,
                        columns=parse_columns(columns, "--columns"), encoding=encoding),
    )  # fmt: skip
    result = build_dataset(
        spec, items, id_column, name=name, out=out, text=text, image=image,
        items_fmt=_items_format(items_sep, items_no_header, items_columns, items_encoding),
        text_encoder=text_encoder, image_encoder=image_encoder, device=device,
        text_batch_size=text_batch_size, image_batch_size=image_batch_size,
        use_cache=cache, progress=progress, log=typer.echo,
    )  # fmt: skip
    d = result.report["dataset"]
    typer.echo(
        f"wrote {out}: {name}.inter ({d['n_users']} users, {d['n_items']} items, "
        f"{d['n_interactions']} interactions; train {d['train']} / valid {d['valid']} / test {d['test']}), "
        f"{', '.join(m + '_feat.npy' for m in result.report['modalities'])}, observed.npz, item_ids.csv, "
        f"user_ids.csv, {REPORT_JSON}, {REPORT_TXT}"
    )


def main(argv: list[str] | None = None) -> int:
    """Run the ``features`` and ``dataset`` commands without the main CLI (``python -m dgmrec.cli_features``).

    Parameters
    ----------
    argv:
        Arguments (``sys.argv[1:]`` when None).

    Returns
    -------
    int
        2 for user errors (printed as ``error: <message>``); otherwise the command line exits by itself.
    """
    app = typer.Typer(no_args_is_help=True, add_completion=False)
    app.add_typer(features_app, name="features")
    app.add_typer(dataset_app, name="dataset")
    command = typer.main.get_command(app)
    try:
        command.main(args=argv, prog_name="python -m dgmrec.cli_features", standalone_mode=True)
    except InputError as exc:
        typer.echo(f"error: {exc}", err=True)
        return exc.exit_code
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
