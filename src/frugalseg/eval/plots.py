"""PNG figures: learning curve of a run, prediction overlays."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from frugalseg.data.volume import Volume, slice_axis


def pyplot():
    """matplotlib's pyplot on the non-interactive Agg backend (imported on first use)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def learning_curve(log: list[dict], path: Path, title: str = "training loss") -> None:
    """The training loss (and learning rate) against the step; with validation entries, the validation Dice in a
    panel beside it. A single point is drawn as a marker, not an empty line."""
    plt = pyplot()
    train = [e for e in log if "loss" in e]
    val = [e for e in log if "val_dice" in e]
    fig, axes = plt.subplots(1, 2 if val else 1, figsize=(10.5 if val else 6, 3.5), squeeze=False)
    ax1 = axes[0, 0]
    steps = [e["step"] for e in train]
    marker = "o" if len(train) == 1 else None
    ax1.plot(steps, [e["loss"] for e in train], color="tab:blue", marker=marker, label="loss")
    ax1.set_xlabel("step")
    ax1.set_ylabel("loss")
    if train and all(e["loss"] > 0 for e in train):  # negative-cosine losses (BYOL, PCRLv2): keep them linear
        ax1.set_yscale("log")
    ax2 = ax1.twinx()
    ax2.plot(steps, [e["lr"] for e in train], color="tab:gray", alpha=0.5, marker=marker, label="learning rate")
    ax2.set_ylabel("learning rate")
    ax1.set_title(title)
    if val:
        ax3 = axes[0, 1]
        ax3.plot([e["step"] for e in val], [e["val_dice"] for e in val], color="tab:green", marker="o")
        ax3.set_xlabel("step")
        ax3.set_ylabel("validation mean Dice")
        ax3.grid(alpha=0.3)
        ax3.set_title("validation")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def overlay(items: list[tuple[str, Volume, np.ndarray]], path: Path, class_names: list[str]) -> None:
    """One row per item: image, reference, prediction on the slice with the most foreground, with a legend."""
    plt = pyplot()
    from matplotlib.patches import Patch

    num_classes = len(class_names)
    fig, axes = plt.subplots(len(items), 3, figsize=(9, 3 * len(items)), squeeze=False)
    cmap = plt.get_cmap("tab10")
    for row, (name, vol, pred) in zip(axes, items):
        image, label = vol.image[0], vol.label
        if image.ndim == 3:
            axis = slice_axis(vol.spacing, vol.spatial_shape)
            fg = (label > 0).sum(axis=tuple(a for a in range(3) if a != axis))
            k = int(fg.argmax())
            image, label, pred = (np.take(a, k, axis=axis) for a in (image, label, pred))
        for ax, (title, lab) in zip(row, [(name, None), ("reference", label), ("prediction", pred)]):
            ax.imshow(image.T, cmap="gray", origin="lower")
            if lab is not None:
                rgba = np.zeros((*lab.T.shape, 4))
                for c in range(1, num_classes):
                    rgba[lab.T == c] = (*cmap(c - 1)[:3], 0.45)
                ax.imshow(rgba, origin="lower")
            ax.set_title(title)
            ax.axis("off")
    handles = [Patch(color=cmap(c - 1), alpha=0.6, label=class_names[c]) for c in range(1, num_classes)]
    fig.legend(handles=handles, loc="lower center", ncol=len(handles), frameon=False)
    fig.tight_layout(rect=(0, 0.05, 1, 1))
    fig.savefig(path, dpi=100)
    plt.close(fig)


def compute_curve(runs: list[tuple[str, list[tuple[float, float]]]], path: Path,
                  title: str = "validation Dice against training time") -> None:
    """Validation mean Dice against training minutes, one line per run: ``runs`` = ``[(label, [(minutes, dice)])]``."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6.5, 4))
    n = len(runs)
    for i, (label, points) in enumerate(runs):
        xs, ys = zip(*points) if points else ((), ())
        # earlier runs drawn thicker and on top: a run that continues another (its start stage included) shares
        # its first points, which would otherwise hide the shorter line
        ax.plot(xs, ys, marker="o", markersize=3, label=label, linewidth=1.2 + 1.5 * (n - 1 - i) / max(n - 1, 1),
                linestyle=("-", "--", "-.", ":")[i % 4], zorder=2 + n - i)
    ax.set_xlabel("training minutes (this machine; validation time excluded)")
    ax.set_ylabel("validation mean Dice")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    ax.set_title(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
