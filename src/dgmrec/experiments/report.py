"""Tables (Markdown, CSV, LaTeX) and figures (PNG) of a study, regenerated from its store alone.

``build_report(study)`` reads the stored plan (cells and dataset fingerprints), the run records and the
post-training analysis files; it never trains and never opens a dataset. Tables are byte-for-byte
deterministic (rows and columns in study order, fixed float formats, sorted keys); PNGs are written without a
timestamp or software tag. Every table says that model selection is on the validation split.
"""

from __future__ import annotations

import csv
import io
import json
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from dgmrec.experiments import analyses as an
from dgmrec.experiments.study import (
    SENSITIVITY_KEYS,
    Analysis,
    Cell,
    Plan,
    Study,
    is_complete,
    plan_study,
    read_record,
)

DIGITS = 4


def selection_note(valid_metric: str) -> str:
    return (f"Selection on validation: every run reports the test metrics of its epoch with the best validation "
            f"{valid_metric} (early stopping on validation as well); no epoch or hyper-parameter is chosen on the "
            f"test split.")


# ============================================================================================= tables
@dataclass(frozen=True)
class Percent:
    value: float


@dataclass(frozen=True)
class PValue:
    value: float


@dataclass
class Table:
    """A table: ``rows`` start with their label; values are None, str, float, Stat, Percent or PValue."""

    name: str
    title: str
    caption: str
    header: list[str]
    rows: list[list[Any]]
    bold: set[tuple[int, int]] = field(default_factory=set)


def _fmt(v: Any, digits: int = DIGITS, latex: bool = False) -> str:
    if v is None:
        return "–" if not latex else "--"
    if isinstance(v, str):
        return v
    if isinstance(v, an.Stat):
        digits = digits if v.digits is None else v.digits
        if v.n > 1 and not math.isnan(v.std):
            pm = " $\\pm$ " if latex else " ± "
            return f"{v.mean:.{digits}f}{pm}{v.std:.{digits}f}"
        return f"{v.mean:.{digits}f}"
    if isinstance(v, Percent):
        if math.isnan(v.value):
            return "–" if not latex else "--"
        return f"{v.value:.2f}\\%" if latex else f"{v.value:.2f}%"
    if isinstance(v, PValue):
        if math.isnan(v.value):
            return "–" if not latex else "--"
        return f"{v.value:.2e}" if v.value < 1e-3 else f"{v.value:.3f}"
    if isinstance(v, int):
        return str(v)
    if isinstance(v, float):
        return "–" if math.isnan(v) else f"{v:.{digits}f}"
    return str(v)


def to_markdown(t: Table) -> str:
    lines = [f"### {t.title}", "", t.caption, ""]
    lines.append("| " + " | ".join(t.header) + " |")
    lines.append("|" + "|".join(["---"] + ["---:"] * (len(t.header) - 1)) + "|")
    for r, row in enumerate(t.rows):
        cells = [_fmt(v) for v in row]
        cells = [f"**{c}**" if (r, j) in t.bold else c for j, c in enumerate(cells)]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def to_csv(t: Table) -> str:
    """One column per header entry; a column holding mean ± std gets a second ``<name> std`` column."""
    stat_cols = {j for row in t.rows for j, v in enumerate(row) if isinstance(v, an.Stat)}
    header: list[str] = []
    for j, h in enumerate(t.header):
        header.append(h)
        if j in stat_cols:
            header += [f"{h} std", f"{h} n"]
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(header)
    for row in t.rows:
        out: list[str] = []
        for j, v in enumerate(row):
            if isinstance(v, an.Stat):
                out += [f"{v.mean:.6f}", "" if math.isnan(v.std) else f"{v.std:.6f}", str(v.n)]
                continue
            if isinstance(v, Percent | PValue):
                out.append("" if math.isnan(v.value) else f"{v.value:.6g}")
            elif isinstance(v, float):
                out.append("" if math.isnan(v) else f"{v:.6f}")
            else:
                out.append("" if v is None else str(v))
            if j in stat_cols:
                out += ["", ""]
        w.writerow(out)
    return buf.getvalue()


def _tex_escape(s: str) -> str:
    for a, b in (("\\", "\\textbackslash{}"), ("&", "\\&"), ("%", "\\%"), ("#", "\\#"), ("_", "\\_"),
                 ("±", "$\\pm$"), ("λ", "$\\lambda$"), ("α", "$\\alpha$"), ("–", "--")):
        s = s.replace(a, b)
    return s


def to_latex(t: Table) -> str:
    lines = ["\\begin{table}[t]", "\\centering", "\\small",
             f"\\caption{{{_tex_escape(t.title)}. {_tex_escape(t.caption)}}}",
             f"\\label{{tab:{t.name}}}",
             "\\begin{tabular}{l" + "r" * (len(t.header) - 1) + "}", "\\toprule",
             " & ".join(_tex_escape(h) for h in t.header) + " \\\\", "\\midrule"]
    for r, row in enumerate(t.rows):
        cells = []
        for j, v in enumerate(row):
            c = _fmt(v, latex=True) if not isinstance(v, str) else _tex_escape(v)
            cells.append(f"\\textbf{{{c}}}" if (r, j) in t.bold else c)
        lines.append(" & ".join(cells) + " \\\\")
    lines += ["\\bottomrule", "\\end{tabular}", "\\end{table}"]
    return "\n".join(lines) + "\n"


def write_table(t: Table, out: Path) -> list[Path]:
    paths = []
    for ext, text in (("md", to_markdown(t)), ("csv", to_csv(t)), ("tex", to_latex(t))):
        p = out / f"{t.name}.{ext}"
        p.write_text(text, encoding="utf-8")
        paths.append(p)
    return paths


# ============================================================================================ figures
def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    plt.rcParams["svg.hashsalt"] = "dgmrec"
    return plt


def save_figure(fig: Any, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=110, metadata={"Software": None})
    _pyplot().close(fig)
    return path


def _metric_label(metric: str) -> str:
    name, k = metric.split("@")
    return {"recall": "Recall", "ndcg": "NDCG", "precision": "Precision", "map": "MAP",
            "hit": "Hit"}.get(name, name) + f"@{k}"


# ============================================================================================ context
class Context:
    """The study's plan and store as the builders see them."""

    def __init__(self, study: Study, plan: Plan, out: Path) -> None:
        self.study = study
        self.plan = plan
        self.out = out
        self.missing: set[str] = set()
        self._results: dict[str, dict[str, Any] | None] = {}

    def folder(self, key: str) -> Path:
        return self.plan.runs[key].folder(self.study.store)

    def results(self, key: str) -> dict[str, Any] | None:
        if key not in self._results:
            run = self.plan.runs[key]
            record = read_record(self.study.store, run)
            path = self.folder(key) / "results.json"
            if record is None or record.get("status") != "done" or not path.is_file():
                self._results[key] = None
                self.missing.add(key)
            else:
                if not is_complete(record, run):
                    self.missing.add(key)
                self._results[key] = json.loads(path.read_text())
        return self._results[key]

    def post(self, key: str, filename: str) -> dict[str, Any] | None:
        if self.results(key) is None:
            return None
        path = self.folder(key) / filename
        if not path.is_file():
            self.missing.add(key)
            return None
        return json.loads(path.read_text())

    def values(self, cells: Sequence[Cell], split: str, metric: str) -> list[float]:
        out = []
        for c in cells:
            r = self.results(c.key)
            if r is not None and metric in r.get(split, {}):
                out.append(float(r[split][metric]))
        return out

    def stat(self, cells: Sequence[Cell], split: str, metric: str) -> an.Stat | None:
        return an.Stat.of(self.values(cells, split, metric))

    @property
    def valid_metric(self) -> str:
        for key in sorted(self.plan.runs):
            r = self.results(key)
            if r is not None:
                return str(r.get("valid_metric", "recall@20"))
        return "recall@20"


def _datasets(ctx: Context, a: Analysis) -> list[str]:
    names = a.options.get("datasets")
    return [d for d in ctx.study.datasets if names is None or d in names]


def _columns(ctx: Context, a: Analysis) -> list[tuple[str, str]]:
    """(dataset, setting) pairs in study order."""
    return [(d, s) for d in _datasets(ctx, a) for s in ctx.study.datasets[d].settings]


def _rows(ctx: Context, a: Analysis, models: Sequence[str] | None = None) -> list[tuple[str, str, str]]:
    """(model, variant, label) rows of the main grid in study order."""
    models = models if models is not None else (a.options.get("models") or ctx.study.models)
    names = a.options.get("variants")
    pairs = [(m, v.name) for m in models for v in ctx.study.variants.values()
             if v.applies(m) and (names is None or v.name in names) and m in ctx.study.models]
    count: dict[str, int] = {}
    for m, _ in pairs:
        count[m] = count.get(m, 0) + 1
    return [(m, v, m if count[m] == 1 else f"{m} ({v})") for m, v in pairs]


def _seed_note(ctx: Context, cells: Sequence[Cell] | None = None) -> str:
    seeds = list(dict.fromkeys(c.seed for c in cells)) if cells else ctx.study.seeds
    return f"mean ± sample std over seeds {', '.join(map(str, seeds))}" if len(seeds) > 1 else f"seed {seeds[0]}"


def _ds_label(d: str, s: str, ctx: Context) -> str:
    return f"{d} ({s})" if len(ctx.study.datasets[d].settings) > 1 or s != "missing" else d


# =========================================================================================== builders
def build_overall(ctx: Context, a: Analysis, stem: str) -> list[Path]:
    o = a.options
    split, metrics = o["split"], list(o["metrics"])
    rows = _rows(ctx, a)
    paths: list[Path] = []
    settings = [s for s in ("missing", "new-items") if any(s in ctx.study.datasets[d].settings
                                                           for d in _datasets(ctx, a))]
    for setting in settings:
        datasets = [d for d in _datasets(ctx, a) if setting in ctx.study.datasets[d].settings]
        header = ["Model"] + [f"{d} {_short(m)}" for d in datasets for m in metrics]
        cell_sets = {(m, v): {d: ctx.plan.select("main", dataset=d, setting=setting, model=m, variant=v)
                              for d in datasets} for m, v, _ in rows}
        body: list[list[Any]] = []
        for m, v, label in rows:
            body.append([label] + [ctx.stat(cell_sets[(m, v)][d], split, met) for d in datasets for met in metrics])
        improv: list[Any] = ["Improv."]
        p_users: list[Any] = ["p (users, Wilcoxon)"]
        p_seeds: list[Any] = ["p (seeds, paired t)"]
        bold: set[tuple[int, int]] = set()
        j = 0
        for d in datasets:
            for met in metrics:
                j += 1
                means = [(body[r][j].mean if body[r][j] is not None else -math.inf, r) for r in range(len(rows))]
                best, other = _best_pair(means, rows, o["focus"])
                if best is None or other is None:
                    improv.append(None)
                    p_users.append(None)
                    p_seeds.append(None)
                    continue
                top = _best_pair(means, rows, "")[0]
                bold.add((best if top is None else top, j))
                improv.append(Percent(an.improvement(body[best][j].mean, body[other][j].mean)))
                ca, cb = cell_sets[rows[best][:2]][d], cell_sets[rows[other][:2]][d]
                p_users.append(_p_users(ctx, ca, cb, split, met))
                sa, sb = _paired_seeds(ctx, ca, cb, split, met)
                p_seeds.append(PValue(an.ttest_seeds(sa, sb)))
        body += [improv, p_users, p_seeds]
        what = "focus model " + o["focus"] if o["focus"] else "the best row"
        caption = (f"{SPLIT_NAMES.get(split, split)} {'/'.join(_short(m) for m in metrics)}, full ranking, "
                   f"{_seed_note(ctx)}. "
                   f"Improv.: {what} over the best row of another model, in % of the latter (best values in "
                   f"bold). p (users): two-sided Wilcoxon signed-rank test over users of the per-user metric "
                   f"(averaged over seeds) between those two rows; p (seeds): two-sided paired t-test over seeds "
                   f"(– with one seed). {selection_note(ctx.valid_metric)}")
        t = Table(name=f"{stem}_{setting}", title=f"Overall comparison, {setting} setting", caption=caption,
                  header=header, rows=body, bold=bold)
        paths += write_table(t, ctx.out)
    return paths


#: the splits of a run's results.json, as tables name them
SPLIT_NAMES = {"valid": "Validation", "test": "Test", "test_new_items": "Hybrid (new-item truth, all items ranked)",
               "test_cold": "Cold (new items ranked)", "test_warm": "Warm (old items ranked)"}
COLD_SPLITS = ("valid", "test", "test_new_items", "test_cold", "test_warm")


def build_cold_start(ctx: Context, a: Analysis, stem: str) -> list[Path]:
    """New-item setting: validation, reference test, hybrid, cold and warm metrics side by side per row."""
    metrics = list(a.options["metrics"])
    datasets = [d for d in _datasets(ctx, a) if "new-items" in ctx.study.datasets[d].settings]
    if not datasets:
        return []
    short = {"valid": "valid", "test": "test", "test_new_items": "hybrid", "test_cold": "cold", "test_warm": "warm"}
    header = ["Model"] + [f"{d} {short[s]} {_short(m)}" for d in datasets for m in metrics for s in COLD_SPLITS]
    body: list[list[Any]] = []
    for m, v, label in _rows(ctx, a):
        row: list[Any] = [label]
        for d in datasets:
            cells = ctx.plan.select("main", dataset=d, setting="new-items", model=m, variant=v)
            row += [ctx.stat(cells, s, met) for met in metrics for s in COLD_SPLITS]
        body.append(row)
    caption = ("New-item setting. valid: validation split; test: the reference new-item test set (original test "
               "plus the new items' former training interactions); hybrid: every item ranked, truth = test "
               "interactions on new items; cold: only new items ranked; warm: only old items ranked, truth on "
               f"old items. Full ranking, training items masked, {_seed_note(ctx)}. "
               f"{selection_note(ctx.valid_metric)}")
    t = Table(name=stem, title="Cold start: new items", caption=caption, header=header, rows=body)
    return write_table(t, ctx.out)


def _short(metric: str) -> str:
    name, k = metric.split("@")
    return {"recall": "R", "ndcg": "N", "precision": "P", "map": "MAP", "hit": "H"}.get(name, name) + f"@{k}"


def _best_pair(means: list[tuple[float, int]], rows: Sequence[tuple[str, str, str]], focus: str
               ) -> tuple[int | None, int | None]:
    ranked = sorted((m for m in means if m[0] > -math.inf), key=lambda t: (-t[0], t[1]))
    if not ranked:
        return None, None
    if focus:
        mine = [r for r in ranked if rows[r[1]][0] == focus]
        if not mine:
            return None, None
        best = mine[0][1]
    else:
        best = ranked[0][1]
    others = [r for r in ranked if rows[r[1]][0] != rows[best][0]]
    return best, (others[0][1] if others else None)


def _p_users(ctx: Context, cells_a: Sequence[Cell], cells_b: Sequence[Cell], split: str, metric: str) -> PValue:
    """Two-sided Wilcoxon signed-rank p over users of two rows (each row's stored runs averaged over seeds)."""
    ua, ub = an.paired_user_vectors([ctx.folder(c.key) for c in cells_a if ctx.results(c.key)],
                                    [ctx.folder(c.key) for c in cells_b if ctx.results(c.key)], split, metric)
    return PValue(an.wilcoxon_users(ua, ub))


def _paired_seeds(ctx: Context, ca: Sequence[Cell], cb: Sequence[Cell], split: str, metric: str
                  ) -> tuple[list[float], list[float]]:
    by_seed_b = {c.seed: c for c in cb}
    a_vals, b_vals = [], []
    for c in ca:
        if c.seed in by_seed_b:
            va, vb = ctx.values([c], split, metric), ctx.values([by_seed_b[c.seed]], split, metric)
            if va and vb:
                a_vals.append(va[0])
                b_vals.append(vb[0])
    return a_vals, b_vals


def build_by_missing_level(ctx: Context, a: Analysis, stem: str) -> list[Path]:
    plt = _pyplot()
    ks = [int(k) for k in a.options["k"]]
    rows = _rows(ctx, a)
    paths: list[Path] = []
    for d, s in _columns(ctx, a):
        levels: list[str] = []
        data: dict[tuple[str, str], list[dict[str, Any]]] = {}
        for m, v, _ in rows:
            stored = [ctx.post(c.key, an.BY_LEVEL_FILE)
                      for c in ctx.plan.select("main", dataset=d, setting=s, model=m, variant=v)]
            data[(m, v)] = [x for x in stored if x is not None]
            for x in data[(m, v)]:
                levels = sorted(set(levels) | {g for g in x["groups"] if g != "all"}, key=int)
        levels_all = [*levels, "all"]
        for k in ks:
            metric = f"recall@{k}"
            header = ["Model"] + [f"{lv} missing" if lv != "all" else "all items" for lv in levels_all]
            body = []
            stats: dict[str, list[an.Stat | None]] = {}
            for m, v, label in rows:
                vals = [an.Stat.of([x["groups"][lv][metric] for x in data[(m, v)] if lv in x["groups"]])
                        for lv in levels_all]
                stats[label] = vals
                body.append([label, *vals])
            users = ["users"]
            for lv in levels_all:
                n = [x["groups"][lv]["users"] for xs in data.values() for x in xs if lv in x["groups"]]
                users.append(str(n[0]) if n else None)
            body.append(users)
            t = Table(name=f"{stem}_{_slug(d)}_{s}_at{k}", title=f"Recall@{k} by number of missing modalities, "
                      f"{d} ({s} setting)",
                      caption=(f"Test interactions grouped by how many modalities their item misses; every user "
                               f"ranked against all items (training items masked); Recall@{k} of a group averaged "
                               f"over the users with test items in it (row 'users'); {_seed_note(ctx)}. "
                               f"{selection_note(ctx.valid_metric)}"),
                      header=header, rows=body)
            paths += write_table(t, ctx.out)
            fig, ax = plt.subplots(figsize=(max(6.0, 1.4 * len(levels_all) + 2), 4.2))
            width = 0.8 / max(1, len(stats))
            x = np.arange(len(levels_all))
            for i, (label, vals) in enumerate(stats.items()):
                means = [st.mean if st else np.nan for st in vals]
                errs = [st.std if st and st.n > 1 else 0.0 for st in vals]
                ax.bar(x + (i - (len(stats) - 1) / 2) * width, means, width, yerr=errs, capsize=2, label=label)
            ax.set_xticks(x, [f"{lv} missing" if lv != "all" else "all items" for lv in levels_all])
            ax.set_xlabel("number of missing modalities of the test item")
            ax.set_ylabel(f"Recall@{k} (test)")
            ax.set_title(f"Recall@{k} by missing level, {d} ({s})")
            ax.legend(fontsize=8, ncol=2)
            paths.append(save_figure(fig, ctx.out / f"{stem}_{_slug(d)}_{s}_at{k}.png"))
    return paths


def _slug(s: str) -> str:
    return "".join(c if c.isalnum() or c in "-_" else "-" for c in s)


def _param_cells(ctx: Context, a: Analysis) -> list[Cell]:
    return [c for c in ctx.plan.cells if c.group == a.label]


def build_missing_ratio(ctx: Context, a: Analysis, stem: str) -> list[Path]:
    plt = _pyplot()
    o = a.options
    cells = _param_cells(ctx, a)
    ratios = sorted({float(c.value) for c in cells})
    models = list(dict.fromkeys(c.model for c in cells))
    paths: list[Path] = []
    for metric in o["metrics"]:
        absolute: dict[str, list[an.Stat | None]] = {}
        drops: dict[str, list[float]] = {}
        for m in models:
            absolute[m] = [ctx.stat([c for c in cells if c.model == m and float(c.value) == r], "test", metric)
                           for r in ratios]
            base = absolute[m][0].mean if ratios and ratios[0] == 0.0 and absolute[m][0] else float("nan")
            drops[m] = [an.relative_drop(base, st.mean) if st else float("nan") for st in absolute[m]]
        header = ["Model"] + [f"{r:.0%}" for r in ratios]
        body_abs: list[list[Any]] = [[m, *absolute[m]] for m in models]
        focus = o["focus"]
        if focus in models and len(models) > 1:
            improv: list[Any] = [f"Improv. ({focus} over the best other)"]
            p_users: list[Any] = ["p (users, Wilcoxon)"]
            for j, r in enumerate(ratios):
                means = {m: st.mean for m in models if (st := absolute[m][j]) is not None}
                others = [m for m in means if m != focus]
                if focus not in means or not others:
                    improv.append(None)
                    p_users.append(None)
                    continue
                best = max(others, key=means.__getitem__)
                improv.append(Percent(an.improvement(means[focus], means[best])))
                at = [c for c in cells if float(c.value) == r]
                p_users.append(_p_users(ctx, [c for c in at if c.model == focus], [c for c in at if c.model == best],
                                        "test", metric))
            body_abs += [improv, p_users]
        body_drop = [[m, *[Percent(v) for v in drops[m]]] for m in models]
        note = (f"Dataset {o['dataset']} ({o['setting']} setting); masks regenerated at each ratio with seed "
                f"{o['mask_seed']} (new-item strata seed {o['new_item_seed']}) and shared by all models; training "
                f"seed {cells[0].seed if cells else '–'}. {selection_note(ctx.valid_metric)}")
        t1 = Table(name=f"{stem}_{_short(metric)}_absolute".replace("@", ""),
                   title=f"Test {_metric_label(metric)} by missing ratio", caption=note, header=header,
                   rows=body_abs)
        t2 = Table(name=f"{stem}_{_short(metric)}_drop".replace("@", ""),
                   title=f"Relative drop of test {_metric_label(metric)} from each model's own 0 % result",
                   caption="(value at 0 % − value) / value at 0 %. " + note, header=header, rows=body_drop)
        paths += write_table(t1, ctx.out) + write_table(t2, ctx.out)
        fig, axes = plt.subplots(1, 2, figsize=(10, 4))
        xs = [100 * r for r in ratios]
        for m in models:
            axes[0].plot(xs, [st.mean if st else np.nan for st in absolute[m]], marker="o", label=m)
            axes[1].plot(xs, drops[m], marker="o", label=m)
        axes[0].set_ylabel(f"{_metric_label(metric)} (test)")
        axes[0].set_title(f"{_metric_label(metric)} by missing ratio ({o['dataset']})")
        axes[1].set_ylabel("relative drop from 0 % (%)")
        axes[1].set_title("Relative drop from each model's 0 % result")
        for ax in axes:
            ax.set_xlabel("items with a missing modality (%)")
            ax.set_xticks(xs)
            ax.legend(fontsize=8)
            ax.grid(alpha=0.3)
        paths.append(save_figure(fig, ctx.out / f"{stem}_{_short(metric).replace('@', '')}.png"))
    return paths


def build_ablation(ctx: Context, a: Analysis, stem: str) -> list[Path]:
    o = a.options
    cells = _param_cells(ctx, a)
    variants = ["DGMRec", *o["variants"]]
    datasets = list(dict.fromkeys(c.dataset for c in cells))
    header = ["Variant"] + [f"{d} {_short(m)}{part}" for d in datasets for m in o["metrics"]
                            for part in ("", " change", " p (users)")]
    full = {d: [c for c in cells if c.value == "DGMRec" and c.dataset == d] for d in datasets}
    full_stats = {(d, m): ctx.stat(full[d], "test", m) for d in datasets for m in o["metrics"]}
    body = []
    for v in variants:
        label = "DGMRec (full)" if v == "DGMRec" else v
        row: list[Any] = [label]
        for d in datasets:
            mine = [c for c in cells if c.value == v and c.dataset == d]
            for m in o["metrics"]:
                st, base = ctx.stat(mine, "test", m), full_stats[(d, m)]
                if v == "DGMRec" or st is None or base is None:
                    row += [st, None, None]
                    continue
                row += [st, Percent(an.improvement(st.mean, base.mean)), _p_users(ctx, mine, full[d], "test", m)]
        body.append(row)
    overrides = "; ".join(f"{name}: " + ", ".join(f"{k}={val}" for k, val in over.items())
                          for name, over in _ablation_overrides(o["variants"]).items())
    caption = (f"{o['model']} variants with parts switched off ({overrides}). A switch that the base configuration "
               f"already sets to 0 leaves that variant equal to the full model. change: the variant's test metric "
               f"against the full model's, in % of the latter; p (users): two-sided Wilcoxon signed-rank test over "
               f"users of the per-user test metric (averaged over seeds), variant against full model. "
               f"{_seed_note(ctx, cells)}. {selection_note(ctx.valid_metric)}")
    t = Table(name=stem, title=f"Ablation of {o['model']}", caption=caption, header=header, rows=body)
    return write_table(t, ctx.out)


def _ablation_overrides(names: Sequence[str]) -> dict[str, dict[str, Any]]:
    from dgmrec.experiments.study import ABLATIONS

    return {n: ABLATIONS[n] for n in names}


def build_sensitivity(ctx: Context, a: Analysis, stem: str) -> list[Path]:
    plt = _pyplot()
    o = a.options
    cells = _param_cells(ctx, a)
    datasets = list(dict.fromkeys(c.dataset for c in cells))
    paths: list[Path] = []
    base_cells = [c for c in cells if c.param == "base"]
    base_of = {d: [c for c in base_cells if c.dataset == d] for d in datasets}
    for param, values in o["params"].items():
        keys = SENSITIVITY_KEYS.get(param, (param,))
        vals = sorted({float(v) for v in values})
        header = [param] + [f"{d} {_short(m)}{part}" for d in datasets for m in o["metrics"]
                            for part in ("", " p (users)")]
        body = []
        series: dict[tuple[str, str], list[float]] = {}
        # the base configuration's own value of the swept keys; a row of its own when the grid lacks it
        base_values = {float(ctx.plan.runs[c.key].config[k]) for c in base_cells for k in keys}
        single = base_values.pop() if len(base_values) == 1 else None
        if single is not None:
            base_label = f"{single:g} (base)"
        else:  # the swept keys differ in the base configuration (or between datasets)
            base_config = ctx.plan.runs[base_cells[0].key].config if base_cells else {}
            base_label = "base (" + ", ".join(f"{k}={base_config.get(k)}" for k in keys) + ")"
        base_line: dict[tuple[str, str], float] = {}
        if base_cells and (single is None or single not in vals):
            base_row: list[Any] = [base_label]
            for d in datasets:
                for m in o["metrics"]:
                    st = ctx.stat(base_of[d], "test", m)
                    base_row += [st, None]
                    base_line[(d, m)] = st.mean if st else np.nan
            body.append(base_row)
        for v in vals:
            row: list[Any] = [f"{v:g}"]
            for d in datasets:
                mine = [c for c in cells if c.param == param and c.value == v and c.dataset == d]
                for m in o["metrics"]:
                    st = ctx.stat(mine, "test", m)
                    # the base configuration's own value on the grid is the same run: its p is empty (nan)
                    p_base = None if st is None or not base_of[d] else _p_users(ctx, mine, base_of[d], "test", m)
                    row += [st, p_base]
                    series.setdefault((d, m), []).append(st.mean if st else np.nan)
            body.append(row)
        base_note = (f" The row {base_label!r} is the base configuration itself (its own value lies outside the "
                     f"grid; a dashed line in the figure)." if base_line else "")
        caption = (f"{o['model']}: {param} sets {', '.join(keys)}; every other value as in the base configuration."
                   f"{base_note} p (users): two-sided Wilcoxon signed-rank test over users of the per-user test "
                   f"metric (averaged over seeds), the row against the base configuration. "
                   f"{_seed_note(ctx, cells)}. {selection_note(ctx.valid_metric)}")
        t = Table(name=f"{stem}_{param}", title=f"Sensitivity of {o['model']} to {param}", caption=caption,
                  header=header, rows=body)
        paths += write_table(t, ctx.out)
        fig, axes = plt.subplots(1, len(o["metrics"]), figsize=(5 * len(o["metrics"]), 4), squeeze=False)
        for i, m in enumerate(o["metrics"]):
            ax = axes[0][i]
            for d in datasets:
                line = ax.plot(vals, series[(d, m)], marker="o", label=d)[0]
                if (d, m) in base_line:
                    ax.axhline(base_line[(d, m)], color=line.get_color(), linestyle="--", linewidth=1,
                               label=f"{d}: base ({param} = {single:g})" if single is not None
                               else f"{d}: {base_label}")
            if param.startswith("lambda") and min(vals) > 0:
                ax.set_xscale("log")
            ax.set_xlabel(f"{param} ({', '.join(keys)})")
            ax.set_ylabel(f"{_metric_label(m)} (test)")
            ax.set_title(f"{o['model']}: {_metric_label(m)} vs {param}")
            ax.legend(fontsize=8)
            ax.grid(alpha=0.3)
        paths.append(save_figure(fig, ctx.out / f"{stem}_{param}.png"))
    return paths


def build_retrieval(ctx: Context, a: Analysis, stem: str) -> list[Path]:
    rows_spec = _rows(ctx, a)
    header = ["Metric"]
    columns: list[tuple[list[Cell], str, str]] = []  # cells, level ("1" / "all"), method
    for d, s in _columns(ctx, a):
        for m, v, label in rows_spec:
            cells = ctx.plan.select("main", dataset=d, setting=s, model=m, variant=v)
            for level, method, title in (("1", "nn", "1 missing: NN"), ("1", "generated", f"1 missing: {label}"),
                                         ("all", "nn", "all missing: NN"),
                                         ("all", "generated", f"all missing: {label}")):
                header.append(f"{_ds_label(d, s, ctx)} {title}")
                columns.append((cells, level, method))
    body = []
    ks: list[int] = []
    for cells, _, _ in columns:
        for c in cells:
            r = ctx.post(c.key, an.RETRIEVAL_FILE)
            if r and r.get("applicable"):
                ks = sorted(set(ks) | set(r["ks"]))
    for metric in [*(f"hit@{k}" for k in ks), "rank"]:
        row: list[Any] = ["Hit@" + metric.split("@")[1] if "@" in metric else "mean rank (0 best, 0.5 chance)"]
        for cells, level, method in columns:
            vals = []
            for c in cells:
                r = ctx.post(c.key, an.RETRIEVAL_FILE)
                if not r or not r.get("applicable"):
                    continue
                lv = str(r["n_modalities"]) if level == "all" else level
                summary = r["by_missing_level"].get(lv, {})
                if f"{method}_{metric}" in summary:
                    vals.append(summary[f"{method}_{metric}"])
            row.append(an.Stat.of(vals))
        body.append(row)
    caption = ("Cross-modal retrieval of masked features: the query is the feature the model generates for a masked "
               "(item, modality), the candidates are the true features of all items (cosine), Hit@K = the item "
               "itself among the K most similar. NN: the mean true feature of the 10 items nearest in the observed "
               "modalities (not applicable when every modality is missing). "
               f"{_seed_note(ctx)}. {selection_note(ctx.valid_metric)}")
    t = Table(name=stem, title="Cross-modal retrieval", caption=caption, header=header, rows=body)
    return write_table(t, ctx.out)


def build_disentanglement(ctx: Context, a: Analysis, stem: str) -> list[Path]:
    plt = _pyplot()
    rows_spec = _rows(ctx, a)
    paths: list[Path] = []
    header = ["Cosine"]
    columns = []
    names: list[str] = []
    for d, s in _columns(ctx, a):
        for m, v, label in rows_spec:
            cells = ctx.plan.select("main", dataset=d, setting=s, model=m, variant=v)
            stored = [(c, ctx.post(c.key, an.DISENTANGLE_FILE)) for c in cells]
            stored = [(c, x) for c, x in stored if x and x.get("applicable")]
            if not stored:
                continue
            header.append(f"{_ds_label(d, s, ctx)} {label}")
            columns.append(stored)
            for name in stored[0][1]["cosines"]:
                if name not in names:
                    names.append(name)
            c0, _ = stored[0]
            paths.append(_tsne_figure(plt, ctx, c0, f"{_ds_label(d, s, ctx)}, {label}, seed {c0.seed}",
                                      ctx.out / f"{stem}_tsne_{_slug(d)}_{s}_{_slug(label)}.png"))
    body = [[name] + [an.Stat.of([x["cosines"][name]["cosine"] for _, x in col if name in x["cosines"]])
                      for col in columns] for name in names]
    caption = ("Mean cosine similarity, over items, between the general and specific encoder outputs of a modality "
               "(items observing it; lower = more disentangled) and between the general outputs of two modalities "
               f"(items observing both; higher = more shared), at the best-validation checkpoint. {_seed_note(ctx)}."
               f" {selection_note(ctx.valid_metric)}")
    t = Table(name=stem, title="Disentanglement diagnostics", caption=caption, header=header, rows=body)
    paths += write_table(t, ctx.out)
    if columns:
        fig, ax = plt.subplots(figsize=(max(6.0, 1.2 * len(names) + 2), 4.2))
        width = 0.8 / len(columns)
        x = np.arange(len(names))
        for i, (col, title) in enumerate(zip(columns, header[1:], strict=True)):
            sts = [an.Stat.of([xx["cosines"][n]["cosine"] for _, xx in col if n in xx["cosines"]]) for n in names]
            ax.bar(x + (i - (len(columns) - 1) / 2) * width, [st.mean if st else np.nan for st in sts], width,
                   yerr=[st.std if st and st.n > 1 else 0.0 for st in sts], capsize=2, label=title)
        ax.set_xticks(x, names, rotation=20, ha="right", fontsize=8)
        ax.set_ylabel("mean cosine similarity")
        ax.set_ylim(0, 1.05)
        ax.set_title("General vs specific features (encoder outputs)")
        ax.legend(fontsize=8)
        paths.append(save_figure(fig, ctx.out / f"{stem}_cosines.png"))
    histories = [(title, h) for col, title in zip(columns, header[1:], strict=True)
                 if (h := _cosine_history(ctx, [c for c, _ in col]))]
    if histories:  # runs trained since DGMRec logs the cosines after every epoch
        fig, axes = plt.subplots(1, len(histories), figsize=(5.2 * len(histories), 4.0), squeeze=False)
        for ax, (title, hist) in zip(axes[0], histories, strict=True):
            for name, by_epoch in hist.items():
                epochs = sorted(by_epoch)
                ax.plot(epochs, [float(np.mean(by_epoch[e])) for e in epochs], label=name,
                        linestyle="-" if name.startswith("general-specific") else "--")
            ax.set_xlabel("epoch")
            ax.set_ylabel("mean cosine similarity")
            ax.set_ylim(0, 1.05)
            ax.set_title(title, fontsize=9)
            ax.grid(alpha=0.3)
            ax.legend(fontsize=8)
        fig.suptitle("Disentanglement during training, after every epoch (mean over the seeds)\n"
                     "solid: general vs specific (lower = more disentangled); dashed: general across modalities "
                     "(higher = more shared)", fontsize=10)
        paths.append(save_figure(fig, ctx.out / f"{stem}_cosines_training.png"))
    return paths


def _run_log(folder: Path) -> list[dict[str, Any]]:
    """A run's per-epoch log (``log.jsonl``), empty when it has none."""
    path = folder / "log.jsonl"
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _cosine_history(ctx: Context, cells: Sequence[Cell]) -> dict[str, dict[int, list[float]]]:
    """The cosines DGMRec logs after every epoch (``cos <name>`` keys of ``log.jsonl``): name -> epoch -> values
    over ``cells``; empty for runs trained before the cosines were logged."""
    from dgmrec.models.dgmrec import COSINE_LOG_PREFIX

    out: dict[str, dict[int, list[float]]] = {}
    for c in cells:
        for entry in _run_log(ctx.folder(c.key)):
            for k, v in entry.items():
                if k.startswith(COSINE_LOG_PREFIX):
                    out.setdefault(k[len(COSINE_LOG_PREFIX):], {}).setdefault(int(entry["epoch"]), []).append(float(v))
    return out


def _tsne_figure(plt: Any, ctx: Context, cell: Cell, title: str, path: Path) -> Path:
    points: dict[tuple[str, str], list[tuple[float, float]]] = {}
    with (ctx.folder(cell.key) / an.TSNE_FILE).open() as f:
        next(f)
        for line in f:
            _, modality, part, x, y = line.strip().split(",")
            points.setdefault((modality, part), []).append((float(x), float(y)))
    fig, ax = plt.subplots(figsize=(6.5, 5.5))
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    modalities = list(dict.fromkeys(m for m, _ in points))
    for (modality, part), xy in points.items():
        arr = np.array(xy)
        ax.scatter(arr[:, 0], arr[:, 1], s=6, alpha=0.6, color=colours[modalities.index(modality) % len(colours)],
                   marker="o" if part == "general" else "x", label=f"{part} {modality}")
    n_items = len(next(iter(points.values()))) if points else 0
    ax.set_title(f"t-SNE of general (o) and specific (x) features\n{n_items} items; {title}", fontsize=10)
    ax.set_xlabel("t-SNE 1")
    ax.set_ylabel("t-SNE 2")
    ax.legend(fontsize=7, markerscale=2)
    return save_figure(fig, path)


def _epoch_times(ctx: Context, key: str, res: Mapping[str, Any]) -> tuple[float, float]:
    """Median seconds per training epoch and per evaluation of a run, from its per-epoch log (``log.jsonl``);
    the run summary's values where the log has none."""
    log = _run_log(ctx.folder(key))
    train = [float(e["train_seconds"]) for e in log if "train_seconds" in e]
    evals = [float(e["eval_seconds"]) for e in log if "eval_seconds" in e]
    return (float(np.median(train)) if train else float(res["seconds_per_epoch"]),
            float(np.median(evals)) if evals else float(res["seconds_per_evaluation"]))


def build_cost(ctx: Context, a: Analysis, stem: str) -> list[Path]:
    rows = _rows(ctx, a)
    header = ["Model"]
    cols = _columns(ctx, a)
    for d, s in cols:
        header += [f"{_ds_label(d, s, ctx)} {h}" for h in ("s/epoch", "s/evaluation", "epochs", "train s")]
    body = []
    devices: set[str] = set()
    for m, v, label in rows:
        row: list[Any] = [label]
        for d, s in cols:
            done = [(c.key, r) for c in ctx.plan.select("main", dataset=d, setting=s, model=m, variant=v)
                    if (r := ctx.results(c.key))]
            devices |= {str(r.get("device", "?")) for _, r in done}
            times = [_epoch_times(ctx, key, r) for key, r in done]
            row += [an.Stat.of([t for t, _ in times], digits=3),
                    an.Stat.of([e for _, e in times], digits=3),
                    an.Stat.of([r["epochs_run"] for _, r in done], digits=0),
                    an.Stat.of([t * r["epochs_run"] for (t, _), (_, r) in zip(times, done, strict=True)], digits=0)]
        body.append(row)
    caption = (f"Seconds per training epoch and per evaluation (one full-ranking pass over the validation users), each "
               f"the median over the run's epochs (an epoch during which the process was suspended does not count), "
               f"epochs run until early stopping and total training time (s/epoch x epochs, evaluation excluded); "
               f"{_seed_note(ctx)}; device(s): {', '.join(sorted(devices)) or '–'}. Times are comparable only within "
               f"one device. {selection_note(ctx.valid_metric)}")
    t = Table(name=stem, title="Training and inference cost", caption=caption, header=header, rows=body)
    return write_table(t, ctx.out)


BUILDERS: dict[str, Callable[[Context, Analysis, str], list[Path]]] = {
    "overall": build_overall,
    "by_missing_level": build_by_missing_level,
    "cold_start": build_cold_start,
    "missing_ratio": build_missing_ratio,
    "ablation": build_ablation,
    "sensitivity": build_sensitivity,
    "retrieval": build_retrieval,
    "disentanglement": build_disentanglement,
    "cost": build_cost,
}


@dataclass
class ReportResult:
    paths: list[Path]
    missing_runs: list[str]


def build_report(study: Study, out: Path | None = None) -> ReportResult:
    """Write every table and figure of ``study`` into ``out`` (default: the study's ``report`` folder)."""
    from dgmrec.experiments.study import _analysis

    plan = plan_study(study, store_only=True, write=False)
    out = Path(out) if out is not None else study.report
    out.mkdir(parents=True, exist_ok=True)
    ctx = Context(study, plan, out)
    analyses = study.analyses or [_analysis({"kind": "overall"}, 0, str(study.path))]
    seen: dict[str, int] = {}
    paths: list[Path] = []
    for a in analyses:
        n = seen.get(a.kind, 0)
        seen[a.kind] = n + 1
        paths += BUILDERS[a.kind](ctx, a, a.kind if n == 0 else f"{a.kind}{n + 1}")
    missing = sorted(ctx.missing)
    index = [f"# Study {study.name}", ""]
    if study.description:
        index += [study.description.strip(), ""]
    index += [f"Runs planned: {len(plan.runs)}; missing or incomplete in the store: {len(missing)}.", ""]
    for p in paths:
        if p.suffix == ".md":
            index += [p.read_text(encoding="utf-8"), ""]
        elif p.suffix == ".png":
            index += [f"![{p.stem}]({p.name})", ""]
    if missing:
        index += ["Missing runs: " + ", ".join(f"{plan.runs[k].model}/{k}" for k in missing), ""]
    (out / "report.md").write_text("\n".join(index).rstrip() + "\n", encoding="utf-8")
    return ReportResult(paths=[*paths, out / "report.md"], missing_runs=missing)
