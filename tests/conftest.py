from __future__ import annotations

from pathlib import Path

import pytest

from frugalseg.data.synthetic import write_phantoms

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"

# small and fast settings for every test that trains
TINY = [
    "train.steps=6", "train.log_every=2", "train.checkpoint_every=3", "data.batch_size=4",
    "model.channels=[8,16,32]", "optim.warmup_steps=2",
]


@pytest.fixture(scope="session")
def phantoms_2d(tmp_path_factory) -> Path:
    return write_phantoms(tmp_path_factory.mktemp("ph2d"), spatial_dims=2, n_train=5, n_val=2, n_test=2)


@pytest.fixture(scope="session")
def phantoms_3d(tmp_path_factory) -> Path:
    return write_phantoms(tmp_path_factory.mktemp("ph3d"), spatial_dims=3, n_train=3, n_val=1, n_test=1)


@pytest.fixture
def tiny_2d() -> list[str]:
    return TINY + ["data.spatial_dims=2", "data.patch_size=[32,32]"]


@pytest.fixture
def tiny_3d() -> list[str]:
    return TINY + ["data.patch_size=[24,24,24]"]


def shared(name: str) -> Path:
    path = SHARED_DATA / name
    if not path.is_dir():
        pytest.skip(f"real data folder {path} not present")
    return path
