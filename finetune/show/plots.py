"""Pictures of a run: curves.png (each epoch), confusion.png (the best epoch), and a sweep's
summary.png. matplotlib is an optional extra (`pip install -e ".[plots]"`); `plots=auto`
draws when it is installed.

Figures are built with matplotlib's object API (no pyplot: no global state, no display
needed) and written to a temporary file that replaces the picture, so a viewer watching it
never sees half a file.
"""

import logging
import math
import time
from collections.abc import Callable, Collection, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

from finetune.errors import ConfigError
from finetune.state.files import atomic_write

DPI = 110
MAX_SWEEP_BARS = 40  # summary.png shows the best 40 jobs (an Optuna study may have thousands)
log = logging.getLogger(__name__)
logging.getLogger("matplotlib").setLevel(logging.WARNING)  # not its font-cache notes


def matplotlib_installed() -> bool:
    import importlib.util

    return importlib.util.find_spec("matplotlib") is not None


def plots_enabled(setting: str) -> bool:
    """plots=auto draws if matplotlib is installed; true insists; false never draws."""
    setting = str(setting).lower()
    if setting == "false":
        return False
    if matplotlib_installed():
        return True
    if setting == "true":
        raise ConfigError("plots=true needs matplotlib: pip install -e '.[plots]' (or set "
                          "plots=auto to draw only when it is installed, or plots=false).")
    return False


class BackgroundPlots:
    """Draws on one background thread, so training does not wait for a figure (0.2-0.5 s of
    mostly Python, which still competes for the interpreter). A picture is redrawn when
    asked, unless less time than DRAWING_SHARE allows has passed since its last drawing: then
    the newest request waits its turn (on slow epochs every one is drawn; on fast ones
    plotting stays under ~5% of the time). `wait` draws what is still waiting. A drawing
    that fails is a warning, never a failed run."""

    DRAWING_SHARE = 0.05

    def __init__(self):
        self.executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="plots")
        self.started: dict[str, Future] = {}  # path -> its last drawing
        self.finished: dict[str, tuple[float, float]] = {}  # path -> (ended, seconds)
        self.waiting: dict[str, tuple[Callable[..., None], tuple]] = {}

    def draw(self, function: Callable[..., None], path: str, *args: Any) -> None:
        self.waiting[path] = (function, args)
        if self.due(path):
            self.start(path)

    def due(self, path: str) -> bool:
        if path not in self.started:
            return True
        if not self.started[path].done():
            return False
        ended, seconds = self.finished.get(path, (0.0, 0.0))
        return time.monotonic() - ended >= seconds / self.DRAWING_SHARE

    def start(self, path: str) -> None:
        function, args = self.waiting.pop(path)

        def timed() -> None:
            started = time.monotonic()
            function(*args, path)
            self.finished[path] = (time.monotonic(), time.monotonic() - started)

        self.started[path] = self.executor.submit(timed)

    def wait(self) -> None:
        for path in list(self.waiting):
            self.start(path)  # queued behind any drawing still running
        self.executor.shutdown(wait=True)
        for path, future in self.started.items():
            if future.exception() is not None:
                log.warning("could not draw %s: %s", path, future.exception())


def draw_or_warn(function: Callable[..., None], *args: Any) -> None:
    """Pictures are a view of results already saved: failing to draw one fails nothing."""
    try:
        function(*args)
    except Exception as error:
        log.warning("could not draw %s: %s", args[-1], error)


def save(figure, path: str) -> None:
    with atomic_write(path, "wb") as stream:  # a viewer never sees half a picture
        figure.savefig(stream, format="png", dpi=DPI, bbox_inches="tight")


def new_figure(width: float, height: float):
    from matplotlib.figure import Figure

    return Figure(figsize=(width, height), layout="constrained")


def plot_curves(history: Sequence[Any], phase_epochs: Sequence[int], best_epoch: int,
                path: str) -> None:
    """Loss and accuracy (train and val) and each optimizer group's learning rate per epoch;
    a dotted line where an unfreeze phase starts, a star on the best epoch."""
    epochs = [row.epoch for row in history]
    figure = new_figure(13, 3.8)
    loss, accuracy, rate = figure.subplots(1, 3)
    loss.plot(epochs, [row.train_loss for row in history], "o-", label="train")
    loss.plot(epochs, [row.val_loss for row in history], "o-", label="val")
    # multi-label data has no accuracy: its mean average precision instead (val only)
    score, score_title = (("val_map", "mAP") if not math.isnan(getattr(history[-1], "val_map", math.nan))
                          else ("val_acc", "accuracy"))
    if score == "val_acc":
        accuracy.plot(epochs, [row.train_acc for row in history], "o-", label="train")
    accuracy.plot(epochs, [getattr(row, score) for row in history], "o-", label="val")
    best = [row for row in history if row.epoch == best_epoch]
    if best:
        accuracy.plot([best_epoch], [getattr(best[0], score)], "*", color="black", markersize=14,
                      label=f"best: epoch {best_epoch}")
    groups = [name for name in dict.fromkeys(n for row in history for n in row.group_lrs)
              if not name.endswith("/no_decay")]  # the same rate as its twin: one line
    for group in groups:
        points = [(row.epoch, row.group_lrs[group]) for row in history if group in row.group_lrs]
        rate.plot(*zip(*points, strict=True), "o-", label=group)
    if not any(row.group_lrs for row in history):  # a checkpoint from before group_lrs
        rate.plot(epochs, [row.lr for row in history], "o-", label="lr")
    log_scale_if_wide(loss, [v for row in history for v in (row.train_loss, row.val_loss)])
    log_scale_if_wide(rate, [lr for row in history for lr in row.group_lrs.values()])
    for axes, title in ((loss, "loss"), (accuracy, score_title), (rate, "learning rate")):
        for number, epoch in enumerate(phase_epochs, start=1):
            axes.axvline(epoch - 0.5, color="gray", linestyle=":",
                         label="unfreeze phase" if number == 1 else None)
        axes.set_title(title)
        axes.set_xlabel("epoch")
        axes.xaxis.get_major_locator().set_params(integer=True)
        axes.grid(alpha=0.3)
        axes.legend(fontsize="small")
    save(figure, path)


def log_scale_if_wide(axes, values: list[float]) -> None:
    """A log axis when the values span more than 30x (a first epoch's huge loss, lr decay)."""
    if values and min(values) > 0 and max(values) / min(values) > 30:
        axes.set_yscale("log")


def plot_rgn(history: Sequence[dict[str, Any]], path: str) -> None:
    """freeze=auto's learning-rate scales: one row per unit, one column per epoch (rgn.png)."""
    units = list(dict.fromkeys(unit for row in history for unit in row["scale"]))
    epochs = [row["epoch"] for row in history]
    grid = [[row["scale"].get(unit, math.nan) for row in history] for unit in units]
    figure = new_figure(max(4.0, 1.2 + 0.45 * len(epochs)), max(2.5, 0.8 + 0.22 * len(units)))
    axes = figure.subplots()
    image = axes.imshow(grid, aspect="auto", cmap="viridis", vmin=0, vmax=1)
    if len(units) * len(epochs) <= 200:  # the figures, where they fit
        for y, values in enumerate(grid):
            for x, value in enumerate(values):
                axes.text(x, y, f"{value:.2f}", ha="center", va="center", fontsize=7,
                          color="white" if value < 0.5 else "black")
    axes.set_xticks(range(len(epochs)), [str(epoch) for epoch in epochs])
    axes.set_yticks(range(len(units)), units, fontsize=7 if len(units) > 20 else None)
    axes.set_xlabel("epoch")
    axes.set_title("freeze=auto: learning-rate scale (RGN / largest)")
    figure.colorbar(image, ax=axes)
    save(figure, path)


def plot_confusion(matrix: Sequence[Sequence[int]], class_names: Sequence[str], title: str,
                   path: str) -> None:
    """Rows: true class, columns: predicted; colour is the share of the true class's images,
    the numbers are image counts (shown up to 30 classes)."""
    count = len(class_names)
    size = min(max(5.0, 0.45 * count + 2.5), 30.0)
    figure = new_figure(size, size * 0.9)
    axes = figure.subplots()
    totals = [max(sum(row), 1) for row in matrix]
    shares = [[value / total for value in row] for row, total in zip(matrix, totals, strict=True)]
    image = axes.imshow(shares, cmap="Blues", vmin=0.0, vmax=1.0)
    figure.colorbar(image, ax=axes, fraction=0.046, pad=0.04, label="share of the true class")
    labels = [name if len(name) <= 18 else name[:8] + "…" + name[-9:] for name in class_names]
    axes.set_xticks(range(count), labels, rotation=45 if max(map(len, labels)) > 3 else 0,
                    ha="right" if max(map(len, labels)) > 3 else "center")
    axes.set_yticks(range(count), labels)
    axes.set_xlabel("predicted class")
    axes.set_ylabel("true class")
    axes.set_title(title)
    if count <= 30:
        for row in range(count):
            for column in range(count):
                axes.text(column, row, str(matrix[row][column]), ha="center", va="center",
                          fontsize="small" if count <= 15 else "x-small",
                          color="white" if shares[row][column] > 0.5 else "black")
    save(figure, path)


def job_settings(overrides: Sequence[str]) -> dict[str, str]:
    return dict(override.partition("=")[::2] for override in overrides)


def swept_keys(jobs: Sequence[dict[str, str]]) -> list[str]:
    """The override keys whose values differ between jobs."""
    keys = dict.fromkeys(key for job in jobs for key in job)
    return [key for key in keys if len({job.get(key) for job in jobs}) > 1]


def as_number(text: str) -> float | None:
    try:
        return float(text)
    except ValueError:
        return None


def rounded(value: str) -> str:
    """A swept value as a label: numbers to 3 significant digits (Optuna samples floats to
    17), anything else as it is, cut at 24 characters."""
    number = as_number(value)
    if number is not None and not value.isdigit():
        return f"{number:.3g}"
    return value if len(value) <= 24 else value[:23] + "…"


def short_names(keys: Sequence[str]) -> dict[str, str]:
    """Each key by its last part (`optimizer.lr` -> `lr`) unless two keys share it."""
    last = [key.rpartition(".")[2] for key in keys]
    return {key: name if last.count(name) == 1 else key for key, name in zip(keys, last, strict=True)}


def log_searched_keys(search_params: dict[str, Any] | None) -> set[str]:
    """The keys a search samples on a log scale: `tag(log, interval(...))` in
    hparams_search.params (Optuna)."""
    return {key for key, value in (search_params or {}).items()
            if str(value).replace(" ", "").startswith("tag(log,")}


def plot_sweep(rows: Sequence[dict[str, Any]], metric: str, path: str,
               log_keys: Collection[str] = (), groups: Sequence[dict[str, Any]] = ()) -> None:
    save(sweep_figure(rows, metric, log_keys, groups), path)


def sweep_figure(rows: Sequence[dict[str, Any]], metric: str, log_keys: Collection[str] = (),
                 groups: Sequence[dict[str, Any]] = ()):
    """The optimized metric per job (best first), and against each swept key (up to 3);
    a key searched on a log scale, or spanning 100x, gets a log axis. With `groups`
    (sweep.group_repeats: settings repeated over folds or seeds), a last panel shows each
    setting's values and their mean +- std, best mean first."""
    finished = [row for row in rows if row["status"] == "ok"
                and isinstance(row["value"], int | float) and not math.isnan(row["value"])]
    done = finished[:MAX_SWEEP_BARS]  # rows come best first
    settings = [job_settings(row["override_list"]) for row in done]
    keys = swept_keys(settings)[:3]  # each gets a panel; the job labels name them
    names = short_names(keys)
    height = max(3.0, 0.3 * max(len(done), len(groups)) + 1.5)
    figure = new_figure(7 + 4 * len(keys) + 6 * bool(groups), height)
    panels = figure.subplots(1, 1 + len(keys) + bool(groups), squeeze=False)[0]
    if groups:
        draw_spread(panels[-1], groups[:MAX_SWEEP_BARS], metric)
        panels = panels[:-1]
    jobs = panels[0]
    labels = [f"{row['job']}: " + (" ".join(f"{names[key]}={rounded(job.get(key, '(default)'))}"
                                            for key in keys) or row["overrides"][:60])
              for row, job in zip(done, settings, strict=True)]
    jobs.barh(range(len(done)), [row["value"] for row in done], color="tab:blue")
    jobs.set_yticks(range(len(done)), labels, fontsize="small")
    jobs.invert_yaxis()  # best first, at the top
    jobs.set_xlabel(metric)
    pruned = sum(row["status"] == "pruned" for row in rows)  # a search's pruned trials
    failed = len(rows) - len(finished) - pruned
    title = (f"the best {len(done)} of {len(finished)} jobs" if len(done) < len(finished)
             else f"{len(done)} jobs")
    left_out = [f"{count} {what}" for count, what in ((pruned, "pruned"), (failed, "failed")) if count]
    jobs.set_title(title + (f" ({', '.join(left_out)}, not shown)" if left_out else ""))
    jobs.grid(axis="x", alpha=0.3)
    for axes, key in zip(panels[1:], keys, strict=True):
        values = [job.get(key, "(default)") for job in settings]
        numbers = [as_number(value) for value in values]
        if all(number is not None for number in numbers):
            axes.plot(numbers, [row["value"] for row in done], "o")
            if key in log_keys or (min(numbers) > 0 and max(numbers) / min(numbers) >= 100):
                axes.set_xscale("log")
        else:
            categories = list(dict.fromkeys(values))
            axes.plot([categories.index(value) for value in values],
                      [row["value"] for row in done], "o")
            axes.set_xticks(range(len(categories)), [rounded(c) for c in categories],
                            rotation=30, ha="right")
            axes.set_xlim(-0.5, len(categories) - 0.5)
        axes.set_xlabel(key)
        axes.set_ylabel(metric)
        axes.grid(alpha=0.3)
    return figure


def draw_spread(axes, groups: Sequence[dict[str, Any]], metric: str) -> None:
    """Each setting's jobs as dots, its mean +- sample std as a bar, best mean at the top."""
    for index, group in enumerate(groups):
        axes.plot(group["values"], [index] * len(group["values"]), "o", color="tab:blue",
                  alpha=0.5)
        axes.errorbar([group["mean"]], [index], xerr=[group["std"]], fmt="D", color="black",
                      capsize=4)
    axes.set_yticks(range(len(groups)), [f"{group['setting'][:50]} (n={group['n']})"
                                         for group in groups], fontsize="small")
    axes.invert_yaxis()
    axes.set_xlabel(metric)
    axes.set_title("by setting over data.fold / seed: mean +- std")
    axes.grid(axis="x", alpha=0.3)


def plot_reliability(scores: dict[str, Any], path: str) -> None:
    """The reliability diagram before and after temperature scaling: accuracy per
    confidence bin against the diagonal of a perfectly calibrated model."""
    figure = new_figure(10, 4.2)
    for axes, when in zip(figure.subplots(1, 2), ("before", "after"), strict=True):
        table = scores[f"reliability_{when}"]
        width = 1 / scores["bins"]
        axes.bar([row["low"] for row in table], [row["accuracy"] for row in table], width=width,
                 align="edge", edgecolor="black", color="tab:blue", label="accuracy")
        axes.plot([row["confidence"] for row in table], [row["accuracy"] for row in table], "o",
                  color="tab:orange", label="each bin at its mean confidence")
        axes.plot([0, 1], [0, 1], "--", color="gray", label="calibrated")
        temperature = 1.0 if when == "before" else scores["temperature"]
        axes.set_title(f"{when}: T = {temperature:.3g}, ECE {scores[f'ece_{when}']:.4f}, "
                       f"NLL {scores[f'nll_{when}']:.4f}")
        axes.set_xlabel("confidence (the predicted class's probability)")
        axes.set_ylabel("accuracy")
        axes.set_xlim(0, 1)
        axes.set_ylim(0, 1)
        axes.legend(loc="upper left", fontsize="small")
    save(figure, path)
