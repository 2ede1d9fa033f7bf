"""``curves.png`` of a run: the training loss terms per epoch and the validation metric per evaluation.

Drawn with matplotlib's Agg canvas directly (no pyplot, no global backend switch), so it works without a
display and does not disturb a caller's own plotting.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

CURVES_NAME = "curves.png"


def plot_curves(history: Sequence[Mapping[str, Any]], path: str | Path, *, title: str, valid_metric: str,
                best_epoch: int, loss_keys: Sequence[str] = ("loss",), subtitle: str = "",
                patience_from: int | None = 0) -> Path:
    """Write the two-panel figure of a run's ``history`` (the entries of ``log.jsonl``) to ``path``.

    Left: every entry of ``loss_keys`` per epoch (the total ``loss`` drawn bold). Right: ``valid_metric`` at
    every evaluation, the best epoch marked with its value (and the test value there, when logged), and the
    epochs before ``patience_from`` (None: all of them) shaded: early stopping did not count them yet.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    fig = Figure(figsize=(11, 4.2), dpi=100, layout="constrained")
    FigureCanvasAgg(fig)
    ax_loss, ax_valid = fig.subplots(1, 2)
    fig.suptitle(f"{title}\n{subtitle}" if subtitle else title)

    keys = [k for k in loss_keys if any(k in e for e in history)] or ["loss"]
    for key in keys:
        points = [(e["epoch"], e[key]) for e in history if isinstance(e.get(key), int | float)]
        if not points:
            continue
        xs, ys = zip(*points, strict=True)
        total = key == "loss"
        ax_loss.plot(xs, ys, label="total loss" if total else key, linewidth=2.2 if total else 1.2,
                     color="black" if total else None, marker="o" if len(xs) == 1 else None)
    ax_loss.set_title("training loss (mean over the epoch's batches)")
    ax_loss.set_xlabel("epoch")
    ax_loss.set_ylabel("loss")
    ax_loss.grid(alpha=0.3)
    if ax_loss.lines:
        ax_loss.legend(fontsize="small", ncols=2 if len(ax_loss.lines) > 5 else 1)

    evals = [(e["epoch"], e["valid"][valid_metric]) for e in history
             if isinstance(e.get("valid"), Mapping) and valid_metric in e["valid"]]
    ax_valid.set_title(f"validation {valid_metric} (every evaluation)")
    ax_valid.set_xlabel("epoch")
    ax_valid.set_ylabel(valid_metric)
    ax_valid.grid(alpha=0.3)
    single = max((e.get("epoch", 0) for e in history), default=0) == 0
    for ax in (ax_loss, ax_valid):  # epochs are whole numbers
        if single:
            ax.set_xticks([0])
        else:
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    if evals:
        xs, ys = zip(*evals, strict=True)
        ax_valid.plot(xs, ys, marker="." if len(xs) < 60 else None, color="tab:blue", label=f"valid {valid_metric}")
        last = max(e["epoch"] for e in history)
        end = last + 0.5 if patience_from is None else min(patience_from, last + 0.5)
        if end > 0:
            ax_valid.axvspan(-0.5, end, color="0.85", alpha=0.6, linewidth=0,
                             label="patience not counted yet (warm-up)")
        best = [e for e in history if e.get("epoch") == best_epoch and isinstance(e.get("valid"), Mapping)]
        if best:
            value = best[-1]["valid"][valid_metric]
            label = f"best epoch {best_epoch}: {value:.4f}"
            test = best[-1].get("test")
            if isinstance(test, Mapping) and valid_metric in test:
                label += f" (test {test[valid_metric]:.4f})"
            ax_valid.axvline(best_epoch, color="tab:red", linestyle="--", linewidth=1)
            ax_valid.plot([best_epoch], [value], marker="*", markersize=14, color="tab:red", linestyle="none",
                          label=label)
        ax_valid.legend(fontsize="small", loc="lower right")
    else:
        ax_valid.text(0.5, 0.5, "no evaluation yet", ha="center", va="center", transform=ax_valid.transAxes)
    target = Path(path)
    tmp = target.with_name(f".{target.stem}.tmp{target.suffix}")
    fig.savefig(tmp, format="png")
    tmp.replace(target)
    return target
