"""Chaitanya et al. global contrastive loss: masks per strategy, loss against a naive loop, partitioned batches."""

import math

import numpy as np
import pytest
import torch

from frugalseg.data.sampling import PatchSampler
from frugalseg.data.volume import Volume
from frugalseg.losses.contrastive import global_contrastive_loss, global_pair_masks
from frugalseg.methods.gcl import GlobalContrastive, GlobalContrastiveOptions, slice_partition
from frugalseg.nn.unet import UNet

# hand-made batch: 2 volumes x 2 partitions, two views -> 8 images
#   image:     0   1   2   3 | 4   5   6   7   (4..7 are the second views of 0..3)
#   volume:    a   a   b   b | a   a   b   b
#   partition: 0   1   0   1 | 0   1   0   1
INSTANCE = torch.tensor([0, 1, 2, 3, 0, 1, 2, 3])
PARTITION = torch.tensor([0, 1, 0, 1, 0, 1, 0, 1])


def _pairs(mask):
    return {(i, j) for i, j in mask.nonzero().tolist()}


def _row(mask, i):
    return set(mask[i].nonzero().flatten().tolist())


def test_gr_positives_are_the_other_view_and_everything_else_is_negative():
    pos, neg = global_pair_masks(INSTANCE, PARTITION, "GR")
    assert _pairs(pos) == {(0, 4), (4, 0), (1, 5), (5, 1), (2, 6), (6, 2), (3, 7), (7, 3)}
    assert _row(neg, 0) == {1, 2, 3, 5, 6, 7}  # incl. the same partition of volume b


def test_gd_minus_never_uses_same_partition_slices_as_negatives():
    pos, neg = global_pair_masks(INSTANCE, PARTITION, "GD-")
    assert _pairs(pos) == _pairs(global_pair_masks(INSTANCE, PARTITION, "GR")[0])
    assert _row(neg, 0) == {1, 3, 5, 7}
    same_partition = PARTITION[:, None] == PARTITION[None, :]
    assert not (neg & same_partition).any()


def test_gd_same_partition_of_other_volumes_is_positive_never_negative():
    pos, neg = global_pair_masks(INSTANCE, PARTITION, "GD")
    assert _row(pos, 0) == {2, 4, 6}  # own other view, and both views of the same partition of volume b
    assert _row(pos, 3) == {1, 5, 7}
    same_partition = PARTITION[:, None] == PARTITION[None, :]
    assert not (neg & same_partition).any()
    assert not (pos & neg).any() and not pos.diagonal().any() and not neg.diagonal().any()


@pytest.mark.parametrize("strategy", ["GR", "GD-", "GD"])
def test_loss_equals_a_naive_per_anchor_loop(strategy):
    g = torch.Generator().manual_seed(0)
    z = torch.randn(8, 5, generator=g)
    pos, neg = global_pair_masks(INSTANCE, PARTITION, strategy)
    tau = 0.1
    zn = z / z.norm(dim=1, keepdim=True)
    terms = []
    for i in range(8):
        for j in range(8):
            if not pos[i, j]:
                continue
            s_ij = float(zn[i] @ zn[j]) / tau
            denom = math.exp(s_ij) + sum(math.exp(float(zn[i] @ zn[k]) / tau) for k in range(8) if neg[i, k])
            terms.append(-math.log(math.exp(s_ij) / denom))
    got = global_contrastive_loss(z, pos, neg, tau)
    assert got.item() == pytest.approx(sum(terms) / len(terms), abs=1e-5)


def test_loss_is_low_when_positives_align_and_negatives_differ():
    pos, neg = global_pair_masks(INSTANCE, PARTITION, "GD")
    aligned = torch.eye(2)[PARTITION] * 10  # one direction per partition
    assert global_contrastive_loss(aligned, pos, neg).item() < 1e-3
    assert global_contrastive_loss(torch.randn(8, 2), pos, neg).item() > global_contrastive_loss(aligned, pos, neg)


def test_partitioned_batches_hold_every_partition_of_each_volume():
    vols = []
    for i, n in enumerate((8, 5, 12)):
        img = np.broadcast_to(np.arange(n, dtype=np.float32)[:, None, None] + 100 * i, (n, 40, 40))[None].copy()
        vols.append(Volume(f"v{i}", img, None, np.eye(4), (6.0, 1.5, 1.5)))
    sampler = PatchSampler(vols, 2, (32, 32), 8, seed=0, partitions=4, views=2)
    for step in range(5):
        b = sampler.batch(step)
        part = slice_partition(b["position"], 4)
        assert part.tolist() == [0, 1, 2, 3, 0, 1, 2, 3]
        assert b["volume"][:4].unique().numel() == 1 and b["volume"][4:].unique().numel() == 1
        for k in range(8):  # the slice really is in the recorded partition
            v = int(b["volume"][k])
            z = int(b["image"][k, 0, 16, 16].item()) - 100 * v
            n = vols[v].image.shape[1]
            assert min(int((z + 0.5) * 4 / n), 3) == int(part[k])
    with pytest.raises(ValueError, match="divisible"):
        PatchSampler(vols, 2, (32, 32), 6, seed=0, partitions=4)


def test_gcl_step_backpropagates_into_the_encoder():
    options = GlobalContrastiveOptions(strategy="GD", hidden=16, projection=8)
    method = GlobalContrastive(UNet(2, 1, 2, (4, 8, 16)), options)
    g = torch.Generator().manual_seed(0)
    batch = {"image": torch.randn(8, 1, 32, 32, generator=g), "view2": torch.randn(8, 1, 32, 32, generator=g),
             "position": torch.tensor([0.1, 0.3, 0.6, 0.9] * 2)}
    out = method.training_step(batch, 0.0)
    out.loss.backward()
    assert torch.isfinite(out.loss)
    assert method.net.encoder[0][0].weight.grad.abs().sum() > 0
    assert all(p.grad is None for p in method.net.decoder.parameters())  # only the encoder is trained


def test_gr_draws_random_slices_while_gd_draws_partitioned_batches():
    gr = GlobalContrastive.declare(GlobalContrastiveOptions(strategy="GR"))
    gd = GlobalContrastive.declare(GlobalContrastiveOptions(strategy="GD"))
    gd_minus = GlobalContrastive.declare(GlobalContrastiveOptions(strategy="GD-"))
    assert gr.stream.partitions == 0 and gr.stream.views == 2
    assert gd.stream.partitions == 4 and gd_minus.stream.partitions == 4
    vols = [Volume(f"v{i}", np.random.default_rng(i).random((1, 12, 40, 40)).astype(np.float32), None, np.eye(4),
                   (6.0, 1.5, 1.5)) for i in range(3)]
    sampler = PatchSampler(vols, 2, (32, 32), 8, seed=0, views=2, partitions=gr.stream.partitions)
    parts = [slice_partition(sampler.batch(s)["position"], 4).tolist() for s in range(6)]
    assert any(p != [0, 1, 2, 3, 0, 1, 2, 3] for p in parts)  # not one slice per partition of each volume
