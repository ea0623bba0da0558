import pytest

from frugalseg.config import build_config, parse_set
from frugalseg.errors import UserError


def test_presets_and_overrides_layer_in_order(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("train:\n  steps: 77\noptim:\n  lr: 0.5\n")
    cfg = build_config(2, f, ["optim.lr=1", "data.augment.flip=true"])
    assert cfg.data.spatial_dims == 2 and cfg.data.patch_size == [128, 128]  # 2-D preset
    assert cfg.train.steps == 77  # file
    assert cfg.optim.lr == 1.0 and isinstance(cfg.optim.lr, float)  # --set wins, int coerced to float
    assert cfg.data.augment.flip is True


def test_spatial_dims_override_switches_preset():
    cfg = build_config(2, None, ["data.spatial_dims=3"])
    assert cfg.data.patch_size == [32, 48, 32]


@pytest.mark.parametrize(
    "item, message",
    [
        ("train.stepz=3", "unknown config key 'train.stepz'"),
        ("train.steps=abc", "config key 'train.steps' expects int, got 'abc'"),
        ("train.steps=1.5", "config key 'train.steps' expects int"),
        ("model.norm=group", "config key 'model.norm' must be one of instance, batch"),
        ("data.patch_size=[64]", "'data.patch_size' needs 2 values"),
        ("train", "--set 'train': expected key=value"),
        ("train.steps=0", "'train.steps' must be positive"),
    ],
)
def test_bad_overrides_are_rejected_by_name(item, message):
    with pytest.raises(UserError, match=None) as info:
        build_config(2, None, [item])
    assert message in str(info.value)


def test_parse_set_nests_and_parses_yaml():
    assert parse_set(["a.b.c=[1, 2]"]) == [{"a": {"b": {"c": [1, 2]}}}]


def test_bad_yaml_file_is_one_line(tmp_path):
    f = tmp_path / "bad.yaml"
    f.write_text("a: [1, 2\n")
    with pytest.raises(UserError, match="not valid YAML"):
        build_config(2, f, [])


def test_exponent_floats_are_numbers_on_the_command_line_and_in_files(tmp_path):
    # YAML 1.1 (PyYAML) reads 1e-3 as a string: `--set optim.lr=1e-3` used to be refused
    f = tmp_path / "c.yaml"
    f.write_text("optim:\n  weight_decay: 5E-5\nmethod:\n  ema: 9.9e-1\n")
    cfg = build_config(2, f, ["optim.lr=1e-3", "method.temperature=-2e+1"])
    assert cfg.optim.lr == 0.001 and cfg.optim.weight_decay == 5e-5
    assert cfg.method["ema"] == 0.99 and cfg.method["temperature"] == -20.0  # untyped method options too
    assert parse_set(["a=1", "b=1e", "c=e5", "d=1_000"]) == [{"a": 1}, {"b": "1e"}, {"c": "e5"}, {"d": 1000}]


@pytest.mark.parametrize("method, dims, decay", [("gcl", 2, 0.0), ("lcl", 2, 0.0), ("byol", 2, 1e-6),
                                                ("pcrlv2", 3, 1e-4), ("voco", 3, 0.01)])
def test_pre_trainings_take_their_papers_weight_decay_and_no_clipping(method, dims, decay):
    cfg = build_config(dims, method=method)
    assert cfg.train.grad_clip == 0.0 and cfg.optim.weight_decay == pytest.approx(decay)
    assert build_config(dims, method="supervised").train.grad_clip == 12.0  # training keeps the project's clip
