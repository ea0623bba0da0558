"""ONNX export: ONNX Runtime matches PyTorch within 1e-4 on a synthetic volume; predict takes the .onnx file."""

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from frugalseg.cli import app
from frugalseg.data.readers import open_source
from frugalseg.eval.inference import load_model, predict_probabilities

pytest.importorskip("onnxruntime")


@pytest.fixture(scope="module")
def run_3d(phantoms_3d, tmp_path_factory):
    from frugalseg.run import train

    out = tmp_path_factory.mktemp("onnx") / "run"
    # fp32: ONNX runs the fp32 weights in fp32, so PyTorch is compared in fp32 too (bf16 autocast, where the CPU
    # multiplies bf16, would differ from it by bf16 rounding)
    train(phantoms_3d, "supervised", 1, 0, out, sets=["train.steps=2", "data.batch_size=2", "model.channels=[4,8,16]",
                                                      "data.patch_size=[24,24,24]", "train.precision=fp32"],
          show_progress=False)
    return out


def test_onnx_matches_pytorch_on_a_synthetic_volume(run_3d, phantoms_3d, tmp_path):
    from frugalseg.eval.export import load_onnx_model

    out = tmp_path / "model.onnx"
    result = CliRunner().invoke(app, ["export", str(run_3d), str(out)])
    assert result.exit_code == 0, result.output
    vol = open_source(phantoms_3d).load(open_source(phantoms_3d).cases("val")[0])
    torch_model, onnx_model = load_model(run_3d, torch.device("cpu")), load_onnx_model(out)
    pre = torch_model.preprocessor(vol)
    a = predict_probabilities(torch_model, pre.image, pre.spacing)
    b = predict_probabilities(onnx_model, pre.image, pre.spacing)
    assert a.shape == b.shape and np.abs(a - b).max() < 1e-4

    again = CliRunner().invoke(app, ["export", str(run_3d), str(out)])
    assert again.exit_code == 2 and "already exists (pass --force" in again.output


def test_predict_accepts_the_onnx_file(run_3d, phantoms_3d, tmp_path):
    import nibabel as nib

    out = tmp_path / "m.onnx"
    assert CliRunner().invoke(app, ["export", str(run_3d), str(out)]).exit_code == 0
    src = open_source(phantoms_3d)
    image = sorted((phantoms_3d / "imagesTr").glob("*.nii.gz"))[0]
    seg_t, seg_o = tmp_path / "t.nii.gz", tmp_path / "o.nii.gz"
    assert CliRunner().invoke(app, ["predict", str(run_3d), str(image), str(seg_t)]).exit_code == 0
    result = CliRunner().invoke(app, ["predict", str(out), str(image), str(seg_o)])
    assert result.exit_code == 0, result.output
    t, o = nib.load(seg_t), nib.load(seg_o)
    assert np.array_equal(t.affine, o.affine) and np.mean(np.asarray(t.dataobj) == np.asarray(o.dataobj)) > 0.999
    assert src.num_classes >= 2


def test_export_refuses_bad_input_in_one_line(run_3d, tmp_path, monkeypatch):
    bad = CliRunner().invoke(app, ["export", str(run_3d), str(tmp_path / "m.txt")])
    assert bad.exit_code == 2 and "output must end in .onnx" in bad.output
    junk = tmp_path / "junk.onnx"
    junk.write_bytes(b"not a model")
    import nibabel as nib
    import numpy as np

    nib.save(nib.Nifti1Image(np.zeros((8, 8, 8), np.float32), np.eye(4)), tmp_path / "x.nii.gz")
    res = CliRunner().invoke(app, ["predict", str(junk), str(tmp_path / "x.nii.gz"), str(tmp_path / "y.nii.gz")])
    assert res.exit_code == 2 and "junk.onnx" in res.output
    import builtins

    real_import = builtins.__import__

    def no_onnx(name, *a, **k):
        if name in ("onnx", "onnxruntime"):
            raise ImportError(name)
        return real_import(name, *a, **k)

    monkeypatch.setattr(builtins, "__import__", no_onnx)
    res = CliRunner().invoke(app, ["export", str(run_3d), str(tmp_path / "n.onnx")])
    assert res.exit_code == 2 and "needs the onnx extra" in res.output
    assert not (tmp_path / "n.onnx").exists()
