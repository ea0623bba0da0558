"""Pseudo-labels from a network's predictions: hard labels with their confidence, and the largest connected
component of each class (BCP's post-processing of the teacher's labels)."""

from __future__ import annotations

import numpy as np
import torch


def hard_labels(logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(label (B, *S) int64, confidence (B, *S))``: the argmax class and its softmax probability."""
    conf, label = logits.detach().float().softmax(1).max(1)
    return label, conf


def largest_components(label: torch.Tensor, num_classes: int) -> torch.Tensor:
    """Keep, per sample and foreground class, only the largest connected component (face connectivity, 2-D or
    3-D); voxels of the other components become background. Ties keep the component found first."""
    from scipy import ndimage

    arr = label.detach().cpu().numpy()
    out = np.zeros_like(arr)
    for i in range(arr.shape[0]):
        for c in range(1, num_classes):
            comp, n = ndimage.label(arr[i] == c)
            if n == 0:
                continue
            sizes = np.bincount(comp.ravel())[1:]
            out[i][comp == int(np.argmax(sizes)) + 1] = c
    return torch.from_numpy(out).to(label.device)
