"""Training-curve plots (matplotlib, headless)."""

from __future__ import annotations

from pathlib import Path


def plot_history(history: dict, path: str | Path, title: str = "") -> Path:
    """Plots loss and accuracy per epoch, train vs validation, with the stage boundary marked.

    Args:
        history: a merged `History.history` dict (with a `"stage"` list).
        path: the PNG to write.
        title: figure title.

    Returns:
        `path` as a `Path`.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    epochs = list(range(1, len(history.get("stage", [])) + 1))
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for ax, metric in zip(axes, ("loss", "accuracy"), strict=True):
        for key, style in ((metric, "o-"), (f"val_{metric}", "s--")):
            if history.get(key):
                ax.plot(epochs, history[key], style, label=key)
        stages = history.get("stage", [])
        if 1 in stages and 2 in stages:
            ax.axvline(stages.count(1) + 0.5, color="grey", linestyle=":", label="unfreeze")
        ax.set_xlabel("epoch")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_title(metric)
        ax.legend()
    fig.suptitle(title)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
