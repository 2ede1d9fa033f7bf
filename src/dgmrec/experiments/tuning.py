"""Hyper-parameter search on the validation split (optuna: TPE sampler, median pruning).

The search is the study's ``tuning:`` section: the model, dataset, setting, seed and base variant of the trials,
the number of trials, the validation metric (the configuration's ``valid_metric``) and the search space. Each
trial is an ordinary run of the study's store (keyed like every run, so a configuration is never trained twice).
While a trial trains, a watcher thread reads the run's ``log.jsonl`` and reports every evaluation's validation
value to optuna; when the median pruner says stop, the training is interrupted (the run keeps its checkpoint).
The optuna study lives in a SQLite file in the store, so a search resumes and several processes can share it.
The best trial's configuration is written as a YAML file that a study can use as a variant (``config_file:``).

The tuner never reads a test metric: log lines are parsed with every ``test*`` key dropped, and the value of a
trial is the best validation value of its log.
"""

from __future__ import annotations

import json
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from dgmrec.errors import ConfigError
from dgmrec.experiments.study import (
    Fingerprints,
    RunLock,
    RunPlan,
    Study,
    _first_variant,
    _Planner,
    execute_run,
    is_complete,
    read_record,
)


def _validation_only(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    """``object_pairs_hook`` that leaves out every test entry of a log line."""
    return {k: v for k, v in pairs if not k.startswith("test")}


def read_validation_curve(log: Path, metric: str, start: int = 0) -> tuple[list[tuple[int, float]], int]:
    """``(epoch, validation metric)`` of every complete evaluation line from byte ``start``; and the new offset."""
    if not log.is_file():
        return [], start
    with log.open("rb") as f:
        f.seek(start)
        data = f.read()
    end = data.rfind(b"\n") + 1  # a line still being written is read next time
    points = []
    for line in data[:end].decode().splitlines():
        if not line.strip():
            continue
        entry = json.loads(line, object_pairs_hook=_validation_only)
        if "valid" in entry and metric in entry["valid"]:
            points.append((int(entry["epoch"]), float(entry["valid"][metric])))
    return points, start + end


@dataclass
class TuningSpec:
    model: str
    dataset: str
    setting: str
    seed: int
    variant: str
    trials: int
    metric: str
    space: dict[str, Any]
    sampler_seed: int
    startup_trials: int
    warmup_steps: int
    output: Path
    name: str


def tuning_spec(study: Study) -> TuningSpec:
    from dgmrec.models import canonical_name

    t = study.tuning
    where = f"{study.path}: tuning"
    if t is None:
        raise ConfigError("the study has no 'tuning' section", source=str(study.path))
    if "model" not in t or "space" not in t:
        raise ConfigError("needs 'model' and 'space'", source=where)
    model = canonical_name(str(t["model"]))
    dataset = str(t.get("dataset", next(iter(study.datasets))))
    if dataset not in study.datasets:
        raise ConfigError(f"dataset {dataset!r} is not in the study", source=where)
    entry = study.datasets[dataset]
    setting = str(t.get("setting", entry.settings[0]))
    space = t["space"]
    if not isinstance(space, Mapping) or not space:
        raise ConfigError("'space' must map configuration keys to {low, high[, log, step]} or a list of values",
                          source=where)
    for key, dist in space.items():
        ok = (isinstance(dist, list) and dist) or (isinstance(dist, Mapping) and (
            "choices" in dist or ("low" in dist and "high" in dist)))
        if not ok:
            raise ConfigError(f"'{key}' must be a list of values or {{low, high[, log, step]}} or {{choices}}",
                              source=f"{where}.space")
    variant = _first_variant(study, model, t.get("variant") or None).name
    pruner = t.get("pruner") or {}
    metric = str(t.get("metric", "recall@20"))
    name = str(t.get("name", f"{study.name}-{model}-{dataset}-{setting}"))
    output = Path(str(t["output"])) if t.get("output") else study.store / "tuning" / f"{name}.yaml"
    if not output.is_absolute():
        output = (study.path.parent / output).resolve()
    return TuningSpec(model=model, dataset=dataset, setting=setting, seed=int(t.get("seed", study.seeds[0])),
                      variant=variant, trials=int(t.get("trials", 20)), metric=metric, space=dict(space),
                      sampler_seed=int(t.get("sampler_seed", 0)),
                      startup_trials=int(pruner.get("startup_trials", 5)),
                      warmup_steps=int(pruner.get("warmup_steps", 0)), output=output, name=name)


def _suggest(trial: Any, key: str, dist: Any) -> Any:
    if isinstance(dist, list):
        return trial.suggest_categorical(key, dist)
    if "choices" in dist:
        return trial.suggest_categorical(key, list(dist["choices"]))
    low, high = dist["low"], dist["high"]
    if isinstance(low, int) and isinstance(high, int) and not dist.get("log_float", False) and \
            not isinstance(dist.get("step", 1), float):
        return trial.suggest_int(key, low, high, step=int(dist.get("step", 1)), log=bool(dist.get("log", False)))
    step = dist.get("step")
    return trial.suggest_float(key, float(low), float(high), step=float(step) if step else None,
                               log=bool(dist.get("log", False)))


class _Watcher:
    """Reports a training run's validation curve to the trial as it grows; asked after every epoch whether the
    training should stop (the trial is pruned)."""

    def __init__(self, trial: Any, log: Path, metric: str) -> None:
        self.trial = trial
        self.log = log
        self.metric = metric
        self.offset = 0
        self.best = float("-inf")
        self.reported: set[int] = set()
        self.pruned = False

    def poll(self) -> bool:
        """Report new evaluations; True when the trial should be pruned."""
        points, self.offset = read_validation_curve(self.log, self.metric, self.offset)
        for epoch, value in points:
            self.best = max(self.best, value)
            if epoch not in self.reported:
                self.reported.add(epoch)
                self.trial.report(value, step=epoch)
                self.pruned = self.pruned or self.trial.should_prune()
        return self.pruned


def _train_trial(study: Study, run: RunPlan, trial: Any, metric: str) -> float:
    import optuna

    from dgmrec.training.trainer import TrainingStopped

    folder = run.folder(study.store)
    log = folder / "log.jsonl"
    while True:
        if is_complete(read_record(study.store, run), run):
            watcher = _Watcher(trial, log, metric)
            watcher.poll()
            return watcher.best
        lock = RunLock(study.store / "locks" / f"{run.key}.lock", study.stale_lock_seconds)
        if lock.acquire():
            break
        time.sleep(1.0)  # the same configuration is training in another process
    watcher = _Watcher(trial, log, metric)
    try:
        # the training asks the watcher after every epoch (in this thread: no signal, nothing asynchronous)
        execute_run(study, run, stop=watcher.poll)
    except TrainingStopped:
        raise optuna.TrialPruned(f"pruned after {len(watcher.reported)} evaluations") from None
    finally:
        lock.release()
    watcher.poll()
    return watcher.best


def _objective(study: Study, spec: TuningSpec) -> Any:
    def objective(trial: Any) -> float:
        entry = study.datasets[spec.dataset]
        base = study.variants[spec.variant]
        overrides = {**base.overrides, **{k: _suggest(trial, k, d) for k, d in spec.space.items()}}
        planner = _Planner(study, Fingerprints(study))
        cell = planner.add("tuning", entry, spec.setting, spec.model, spec.variant, spec.seed, overrides)
        run = planner.runs[cell.key]
        if run.config.get("valid_metric") != spec.metric:
            raise ConfigError(f"metric {spec.metric!r} differs from the runs' valid_metric "
                              f"{run.config.get('valid_metric')!r}; set both alike", source=f"{study.path}: tuning")
        trial.set_user_attr("run_key", run.key)
        trial.set_user_attr("overrides", {k: overrides[k] for k in sorted(overrides)})
        return _train_trial(study, run, trial, spec.metric)

    return objective


def _open(study: Study, spec: TuningSpec) -> Any:
    import optuna

    path = study.store / "tuning" / f"{spec.name}.sqlite"
    path.parent.mkdir(parents=True, exist_ok=True)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    return optuna.create_study(
        study_name=spec.name, storage=f"sqlite:///{path}", direction="maximize", load_if_exists=True,
        sampler=optuna.samplers.TPESampler(seed=spec.sampler_seed),
        pruner=optuna.pruners.MedianPruner(n_startup_trials=spec.startup_trials, n_warmup_steps=spec.warmup_steps))


def _finished(ostudy: Any) -> int:
    import optuna

    states = (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED)
    return len(ostudy.get_trials(deepcopy=False, states=states))


def tune_worker(study: Study) -> None:
    import optuna

    spec = tuning_spec(study)
    ostudy = _open(study, spec)
    remaining = spec.trials - _finished(ostudy)
    if remaining <= 0:
        return
    states = (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED)
    ostudy.optimize(_objective(study, spec), n_trials=remaining,
                    callbacks=[optuna.study.MaxTrialsCallback(spec.trials, states=states)])


def _tune_process(study_path: str) -> None:
    from dgmrec.experiments.study import load_study

    tune_worker(load_study(study_path))


@dataclass
class TuneResult:
    output: Path
    value: float
    params: dict[str, Any]
    trials: int
    pruned: int


def tune(study: Study, workers: int = 1) -> TuneResult:
    """Run (or resume) the study's search until it has ``trials`` finished trials; write the best config."""
    import optuna

    spec = tuning_spec(study)
    if workers <= 1:
        tune_worker(study)
    else:
        import multiprocessing as mp

        _open(study, spec)  # create the storage once before the workers race to
        ctx = mp.get_context("spawn")
        procs = [ctx.Process(target=_tune_process, args=(str(study.path),)) for _ in range(workers)]
        for p in procs:
            p.start()
        for p in procs:
            p.join()
    ostudy = _open(study, spec)
    best = ostudy.best_trial
    pruned = len(ostudy.get_trials(deepcopy=False, states=(optuna.trial.TrialState.PRUNED,)))
    chosen = dict(best.user_attrs.get("overrides", best.params))
    spec.output.parent.mkdir(parents=True, exist_ok=True)
    header = (f"# {spec.model} on {spec.dataset} ({spec.setting}), chosen by `dgmrec study tune` on validation "
              f"{spec.metric} = {best.value:.6f}\n# (trial {best.number}; {_finished(ostudy)} trials, {pruned} "
              f"pruned; TPE seed {spec.sampler_seed}, median pruning). Test metrics were not read.\n")
    spec.output.write_text(header + yaml.safe_dump(chosen, sort_keys=True), encoding="utf-8")
    return TuneResult(output=spec.output, value=float(best.value), params=chosen, trials=_finished(ostudy),
                      pruned=pruned)
