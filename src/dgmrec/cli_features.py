"""Command line for turning raw item content into features and MMRec dataset folders.

Exports two typer apps that the main CLI mounts: ``features_app`` (``dgmrec features text|image``) and
``dataset_app`` (``dgmrec dataset build``). The options of each content kind are declared once
(:data:`SOURCE_OPTIONS`); the ``features <kind>`` commands and the content options of ``dataset build`` are
made from them, so every command loops over the kinds instead of repeating them. User errors raise
:class:`dgmrec.errors.InputError` subclasses.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any

import typer

from dgmrec.data.raw import TableFormat, parse_columns, parse_sep
from dgmrec.errors import InputError
from dgmrec.features.build import InteractionsSpec, build_dataset
from dgmrec.features.output import REPORT_JSON, REPORT_TXT, ModalityResult
from dgmrec.features.pipeline import extract_features
from dgmrec.features.sources import ImageSource, ModalitySource, TextSource

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
Values = dict[str, Any]
REQUIRED = inspect.Parameter.empty


def _param(name: str, annotation: Any, default: Any = REQUIRED) -> inspect.Parameter:
    """One command parameter; typer reads the option from the ``Annotated`` annotation."""
    return inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=default, annotation=annotation)


def _option(name: str, kind: Any, help: str, default: Any = REQUIRED, **settings: Any) -> inspect.Parameter:
    """The option ``--<name with dashes>`` of type ``kind`` (required without ``default``)."""
    option = typer.Option("--" + name.replace("_", "-"), help=help, **settings)
    return _param(name, Annotated[kind, option], default)


def _command(params: list[inspect.Parameter], run: Callable[[Values], None], doc: str) -> Callable[..., None]:
    """A typer command with the signature ``params`` that hands its option values to ``run`` as a dict."""

    def command(**values: Any) -> None:
        run(values)

    command.__signature__ = inspect.Signature(params)  # type: ignore[attr-defined]
    command.__annotations__ = {p.name: p.annotation for p in params}
    command.__doc__ = doc
    return command


@dataclass(frozen=True)
class SourceOptions:
    """The command-line options of one content kind and how their values make its source.

    Attributes
    ----------
    source_class:
        The source class (its ``kind``, default encoder and batch size are used).
    params:
        Where the content is: the options ``--<kind>-column`` and ``--<kind>-dir``, and any others.
    make:
        Option values and modality name -> the source.
    encoder_path:
        What else than a registered name ``--encoder`` may be, for the help.
    unit:
        What the encoder takes, for the help of ``--batch-size`` (``Texts``).
    help:
        Help of the ``features <kind>`` command.
    """

    source_class: type[ModalitySource]
    params: tuple[inspect.Parameter, ...]
    make: Callable[[Values, str], ModalitySource]
    encoder_path: str
    unit: str
    help: str

    @property
    def kind(self) -> str:
        return self.source_class.kind

    def given(self, values: Values) -> bool:
        """Whether the user named this kind's content (a column or a folder)."""
        return bool(values[f"{self.kind}_column"]) or values[f"{self.kind}_dir"] is not None


SOURCE_OPTIONS: tuple[SourceOptions, ...] = (
    SourceOptions(
        TextSource,
        (
            _option("text_column", list[str] | None,
                    "Text column; repeat to join several columns (newline-separated).", None),
            _option("text_dir", Path | None, "Folder with one text file per item.", None),
            _option("text_pattern", str, "Text file name pattern inside --text-dir.", "{id}.txt"),
            _option("text_encoding", str, "Encoding of the text files.", "utf-8"),
        ),
        lambda v, modality: TextSource(columns=tuple(v["text_column"] or ()), text_dir=v["text_dir"],
                                       pattern=v["text_pattern"], encoding=v["text_encoding"], modality=modality),
        encoder_path="a sentence-transformers model folder",
        unit="Texts",
        help="Encode item texts into OUT/<modality>_feat.npy; empty texts become all-NaN rows.",
    ),
    SourceOptions(
        ImageSource,
        (
            _option("image_column", str | None, "Column with image paths (relative to the items table's folder).",
                    None),
            _option("image_dir", Path | None, "Folder of item images.", None),
            _option("image_pattern", str, "Image file name pattern inside --image-dir.", "{id}.jpg"),
        ),
        lambda v, modality: ImageSource(column=v["image_column"], image_dir=v["image_dir"],
                                        pattern=v["image_pattern"], modality=modality),
        encoder_path="an image model file (.pt2, TorchScript)",
        unit="Images",
        help="Encode item images into OUT/<modality>_feat.npy; absent or corrupt images become all-NaN rows.",
    ),
)  # fmt: skip

_ITEMS_PARAMS = [
    _option("items", Path, "Items table (CSV, TSV or Parquet), one row per item."),
    _option("id_column", str, "Item id column of the items table."),
]
_OUT_PARAM = _option("out", Path, "Output folder.")
_ITEMS_FORMAT_PARAMS = [
    _option("items_sep", str | None, "Items table field separator (tab, comma, pipe, or a character).", None),
    _option("items_no_header", bool, "The items table has no header line (fields are named 1, 2, ...).", False),
    _option("items_columns", str | None, "Comma-separated names of a headerless items table's fields.", None),
    _option("items_encoding", str, "Text encoding of the items table.", "utf-8"),
]
_DEVICE_PARAM = _option("device", str, "Torch device: cpu or cuda.", "cpu")
_RUN_PARAMS = [
    _param("cache", Annotated[bool, typer.Option(
        "--cache/--no-cache", help="Reuse and update the content-hash cache in OUT/feature_cache.")], True),
    _param("progress", Annotated[bool, typer.Option(
        "--progress/--no-progress", help="Show progress bars on a terminal.")], True),
]  # fmt: skip


def _items_format(values: Values) -> TableFormat:
    return TableFormat(
        sep=parse_sep(values["items_sep"], "--items-sep"),
        header=not values["items_no_header"],
        columns=parse_columns(values["items_columns"], "--items-columns"),
        encoding=values["items_encoding"],
        option_prefix="items-",
    )


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
def _features_command(opts: SourceOptions) -> Callable[..., None]:
    """``dgmrec features <kind>``: encode one modality of an items table into OUT."""
    cls = opts.source_class
    params = [
        *_ITEMS_PARAMS,
        _OUT_PARAM,
        *opts.params,
        _option("encoder", str, f"Registered encoder name or {opts.encoder_path}.", cls.default_encoder),
        _option("batch_size", int, f"{opts.unit} per encoder call.", cls.default_batch_size, min=1),
        _DEVICE_PARAM,
        _option("modality", str, "Output modality name.", opts.kind),
        *_ITEMS_FORMAT_PARAMS,
        *_RUN_PARAMS,
    ]

    def run(v: Values) -> None:
        source = opts.make(v, v["modality"])
        result, _ = extract_features(
            v["items"], v["id_column"], source, v["out"], encoder=v["encoder"], items_fmt=_items_format(v),
            device=v["device"], batch_size=v["batch_size"], use_cache=v["cache"], progress=v["progress"],
            log=_warn,
        )  # fmt: skip
        _print_result(result, v["out"])

    return _command(params, run, opts.help)


for _opts in SOURCE_OPTIONS:
    features_app.command(_opts.kind)(_features_command(_opts))


def _dataset_build(v: Values) -> None:
    given = [opts for opts in SOURCE_OPTIONS if opts.given(v)]
    if not given:
        names = " or ".join(f"--{opts.kind}-column/--{opts.kind}-dir" for opts in SOURCE_OPTIONS)
        raise InputError(f"give at least one modality: {names}", source="dataset build")
    sources = [opts.make(v, opts.kind) for opts in given]
    spec = InteractionsSpec(
        path=v["interactions"],
        user_column=v["user_column"],
        item_column=v["item_column"],
        time_column=v["time_column"],
        rating_column=v["rating_column"],
        min_rating=v["min_rating"],
        fmt=TableFormat(sep=parse_sep(v["sep"], "--sep"), header=not v["no_header"],
                        columns=parse_columns(v["columns"], "--columns"), encoding=v["encoding"], option_prefix=""),
    )  # fmt: skip
    result = build_dataset(
        spec, v["items"], v["id_column"], name=v["name"], out=v["out"], sources=sources,
        items_fmt=_items_format(v),
        encoders={s.modality: v[f"{s.kind}_encoder"] for s in sources},
        batch_sizes={s.modality: v[f"{s.kind}_batch_size"] for s in sources},
        device=v["device"], use_cache=v["cache"], progress=v["progress"], log=typer.echo,
    )  # fmt: skip
    d = result.report["dataset"]
    out, name = v["out"], v["name"]
    typer.echo(
        f"wrote {out}: {name}.inter ({d['n_users']} users, {d['n_items']} items, "
        f"{d['n_interactions']} interactions; train {d['train']} / valid {d['valid']} / test {d['test']}), "
        f"{', '.join(m + '_feat.npy' for m in result.report['modalities'])}, observed.npz, item_ids.csv, "
        f"user_ids.csv, {REPORT_JSON}, {REPORT_TXT}"
    )


_DATASET_BUILD_PARAMS = [
    _option("interactions", Path, "Interactions table (CSV, TSV, Parquet, or headerless text)."),
    _option("user_column", str, "User id column."),
    _option("item_column", str, "Item id column."),
    *_ITEMS_PARAMS,
    _option("name", str, "Dataset name (the <name>.inter file)."),
    _OUT_PARAM,
    _option("time_column", str | None, "Timestamp column (unix seconds or dates).", None),
    _option("rating_column", str | None, "Rating column.", None),
    _option("min_rating", float | None, "Keep interactions with rating >= this value.", None),
    _option("sep", str | None, "Interactions field separator (tab, comma, pipe, or a character).", None),
    _option("no_header", bool, "The interactions file has no header line.", False),
    _option("columns", str | None, "Comma-separated names of a headerless interactions file's fields.", None),
    _option("encoding", str, "Text encoding of the interactions file.", "utf-8"),
    *_ITEMS_FORMAT_PARAMS,
    *(p for opts in SOURCE_OPTIONS for p in opts.params),
    *(_option(f"{opts.kind}_encoder", str, f"{opts.kind.capitalize()} encoder: registered name or "
              f"{opts.encoder_path}.", opts.source_class.default_encoder) for opts in SOURCE_OPTIONS),
    *(_option(f"{opts.kind}_batch_size", int, f"{opts.unit} per encoder call.", opts.source_class.default_batch_size,
              min=1) for opts in SOURCE_OPTIONS),
    _DEVICE_PARAM,
    *_RUN_PARAMS,
]
dataset_app.command("build")(
    _command(
        _DATASET_BUILD_PARAMS,
        _dataset_build,
        "Write OUT/<name>.inter, <modality>_feat.npy, observed.npz, item_ids.csv, user_ids.csv, report.",
    )
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
