"""``dgmrec study``: run a study (train what its store lacks), report it (tables and figures from the store
alone), tune a model on the validation split. The file format is described in ``docs/studies.md``."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

from dgmrec.errors import InputError

study_app = typer.Typer(no_args_is_help=True, help="Studies: the runs, tables and figures of an experiment.")
console = Console() if sys.stdout.isatty() else Console(width=160)

StudyArg = Annotated[Path, typer.Argument(help="Study file (YAML).")]


@study_app.command("run")
def study_run(
    study_file: StudyArg,
    workers: Annotated[int, typer.Option("--workers", help="Worker processes on this machine.")] = 1,
    device: Annotated[str | None, typer.Option("--device", help="cpu, cuda or auto (default: the study's).")] = None,
    max_runs: Annotated[int | None, typer.Option("--max-runs", help="Stop after training this many runs.")] = None,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Plan only: list what is missing.")] = False,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No progress view.")] = False,
) -> None:
    """Train (and analyse) every run of the study that its store does not hold yet; resumable."""
    from dgmrec.experiments.study import describe, load_study, pending_runs, plan_study, run_study

    study = load_study(study_file)
    if workers < 1:
        raise InputError("must be at least 1", source="--workers")
    if dry_run:  # nothing is written: the store's plan stays that of the last run
        plan = plan_study(study, write=False)
        todo = pending_runs(study, plan)
        console.print(f"study {study.name}: {len(plan.runs)} runs, {len(todo)} to train or analyse")
        for run in todo:
            console.print(f"  {describe(run)}")
        return
    outcome = run_study(study, workers=workers, device=device, max_runs=max_runs, progress=not quiet)
    console.print(f"study {study.name}: trained {len(outcome.trained)} run(s), analysed {len(outcome.analysed)}; "
                  f"store {study.store}")
    if outcome.skipped_locked:
        console.print(f"{len(outcome.skipped_locked)} run(s) held by other workers")
    if outcome.failed:
        raise typer.Exit(1)


@study_app.command("report")
def study_report(
    study_file: StudyArg,
    out: Annotated[Path | None, typer.Option("--out", "-o", help="Folder (default: the study's report).")] = None,
) -> None:
    """Regenerate every table (Markdown, CSV, LaTeX) and figure (PNG) of the study from its store alone."""
    from dgmrec.experiments.report import build_report
    from dgmrec.experiments.study import load_study

    study = load_study(study_file)
    res = build_report(study, out)
    console.print(f"{len(res.paths)} files written to {res.paths[-1].parent}")
    if res.missing_runs:
        console.print(f"warning: {len(res.missing_runs)} run(s) missing or incomplete; run `dgmrec study run "
                      f"{study_file}` to complete the tables")


@study_app.command("tune")
def study_tune(
    study_file: StudyArg,
    workers: Annotated[int, typer.Option("--workers", help="Search processes sharing the SQLite storage.")] = 1,
) -> None:
    """Search the study's 'tuning' space with optuna on the validation metric; write the best configuration."""
    import importlib.util

    from dgmrec.experiments.study import load_study
    from dgmrec.experiments.tuning import tune

    if importlib.util.find_spec("optuna") is None:
        raise InputError("tuning needs optuna: pip install 'dgmrec[experiments]'", source="study tune")
    res = tune(load_study(study_file), workers=workers)
    console.print(f"best validation value {res.value:.4f} after {res.trials} trials ({res.pruned} pruned); "
                  f"configuration written to {res.output}")
