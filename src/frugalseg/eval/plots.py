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
    plt = pyplot()
    steps = [e["step"] for e in log]
    fig, ax1 = plt.subplots(figsize=(6, 3.5))
    ax1.plot(steps, [e["loss"] for e in log], color="tab:blue", label="loss")
    ax1.set_xlabel("step")
    ax1.set_ylabel("loss")
    if all(e["loss"] > 0 for e in log):  # negative-cosine losses (BYOL, PCRLv2) go below zero: keep them linear
        ax1.set_yscale("log")
    ax2 = ax1.twinx()
    ax2.plot(steps, [e["lr"] for e in log], color="tab:gray", alpha=0.5, label="learning rate")
    ax2.set_ylabel("learning rate")
    ax1.set_title(title)
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
