"""Chaitanya et al. local contrastive loss: regions, masks per strategy, frozen encoder, shared-position views."""

import numpy as np
import torch

from frugalseg.config import AugmentConfig
from frugalseg.data.sampling import PatchSampler
from frugalseg.data.volume import Volume
from frugalseg.losses.local_contrastive import extract_regions, local_pair_masks, region_corners
from frugalseg.methods.lcl import LocalContrastive, LocalContrastiveOptions
from frugalseg.nn.unet import UNet


def test_region_corners_follow_the_paper_grid():
    corners = region_corners(47, 47, 3)  # free range 44, as for the paper's 48x48 map minus the region
    assert corners[:9] == [(0, 0), (0, 22), (0, 44), (22, 0), (22, 22), (22, 44), (44, 0), (44, 22), (44, 44)]
    assert corners[9:] == [(11, 11), (11, 33), (33, 11), (33, 33)]


def test_extract_regions_flattens_each_window():
    f = torch.arange(2 * 3 * 6 * 6, dtype=torch.float32).reshape(2, 3, 6, 6)
    out = extract_regions(f, [(0, 0), (3, 2)], 3)
    assert out.shape == (2, 2, 27)
    torch.testing.assert_close(out[1, 1], f[1, :, 3:6, 2:5].flatten())


def _rows(mask, i):
    return set(mask[i].nonzero().flatten().tolist())


def test_local_masks_on_a_hand_made_batch():
    # 2 slices (same partition, different volumes) x 2 views x 2 regions -> 8 embeddings
    #   index:  0  1  2  3  4  5  6  7
    #   image:  0  0  1  1  0  0  1  1   (4..7 are the second views)
    #   region: 0  1  0  1  0  1  0  1
    image = torch.tensor([0, 0, 1, 1, 0, 0, 1, 1])
    region = torch.tensor([0, 1, 0, 1, 0, 1, 0, 1])
    part = torch.zeros(8, dtype=torch.long)
    pos, neg = local_pair_masks(image, region, part, "LR")
    assert _rows(pos, 0) == {4}  # the same region in the other view only
    assert _rows(neg, 0) == {1, 5}  # other regions of the same slice, both views
    pos, neg = local_pair_masks(image, region, part, "LD")
    assert _rows(pos, 0) == {2, 4, 6}  # plus the same region of the same-partition slice of the other volume
    assert _rows(neg, 0) == {1, 3, 5, 7}
    assert not (pos & neg).any()
    other_part = torch.tensor([0, 0, 1, 1, 0, 0, 1, 1])
    pos, _ = local_pair_masks(image, region, other_part, "LD")
    assert _rows(pos, 0) == {4}


def test_shared_spatial_views_differ_in_intensity_only():
    img = np.random.default_rng(0).random((1, 40, 40, 6)).astype(np.float32)
    vol = Volume("v", img, None, np.eye(4), (1.5, 1.5, 6.0))
    aug = AugmentConfig(noise_std=0.0, gamma=[1.0, 1.0], contrast=[1.0, 1.0], probability=1.0)  # brightness only
    b = PatchSampler([vol], 2, (32, 32), 4, seed=1, augment=aug, views=2, shared_spatial=True).batch(0)
    diff = b["view2"] - b["image"]
    # a per-sample constant: the same voxels, shifted in brightness
    torch.testing.assert_close(diff, diff.mean(dim=(1, 2, 3), keepdim=True).expand_as(diff), atol=1e-5, rtol=0)
    assert diff.abs().amax() > 0


def test_encoder_is_frozen_and_the_decoder_learns():
    torch.manual_seed(0)
    net = UNet(2, 1, 2, (4, 8, 16, 32))
    method = LocalContrastive(net, LocalContrastiveOptions("LD", decoder_blocks=2, projection=8))
    enc_before = {k: v.clone() for k, v in net.encoder.state_dict().items()}
    dec_before = {k: v.clone() for k, v in net.decoder.state_dict().items()}
    opt = torch.optim.AdamW([p for p in method.parameters() if p.requires_grad], lr=1e-2)
    g = torch.Generator().manual_seed(0)
    batch = {"image": torch.randn(8, 1, 32, 32, generator=g), "view2": torch.randn(8, 1, 32, 32, generator=g),
             "position": torch.tensor([0.1, 0.3, 0.6, 0.9] * 2)}
    method.train()
    for _ in range(2):
        out = method.training_step(batch, 0.0)
        opt.zero_grad()
        out.loss.backward()
        opt.step()
    assert torch.isfinite(out.loss)
    for k, v in net.encoder.state_dict().items():  # weights and BN running statistics unchanged
        assert torch.equal(v, enc_before[k]), k
    moved = [k for k, v in net.decoder.state_dict().items() if not torch.equal(v, dec_before[k])]
    assert any(k.startswith("0.") for k in moved) and any(k.startswith("1.") for k in moved)
    assert not any(k.startswith("2.") for k in moved)  # blocks after the contrasted one are untouched
