"""PNG plots from :class:`~benchmarks.scenario.LinePlot` specs, with matplotlib.

matplotlib is optional: without it, plots are skipped with a message.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

from .scenario import LinePlot

__all__ = ["available", "draw"]


def available() -> bool:
    """Whether matplotlib can be imported."""
    return importlib.util.find_spec("matplotlib") is not None


def draw(plot: LinePlot, directory: Path) -> Path:
    """Draw ``plot`` as ``directory / plot.filename``; returns the path.

    Raises :class:`ImportError` if matplotlib is not installed.
    """
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot, ticker

    figure, axes = pyplot.subplots(figsize=(7, 4.5), layout="constrained")
    try:
        for index, (legend, points) in enumerate(plot.series.items()):
            xs = sorted(points)
            ys = [points[x] for x in xs]
            (line,) = axes.plot(xs, ys, marker="o", label=legend)
            # Values printed above the points of one series, below the next.
            offset = (6, 5) if index % 2 == 0 else (6, -11)
            for x, y in zip(xs, ys, strict=True):
                axes.annotate(
                    f"{y:.0f}",
                    (x, y),
                    textcoords="offset points",
                    xytext=offset,
                    fontsize=8,
                    color=line.get_color(),
                )
        all_x = sorted({x for points in plot.series.values() for x in points})
        axes.set_xticks(all_x)
        if plot.log_y:
            axes.set_yscale("log")
            axes.yaxis.set_major_locator(ticker.LogLocator(subs=(1.0, 2.0, 5.0)))
            axes.yaxis.set_major_formatter(ticker.ScalarFormatter())
            axes.yaxis.set_minor_formatter(ticker.NullFormatter())
        axes.set_title(plot.title)
        axes.set_xlabel(plot.x_label)
        axes.set_ylabel(plot.y_label)
        axes.grid(True, which="both", alpha=0.3)
        axes.legend()
        path = directory / plot.filename
        figure.savefig(path, dpi=120)
    finally:
        pyplot.close(figure)
    return path
