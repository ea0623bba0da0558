import numpy as np
import pytest
import torch

from frugalseg.config import AugmentConfig
from frugalseg.data.augment import apply_spatial
from frugalseg.data.preprocess import Preprocessor, normalise
from frugalseg.data.readers import DataSource
from frugalseg.data.sampling import PatchSampler
from frugalseg.data.splits import few_label_split
from frugalseg.data.synthetic import phantom
from frugalseg.data.volume import Volume, slice_axis
from frugalseg.errors import UserError


def test_normalisations_known_values():
    img = np.array([[[-1000.0, 0.0, 100.0, 3000.0]]], dtype=np.float32)
    np.testing.assert_allclose(normalise(img, "ct:abdomen")[0, 0], [0, 175 / 425, 275 / 425, 1], rtol=1e-6)
    np.testing.assert_allclose(normalise(img, "ct:chest")[0, 0], [0, 500 / 1500, 600 / 1500, 1], rtol=1e-6)
    z = normalise(img, "zscore")
    assert abs(z.mean()) < 1e-6 and abs(z.std() - 1) < 1e-5
    mm = normalise(img, "minmax")[0, 0]
    np.testing.assert_allclose(mm, (img[0, 0] + 1000) / 4000, rtol=1e-6)
    p = normalise(np.arange(101, dtype=np.float32)[None, None], "percentile", (10, 90))[0, 0]
    assert p[0] == 0 and p[-1] == 1 and abs(p[50] - 0.5) < 1e-6


def test_resampling_roundtrip_restores_shape():
    vol = Volume("c", np.random.rand(1, 10, 12, 5).astype(np.float32),
                 np.zeros((10, 12, 5), np.int64), np.eye(4), (1.0, 1.0, 3.0))
    pre = Preprocessor("none", spacing=(2.0, 2.0, 1.5))
    out = pre(vol)
    assert out.spatial_shape == (5, 6, 10) and out.label.shape == (5, 6, 10)
    back = Preprocessor.restore_shape(np.ones((2, 5, 6, 10), np.float32), vol.spatial_shape)
    assert back.shape == (2, 10, 12, 5)


def test_slice_axis_is_coarsest():
    assert slice_axis((1.5, 1.5, 6.0), (64, 64, 10)) == 2
    assert slice_axis((10.0, 1.0, 1.0), (9, 200, 180)) == 0
    assert slice_axis((1.0, 1.0, 1.0), (40, 8, 40)) == 1  # isotropic: fewest voxels


def _source(pool):
    return DataSource(root="x", format="t", class_names=["bg", "fg"], in_channels=1,
                      splits={"train": pool + ["extra"], "val": ["v"]}, labelled_pool=pool)


def test_few_label_split_reproducible_and_nested():
    src = _source([f"c{i:02d}" for i in range(20)])
    a, b = few_label_split(src, 2, 3), few_label_split(src, 2, 3)
    assert a["labelled_cases"] == b["labelled_cases"]
    eight = few_label_split(src, 8, 3)["labelled_cases"]
    assert eight[:2] == a["labelled_cases"]
    assert few_label_split(src, 2, 4)["labelled_cases"] != a["labelled_cases"]
    assert "extra" in a["unlabelled_cases"]
    with pytest.raises(UserError, match="--labelled 21: only 20 labelled training volume"):
        few_label_split(src, 21, 0)
    with pytest.raises(UserError, match="at least 1"):
        few_label_split(src, 0, 0)


def test_identity_spatial_params_give_the_central_crop():
    img = torch.arange(2 * 1 * 10 * 10, dtype=torch.float32).reshape(2, 1, 10, 10)
    lab = (img[:, 0] % 3).long()
    params = {"angles": torch.zeros(2, 3), "scale": torch.ones(2), "flips": torch.zeros(2, 2, dtype=torch.bool)}
    out_img, out_lab = apply_spatial(img, lab, params, (6, 6))
    torch.testing.assert_close(out_img, img[:, :, 2:8, 2:8])
    torch.testing.assert_close(out_lab, lab[:, 2:8, 2:8])
    params["flips"][1, 0] = True
    out_img, out_lab = apply_spatial(img, lab, params, (6, 6))
    torch.testing.assert_close(out_img[1], img[1, :, 2:8, 2:8].flip(1))
    torch.testing.assert_close(out_lab[1], lab[1, 2:8, 2:8].flip(0))


def test_sampler_is_deterministic_per_step_and_keeps_labels_aligned():
    image, label = phantom(1, (40, 40, 6), (1.5, 1.5, 6.0))
    vol = Volume("p", image[None] / image.max(), label.astype(np.int64), np.eye(4), (1.5, 1.5, 6.0))
    s = PatchSampler([vol], 2, (32, 32), 4, seed=7, augment=AugmentConfig())
    a, b, c = s.batch(5), s.batch(5), s.batch(6)
    torch.testing.assert_close(a["image"], b["image"])
    assert not torch.equal(a["image"], c["image"])
    assert a["image"].shape == (4, 1, 32, 32) and a["label"].shape == (4, 32, 32)
    plain = PatchSampler([vol], 2, (32, 32), 8, seed=0, foreground_oversample=1.0)
    batch = plain.batch(0)
    assert (batch["label"] > 0).any(dim=(1, 2)).all()  # every sample centred on foreground
    # without augmentation the crop is copied verbatim: label values match the source where image matches
    assert set(batch["label"].unique().tolist()) <= {0, 1, 2, 3}


def test_plain_3d_crops_copy_the_volume_at_the_recorded_centre_and_pad_outside():
    shape = (9, 11, 7)
    image = (np.arange(np.prod(shape), dtype=np.float32).reshape(1, *shape) + 5.0)  # minimum 5: the image padding
    label = (np.arange(np.prod(shape)).reshape(shape) % 4).astype(np.int64)
    vol = Volume("v", image, label, np.eye(4), (1.0, 1.0, 1.0))
    patch = (6, 8, 10)  # larger than the volume along the last axis: every crop is padded there
    batch = PatchSampler([vol], 3, patch, 6, seed=2, foreground_oversample=0.5).batch(4)
    assert batch["label"].dtype == torch.int64 and batch["image"].dtype == torch.float32
    for k in range(6):
        centre = np.rint(batch["position"][k].numpy().astype(np.float64) * shape - 0.5).astype(int)
        want_img = np.full((1, *patch), 5.0, dtype=np.float32)
        want_lab = np.zeros(patch, dtype=np.int64)
        src, dst = [], []
        for c, w, n in zip(centre, patch, shape):
            start = c - w // 2
            lo, hi = max(start, 0), min(start + w, n)
            src.append(slice(lo, hi))
            dst.append(slice(lo - start, hi - start))
        want_img[(slice(None), *dst)] = image[(slice(None), *src)]
        want_lab[tuple(dst)] = label[tuple(src)]
        np.testing.assert_array_equal(batch["image"][k].numpy(), want_img)
        np.testing.assert_array_equal(batch["label"][k].numpy(), want_lab)


def test_two_views_share_the_crop_and_record_where_it_came_from():
    image = np.arange(40 * 40 * 6, dtype=np.float32).reshape(1, 40, 40, 6)  # slice axis 2 (spacing 6 mm)
    vols = [Volume(f"v{i}", image + 100_000 * i, None, np.eye(4), (1.5, 1.5, 6.0)) for i in range(2)]
    plain = PatchSampler(vols, 2, (40, 40), 6, seed=3, views=2).batch(0)
    torch.testing.assert_close(plain["view2"], plain["image"])  # no augmentation: the same crop twice
    assert set(plain["volume"].tolist()) == {0, 1}
    for k in range(6):  # every voxel value encodes (volume, slice): both agree with the recorded metadata
        v, z = int(plain["volume"][k]), int(plain["position"][k] * 6)
        inside = plain["image"][k, 0][plain["image"][k, 0] != 100_000 * v]  # drop the padding (volume minimum)
        assert inside.numel() > 0
        assert ((inside // 100_000) == v).all() and ((inside % 100_000) % 6 == z).all()
    aug = PatchSampler(vols, 2, (32, 32), 3, seed=3, augment=AugmentConfig(), views=2)
    one = PatchSampler(vols, 2, (32, 32), 3, seed=3, augment=AugmentConfig())
    b = aug.batch(4)
    torch.testing.assert_close(b["image"], one.batch(4)["image"])  # the first view is the single-view batch
    assert not torch.equal(b["image"], b["view2"])
    assert "label" not in b and b["position"].shape == (3,)


def test_2d_models_resample_in_plane_whatever_the_slice_axis():
    pre = Preprocessor("none", spacing=(1.5, 1.5), spatial_dims=2)
    h5_like = Volume("a", np.zeros((1, 9, 150, 120), np.float32), None, np.eye(4), (10.0, 1.0, 1.0))
    nifti_like = Volume("b", np.zeros((1, 150, 120, 9), np.float32), None, np.eye(4), (1.0, 1.0, 10.0))
    assert pre.target_shape(h5_like) == (9, 100, 80)
    assert pre.target_shape(nifti_like) == (100, 80, 9)
    legacy = Preprocessor("none", spacing=(10.0, 1.5, 1.5), spatial_dims=2)  # 3 values: the last two are used
    assert legacy.target_shape(nifti_like) == (100, 80, 9)
