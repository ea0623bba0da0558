import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from frugalseg.errors import UserError
from frugalseg.nn.swin import SwinUNETRNet
from frugalseg.nn.unet import UNet
from frugalseg.nn.weights import load_pretrained


@pytest.mark.parametrize("dims, size", [(2, (37, 45)), (2, (32, 32)), (2, (1 + 16, 9)), (3, (17, 22, 19)),
                                        (3, (16, 16, 16))])
@pytest.mark.parametrize("skip", [True, False])
def test_unet_shapes_and_contract(dims, size, skip):
    chans = (4, 8, 16, 32)
    net = UNet(dims, 2, 3, chans, skip=skip).eval()
    x = torch.randn(2, 2, *size)
    feats = net.encode(x)
    assert len(feats) == 4
    for i, f in enumerate(feats):  # every scale halves (rounding up) and has the configured width
        expected = tuple(-(-s // 2**i) for s in size)
        assert f.shape == (2, chans[i], *expected)
    logits, dec = net.decode(feats)
    assert logits.shape == (2, 3, *size)
    assert [d.shape[1] for d in dec] == [16, 8, 4]  # coarse to fine
    assert dec[-1].shape[2:] == size
    torch.testing.assert_close(net(x), logits)


def test_no_skip_decoder_ignores_encoder_detail():
    net = UNet(2, 1, 2, (4, 8, 16), skip=False).eval()
    feats = net.encode(torch.randn(1, 1, 16, 16))
    changed = [f.clone() for f in feats]
    changed[0] += 5.0  # fine-scale features are not used without skips
    torch.testing.assert_close(net.decode(feats)[0], net.decode(changed)[0])
    net_skip = UNet(2, 1, 2, (4, 8, 16), skip=True).eval()
    feats = net_skip.encode(torch.randn(1, 1, 16, 16))
    changed = [f.clone() for f in feats]
    changed[0] += 5.0
    assert not torch.allclose(net_skip.decode(feats)[0], net_skip.decode(changed)[0])


def test_swinunetr_adapter_contract_2d():
    net = SwinUNETRNet(2, 1, 3, feature_size=12).eval()
    x = torch.randn(1, 1, 40, 50)
    feats = net.encode(x)
    assert [f.shape[-1] for f in feats] == [64, 32, 16, 8, 4, 2]  # padded to 64
    logits, dec = net.decode(feats)
    assert len(dec) == 5
    assert net(x).shape == (1, 3, 40, 50)


def test_load_pretrained_reports_and_refuses(tmp_path):
    src = UNet(2, 1, 4, (4, 8, 16))
    path = tmp_path / "w.pt"
    torch.save({"state_dict": {f"module.{k}": v for k, v in src.state_dict().items()}}, path)
    dst = UNet(2, 1, 2, (4, 8, 16))  # different number of classes: only the head differs
    report = load_pretrained(dst, path)
    assert len(report.mismatched) == 2 and len(report.missing) == 2  # head weight + bias
    torch.testing.assert_close(dst.encoder[0][0].weight, src.encoder[0][0].weight)
    enc_only = {k: v for k, v in src.state_dict().items() if not k.startswith("encoder.2")}
    torch.save(enc_only, path)
    with pytest.raises(UserError, match="encoder parameter 'encoder.2"):
        load_pretrained(UNet(2, 1, 4, (4, 8, 16)), path)
    torch.save({"foo": torch.zeros(3)}, path)
    with pytest.raises(UserError, match="no parameter matches"):
        load_pretrained(UNet(2, 1, 4, (4, 8, 16)), path)
    path.write_bytes(b"not a checkpoint")
    with pytest.raises(UserError, match="not a loadable PyTorch checkpoint"):
        load_pretrained(UNet(2, 1, 4, (4, 8, 16)), path)


def test_encoder_only_init_leaves_a_skipless_decoder_out(tmp_path):
    """PCRLv2 pre-trains a U-Net without skips: part of its decoder has the shapes of the skip U-Net's decoder."""
    nsunet = UNet(3, 1, 2, (4, 8, 16), skip=False)
    path = tmp_path / "ns.pt"
    torch.save(nsunet.state_dict(), path)
    shared = [k for k, v in UNet(3, 1, 2, (4, 8, 16)).state_dict().items()
              if not k.startswith("encoder.") and k in nsunet.state_dict() and nsunet.state_dict()[k].shape == v.shape]
    assert shared  # the trap: with every matching tensor, these decoder tensors load although the layout differs
    torch.manual_seed(1)
    fresh = UNet(3, 1, 2, (4, 8, 16))
    before = {k: v.clone() for k, v in fresh.state_dict().items()}
    report = load_pretrained(fresh, path, parts="encoder")
    after = fresh.state_dict()
    for k in after:
        if k.startswith("encoder."):
            torch.testing.assert_close(after[k], nsunet.state_dict()[k])
        else:  # decoder and head: the fresh network's own initialisation
            torch.testing.assert_close(after[k], before[k])
    assert set(report.skipped) == {k for k in nsunet.state_dict() if not k.startswith("encoder.")}
    assert report.loaded == [k for k in nsunet.state_dict() if k.startswith("encoder.")]
    assert f"skipped (not encoder) {len(report.skipped)}" in report.summary()
    assert set(shared) <= set(load_pretrained(UNet(3, 1, 2, (4, 8, 16)), path).loaded)  # parts="all"


def test_load_pretrained_never_unpickles_objects(tmp_path):
    import argparse
    import os

    path = tmp_path / "pickled.pt"
    torch.save({"hook": os.system, "state_dict": UNet(2, 1, 2, (4, 8)).state_dict()}, path)
    with pytest.raises(UserError, match="not a loadable PyTorch checkpoint"):
        load_pretrained(UNet(2, 1, 2, (4, 8)), path)
    # argparse.Namespace is only attributes: PCRLv2's checkpoints keep their options in one
    torch.save({"opt": argparse.Namespace(a=1), "state_dict": UNet(2, 1, 2, (4, 8)).state_dict()}, path)
    assert len(load_pretrained(UNet(2, 1, 2, (4, 8)), path).loaded) > 0


def test_registry_builds_swinunetr_from_config():
    from frugalseg.config import ModelConfig
    from frugalseg.registry import build_network

    net = build_network(ModelConfig(name="swinunetr", swin_feature_size=12), 2, 1, 3)
    assert isinstance(net, SwinUNETRNet)
    assert net(torch.randn(2, 1, 32, 48)).shape == (2, 3, 32, 48)
    with pytest.raises(UserError, match="model.name: unknown name 'vit'"):
        build_network(ModelConfig(name="vit"), 2, 1, 3)


def test_decode_can_stop_after_some_blocks():
    net = UNet(2, 1, 3, (4, 8, 16, 32)).eval()
    feats = net.encode(torch.randn(1, 1, 32, 32))
    logits, full = net.decode(feats)
    none, part = net.decode(feats, 2)
    assert none is None and len(part) == 2 and logits.shape == (1, 3, 32, 32)
    for a, b in zip(part, full[:2]):
        torch.testing.assert_close(a, b)


def test_a_foreign_file_gives_one_error_and_no_library_warning(tmp_path):
    import warnings

    path = tmp_path / "odd.pt"
    path.write_bytes(b"\x80\x23" + bytes(range(200)))  # claims pickle protocol 35: torch warns before failing
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with pytest.raises(UserError, match="not a loadable PyTorch checkpoint"):
            load_pretrained(UNet(2, 1, 2, (4, 8)), path)
    assert caught == []


def test_batchnorm_folds_into_the_convolution_by_hand():
    import torch.nn as nn

    from frugalseg.nn.fold import fold_batchnorm

    conv = nn.Conv2d(1, 1, 1, bias=False)
    conv.weight.data.fill_(2.0)
    bn = nn.BatchNorm2d(1, eps=0.0)
    bn.running_mean.fill_(1.0)
    bn.running_var.fill_(4.0)
    bn.weight.data.fill_(3.0)
    bn.bias.data.fill_(5.0)
    seq = nn.Sequential(conv, bn, nn.LeakyReLU(0.01))
    with pytest.raises(ValueError, match="training mode"):
        fold_batchnorm(seq)
    assert fold_batchnorm(seq.eval()) == 1
    assert isinstance(seq[1], nn.Identity)
    # 3 * (2x - 1) / sqrt(4) + 5 = 3x + 3.5
    assert seq[0].weight.item() == pytest.approx(3.0) and seq[0].bias.item() == pytest.approx(3.5)
    x = torch.tensor([[[[-2.0, 0.0, 1.0]]]])
    torch.testing.assert_close(seq(x), torch.tensor([[[[-0.025, 3.5, 6.5]]]]))


@pytest.mark.parametrize("dims", [2, 3])
def test_a_folded_unet_predicts_what_it_did_and_keeps_no_batchnorm(dims):
    import torch.nn as nn
    from torch.nn.modules.batchnorm import _BatchNorm

    from frugalseg.nn.fold import fold_batchnorm

    torch.manual_seed(0)
    net = UNet(dims, 1, 3, (4, 8, 16), norm="batch")
    for m in net.modules():  # statistics and affine parameters far from the identity
        if isinstance(m, _BatchNorm):
            m.running_mean.uniform_(-1, 1)
            m.running_var.uniform_(0.5, 2.0)
            m.weight.data.uniform_(0.5, 1.5)
            m.bias.data.uniform_(-0.5, 0.5)
    net.eval()
    x = torch.randn(2, 1, *([12] * dims))
    want = net(x)
    n_bn = sum(isinstance(m, _BatchNorm) for m in net.modules())
    assert n_bn > 0 and fold_batchnorm(net) == n_bn
    assert not any(isinstance(m, _BatchNorm) for m in net.modules())
    torch.testing.assert_close(net(x), want, atol=1e-5, rtol=1e-4)
    inorm = UNet(dims, 1, 3, (4, 8, 16), norm="instance").eval()
    assert fold_batchnorm(inorm) == 0  # nothing else is touched
    assert not any(isinstance(m, nn.Identity) for m in inorm.modules())


@pytest.mark.parametrize("dims, size", [(2, (48, 16)), (3, (16, 24, 16))])
def test_thin_strided_convolutions_run_in_fp32_under_cpu_bf16(dims, size):
    # CPU bf16 kernels give wrong values for a stride-2 convolution of an input 1-2 voxels thin (AMX CPUs,
    # frugalseg.nn.strided): the U-Net's downsamplings convolve such inputs in fp32, the thicker ones in bf16
    torch.manual_seed(0)
    net = UNet(dims, 1, 2, (4, 8, 16, 32, 64), norm="batch")
    dtypes = {}
    for i in range(1, 5):
        net.encoder[i][0].register_forward_hook(lambda m, a, out, i=i: dtypes.__setitem__(i, (a[0].shape, out.dtype)))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        net(torch.randn(2, 1, *size))
    assert min(dtypes[4][0][2:]) == 2  # the deepest downsampling sees a 2-voxel-thin input
    assert dtypes[4][1] == torch.float32
    assert [dtypes[i][1] for i in (1, 2, 3)] == [torch.bfloat16] * 3
    assert net(torch.randn(2, 1, *size)).dtype == torch.float32  # outside autocast nothing changes


def test_a_thin_strided_convolution_under_bf16_matches_fp32():
    # the shape that was wrong in every call on an AMX CPU (2 x 3 x 2 input, 128 -> 256 channels, stride 2)
    from frugalseg.nn.strided import ThinSafeConv3d

    torch.manual_seed(0)
    conv = ThinSafeConv3d(128, 256, 3, stride=2, padding=1, bias=False).to(memory_format=torch.channels_last_3d)
    x = torch.randn(4, 128, 2, 3, 2).contiguous(memory_format=torch.channels_last_3d)
    want = F.conv3d(x, conv.weight, None, 2, 1)  # PyTorch's fp32 convolution
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = conv(x)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, want)


def test_a_thin_stride_1_convolution_under_bf16_has_the_fp32_weight_gradient():
    # the call whose bf16 weight gradient was wrong in 20 of 20 calls on a Zen 5 CPU (AVX512-BF16, no AMX): a
    # stride-1 3-D 256 -> 256 convolution of a 2 x 3 x 2 input, the default 3-D U-Net's deepest level
    from frugalseg.nn.strided import ThinSafeConv3d

    torch.manual_seed(0)
    conv = ThinSafeConv3d(256, 256, 3, padding=1, bias=False).to(memory_format=torch.channels_last_3d)
    x = torch.randn(2, 256, 2, 3, 2).contiguous(memory_format=torch.channels_last_3d)
    grad_out = torch.randn(2, 256, 2, 3, 2)
    F.conv3d(x, conv.weight, None, 1, 1).backward(grad_out)  # PyTorch's fp32 convolution
    want = conv.weight.grad.clone()
    conv.weight.grad = None
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = conv(x)
    assert out.dtype == torch.float32
    out.backward(grad_out)
    torch.testing.assert_close(conv.weight.grad, want)


@pytest.mark.parametrize("dims, size", [(2, (48, 16)), (3, (32, 48, 32))])
def test_every_convolution_of_the_deepest_thin_level_runs_in_fp32_under_cpu_bf16(dims, size):
    torch.manual_seed(0)
    net = UNet(dims, 1, 2, (4, 8, 16, 32, 64), norm="batch")
    dtypes = {}
    for i in range(5):
        for j in (0, 3):  # the block's two convolutions
            net.encoder[i][j].register_forward_hook(
                lambda m, a, out, key=(i, j): dtypes.__setitem__(key, (min(a[0].shape[2:]), out.dtype)))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        net(torch.randn(2, 1, *size))
    assert dtypes[(4, 3)][0] <= 2  # the default 3-D patch reaches a 2-voxel-thin input at the deepest level
    for key, (thinnest, dtype) in dtypes.items():
        assert dtype == (torch.float32 if thinnest <= 2 else torch.bfloat16), key


@pytest.mark.parametrize("dims, shape, out_channels, kernel, stride, padding, bias", [
    (3, (2, 5, 2, 3, 2), 7, (3, 3, 3), (1, 1, 1), (1, 1, 1), True),
    (3, (3, 4, 4, 6, 4), 6, (3, 3, 3), (2, 2, 2), (1, 1, 1), False),
    (3, (2, 3, 1, 2, 1), 4, (3, 3, 3), (1, 1, 1), (1, 1, 1), True),
    (3, (2, 3, 5, 4, 6), 4, (2, 3, 1), (2, 1, 1), (0, 1, 0), True),
    (2, (2, 5, 2, 7), 3, (3, 3), (1, 2), (1, 1), True),
    (2, (1, 4, 3, 3), 2, (1, 1), (1, 1), (0, 0), False),
])
def test_a_convolution_as_one_matrix_product_equals_the_convolution(dims, shape, out_channels, kernel, stride,
                                                                    padding, bias):
    # float64 so that only a wrong index (not the order of the sums) can tell the two apart: output and the
    # gradients of input, weight and bias, from a channels-last and from a contiguous input
    from frugalseg.nn.strided import conv_as_matmul

    conv = F.conv3d if dims == 3 else F.conv2d
    fmt = torch.channels_last_3d if dims == 3 else torch.channels_last
    torch.manual_seed(0)
    for layout in (fmt, torch.contiguous_format):
        x = torch.randn(shape, dtype=torch.float64).contiguous(memory_format=layout).requires_grad_()
        w = torch.randn(out_channels, shape[1], *kernel, dtype=torch.float64).contiguous(memory_format=layout)
        w.requires_grad_()
        b = torch.randn(out_channels, dtype=torch.float64, requires_grad=True) if bias else None
        want = conv(x, w, b, stride, padding)
        got = conv_as_matmul(x, w, b, stride, padding)
        assert got.shape == want.shape
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
        grad_out = torch.randn_like(want)
        grads_want = torch.autograd.grad(want, [x, w] + ([b] if bias else []), grad_out)
        grads_got = torch.autograd.grad(got, [x, w] + ([b] if bias else []), grad_out)
        for g, h in zip(grads_got, grads_want):
            torch.testing.assert_close(g, h, rtol=1e-12, atol=1e-12)


def test_only_small_wide_thin_convolutions_on_the_cpu_become_one_matrix_product(monkeypatch):
    # the default 3-D U-Net's deepest convolution (256 -> 256, a 2 x 3 x 2 input: 48 rows, 6,912 columns) runs as an
    # fp32 matrix product, under bf16 autocast or not; a thin input with many voxels (12,288 rows, 432 columns), a
    # narrow one (32 channels: 864 columns) and every thick input still run PyTorch's convolution - thin ones in
    # fp32 (autocast off), thick ones in bf16 under autocast
    from frugalseg.nn.strided import ThinSafeConv3d

    calls = []
    original = nn.Conv3d._conv_forward
    monkeypatch.setattr(nn.Conv3d, "_conv_forward",
                        lambda self, x, w, b: calls.append(torch.is_autocast_enabled("cpu")) or original(self, x, w, b))
    deep = ThinSafeConv3d(256, 256, 3, padding=1).to(memory_format=torch.channels_last_3d)
    wide = ThinSafeConv3d(16, 16, 3, padding=1)
    narrow = ThinSafeConv3d(32, 32, 3, padding=1)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert deep(torch.randn(4, 256, 2, 3, 2)).dtype == torch.float32
        assert calls == []
        assert wide(torch.randn(4, 16, 2, 48, 32)).dtype == torch.float32
        assert calls == [False]
        assert wide(torch.randn(4, 16, 4, 48, 32)).dtype == torch.bfloat16
        assert calls == [False, True]
        assert narrow(torch.randn(4, 32, 2, 3, 2)).dtype == torch.float32
        assert calls == [False, True, False]
    x = torch.randn(4, 256, 2, 3, 2)
    torch.testing.assert_close(deep(x), F.conv3d(x, deep.weight, deep.bias, 1, 1))  # fp32: the product too
    assert calls == [False, True, False]


@pytest.mark.parametrize("layout, dims", [(torch.channels_last_3d, 3), (torch.channels_last, 2),
                                          (torch.contiguous_format, 3)])
def test_the_global_pool_gradient_comes_in_the_feature_maps_layout(layout, dims):
    # the spatial mean and its gradient, as PyTorch's; the gradient in the feature map's memory layout (PyTorch's
    # own came in the default layout and slowed the LeakyReLU backward of a channels-last map 4x)
    from frugalseg.nn.heads import global_pool

    torch.manual_seed(0)
    shape = (3, 5, 4, 6, 2)[:dims + 2]
    x = torch.randn(shape, dtype=torch.float64).contiguous(memory_format=layout).requires_grad_()
    grad_out = torch.randn(3, 5, dtype=torch.float64)
    got = global_pool(x)
    want = x.mean(dim=tuple(range(2, x.dim())))
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    (g,) = torch.autograd.grad(got, x, grad_out)
    (h,) = torch.autograd.grad(want, x, grad_out)
    torch.testing.assert_close(g, h, rtol=1e-12, atol=1e-12)
    assert g.is_contiguous(memory_format=layout)
    # the sum with a channels-last gradient from another use of the map stays channels-last
    if layout != torch.contiguous_format:
        conv = (nn.Conv3d if dims == 3 else nn.Conv2d)(5, 2, 3, padding=1).double().to(memory_format=layout)
        y = F.leaky_relu(x, 0.01)
        seen = []
        y.register_hook(lambda grad: seen.append(grad.is_contiguous(memory_format=layout)))
        (conv(y).sum() + global_pool(y).sum()).backward()
        assert seen == [True]


def test_an_exported_thin_convolution_is_one_onnx_conv(tmp_path):
    # tracing takes PyTorch's convolution, so the ONNX graph holds a Conv node (not the matrix product's slices,
    # whose shapes the trace would fix) and runs at another batch size
    onnx = pytest.importorskip("onnx")
    ort = pytest.importorskip("onnxruntime")
    import io

    from frugalseg.nn.strided import ThinSafeConv3d

    torch.manual_seed(0)
    conv = ThinSafeConv3d(256, 256, 3, padding=1).eval()
    buffer = io.BytesIO()
    torch.onnx.export(conv, (torch.randn(2, 256, 2, 3, 2),), buffer, dynamo=False, input_names=["x"],
                      output_names=["y"], dynamic_axes={"x": {0: "batch"}, "y": {0: "batch"}})
    ops = [node.op_type for node in onnx.load_from_string(buffer.getvalue()).graph.node]
    assert ops == ["Conv"]
    x = torch.randn(5, 256, 2, 3, 2)
    got = ort.InferenceSession(buffer.getvalue(), providers=["CPUExecutionProvider"]).run(None, {"x": x.numpy()})[0]
    with torch.no_grad():
        torch.testing.assert_close(torch.from_numpy(got), conv(x), rtol=1e-4, atol=1e-4)


def _narrow_pair(monkeypatch, dims, channels, **kwargs):
    """frugalseg's BatchNorm and torch's with the same parameters; the fast backward forced on (it runs only on
    AVX-512 CPUs otherwise, and must be right on every machine that runs it)."""
    from frugalseg.nn import norm
    monkeypatch.setattr(norm, "_avx512", lambda: True)
    ours = (norm.BatchNorm2d if dims == 2 else norm.BatchNorm3d)(channels, **kwargs)
    theirs = (nn.BatchNorm2d if dims == 2 else nn.BatchNorm3d)(channels, **kwargs)
    if ours.affine:
        with torch.no_grad():
            ours.weight.uniform_(0.5, 2.0)
            ours.bias.normal_()
    theirs.load_state_dict(ours.state_dict())
    return ours, theirs


@pytest.mark.parametrize("dims, shape", [(2, (4, 8, 9, 7)), (3, (2, 12, 5, 6, 7)), (2, (3, 8, 5, 7)),  # rows: 4, 4, 1,
                                         (2, (4, 8, 8, 8)), (2, (3, 24, 4, 5))])  # 8, 4
@pytest.mark.parametrize("kwargs", [{}, {"momentum": None}, {"affine": False}, {"track_running_stats": False}])
def test_the_narrow_batchnorm_backward_equals_torchs_in_float64(monkeypatch, dims, shape, kwargs):
    torch.manual_seed(0)
    ours, theirs = _narrow_pair(monkeypatch, dims, shape[1], **kwargs)
    layout = torch.channels_last if dims == 2 else torch.channels_last_3d
    x = (torch.randn(*shape, dtype=torch.float64) * 3 + 1.5).contiguous(memory_format=layout)
    dy = torch.randn(*shape, dtype=torch.float64).contiguous(memory_format=layout)
    ref = theirs.double()
    x64 = x.clone().requires_grad_()
    y64 = ref(x64)
    y64.backward(dy)
    for step in range(2):  # the running statistics move alike over two steps
        x32 = x.float().requires_grad_()
        y = ours(x32)
        assert type(y.grad_fn).__name__ == "_NarrowBatchNormBackward"
        dy32 = dy.float()
        y.backward(dy32)
        assert torch.equal(dy32, dy.float())  # the incoming gradient is read, never written
        if step == 0:
            torch.testing.assert_close(y.double(), y64, rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(x32.grad.double(), x64.grad, rtol=1e-5, atol=1e-5)
            assert x32.grad.is_contiguous(memory_format=layout)
            if ours.affine:
                torch.testing.assert_close(ours.weight.grad.double(), ref.weight.grad, rtol=1e-5, atol=1e-4)
                torch.testing.assert_close(ours.bias.grad.double(), ref.bias.grad, rtol=1e-5, atol=1e-4)
        else:
            ref(x.clone())
    for (name, a), b in zip(ours.state_dict().items(), ref.state_dict().values()):
        torch.testing.assert_close(a.double(), b.double(), rtol=1e-6, atol=1e-6, msg=name)


def test_the_narrow_batchnorm_backward_in_bf16_is_torchs_to_bf16_rounding(monkeypatch):
    torch.manual_seed(1)
    ours, theirs = _narrow_pair(monkeypatch, 2, 8)
    x = torch.randn(8, 8, 16, 16).contiguous(memory_format=torch.channels_last)
    dy = torch.randn(8, 8, 16, 16).contiguous(memory_format=torch.channels_last)
    import copy
    exact = copy.deepcopy(theirs).double()
    grads = []
    for bn, dtype in ((ours, torch.bfloat16), (theirs, torch.bfloat16), (exact, torch.float64)):
        xi = x.to(dtype).contiguous(memory_format=torch.channels_last).requires_grad_()
        bn(xi).backward(dy.to(dtype))
        grads.append(xi.grad.double())
    ref = grads[2]
    for g in grads[:2]:  # both within bf16 rounding of the exact gradient, and as close to it as torch's
        assert (g - ref).abs().max() < 0.02 * ref.abs().max()
    assert (grads[0] - ref).abs().mean() <= 1.5 * (grads[1] - ref).abs().mean()


def test_only_narrow_channels_last_training_maps_take_the_fast_backward(monkeypatch):
    ours, _ = _narrow_pair(monkeypatch, 2, 8)
    cl = torch.randn(2, 8, 6, 6).contiguous(memory_format=torch.channels_last).requires_grad_()

    def kind(bn, x):
        return type(bn(x).grad_fn).__name__

    assert kind(ours, cl) == "_NarrowBatchNormBackward"
    assert kind(ours, torch.randn(2, 8, 6, 6, requires_grad=True)) != "_NarrowBatchNormBackward"  # default layout
    with torch.no_grad():
        assert ours(cl).grad_fn is None
    for channels, ours_expected in ((16, False), (24, True), (32, False), (40, False)):
        bn, _ = _narrow_pair(monkeypatch, 2, channels)
        x = torch.randn(2, channels, 6, 6).contiguous(memory_format=torch.channels_last).requires_grad_()
        assert (kind(bn, x) == "_NarrowBatchNormBackward") == ours_expected, channels
    ours.eval()
    assert kind(ours, cl) != "_NarrowBatchNormBackward"
    from frugalseg.nn import norm
    monkeypatch.setattr(norm, "_avx512", lambda: False)
    assert kind(ours.train(), cl) != "_NarrowBatchNormBackward"
    net = UNet(2, 1, 2, (8, 16), norm="batch")
    assert all(isinstance(m, norm.BatchNorm2d) for m in net.modules() if isinstance(m, nn.BatchNorm2d))
    assert any(isinstance(m, norm.BatchNorm2d) for m in net.modules())


@pytest.mark.parametrize("dims", [2, 3])
def test_a_narrow_unet_compiles_as_one_graph(dims):
    """`train.compile` on the 8-128 U-Net: the narrow BatchNorm's CPU check must not break the compiled graph (a
    break made one graph per layer, whose recompilations ended in an inductor error at the first 3-D step)."""
    net = UNet(dims, 1, 2, (8, 16, 32), norm="batch")
    layout = torch.channels_last if dims == 2 else torch.channels_last_3d
    net = net.to(memory_format=layout)
    x = torch.randn(2, 1, *([16] * dims)).contiguous(memory_format=layout).requires_grad_()
    compiled = torch.compile(net, fullgraph=True, backend="eager")  # fullgraph: a graph break raises
    y = compiled(x)
    y.sum().backward()
    torch.testing.assert_close(y, net(x))


@pytest.mark.parametrize("dims", [2, 3])
def test_skip_concatenation_gives_torch_cat_values_and_a_dense_skip_gradient(dims, monkeypatch):
    from frugalseg.nn import unet as unet_module
    from frugalseg.nn.unet import cat_skip

    layout = torch.channels_last if dims == 2 else torch.channels_last_3d
    size = (6, 5) if dims == 2 else (4, 5, 3)
    g = torch.Generator().manual_seed(0)
    a = torch.randn(2, 8, *size, generator=g).to(memory_format=layout).requires_grad_()
    b = torch.randn(2, 12, *size, generator=g).to(memory_format=layout).requires_grad_()
    up = torch.randn(2, 20, *size, generator=g)
    out = cat_skip(a, b)
    assert out.grad_fn is not None and "SkipCat" in type(out.grad_fn).__name__
    assert torch.equal(out, torch.cat([a, b], 1))
    ga, gb = torch.autograd.grad(out, (a, b), up)
    assert torch.equal(ga, up[:, :8]) and torch.equal(gb, up[:, 8:])
    assert ga.is_contiguous(memory_format=layout)  # dense, in a's layout: not a slice of the 20-channel gradient
    # routed only where it pays: 32 or more channels, the default layout and no gradient take torch.cat
    wide = torch.randn(2, 32, *size).to(memory_format=layout).requires_grad_()
    assert "SkipCat" not in type(cat_skip(wide, b).grad_fn).__name__
    assert "SkipCat" not in type(cat_skip(a.detach().contiguous().requires_grad_(), b).grad_fn).__name__
    with torch.no_grad():
        assert cat_skip(a, b).grad_fn is None
    # a U-Net's weights and input gradient are the same bits with torch.cat
    net = UNet(dims, 1, 3, channels=(8, 16, 32, 64), norm="batch").to(memory_format=layout)
    x = torch.randn(2, 1, *[8 * s for s in size[:2]], *([8] if dims == 3 else []), generator=g)
    x = x.to(memory_format=layout).requires_grad_()

    def grads():
        net.zero_grad()
        loss = net(x).square().mean()
        return [t.clone() for t in torch.autograd.grad(loss, [x, *net.parameters()])]

    taken = []

    def recording(p, q):
        y = cat_skip(p, q)
        taken.append("SkipCat" in type(y.grad_fn).__name__)
        return y

    monkeypatch.setattr(unet_module, "cat_skip", recording)
    ours = grads()
    assert taken == [False, True, True]  # the 16- and 8-channel levels take it, 32 channels not
    monkeypatch.setattr(unet_module, "cat_skip", lambda p, q: torch.cat([p, q], 1))
    for mine, plain in zip(ours, grads()):
        assert torch.equal(mine, plain)
