"""slimops.quant: the LSQ and FDA binary layers, quantize_model, and the packed export (docs/quantization.md).

- LSQ layers: the LSQ initialisation, weights take at most 2^bits distinct values per output channel, the
  activation quantiser turns unsigned after a ReLU, gradients reach weights, scales and inputs;
- binary layers: sign forward (two values per channel, ±mean|W|), the FDA surrogate gradient (equal to the op's
  backward on the weights), the noise adaptation only while training and under α > 0, the paper's schedule;
- quantize_model: first and last layer at 8 bits, the others at the asked bits, binary for 1/1, errors;
- export: packing round-trips every bit width, the blob loads with weights_only=True, reloads to the same outputs,
  and is ~bits/32 of the float model's size.
"""
from __future__ import annotations

import io
import math

import pytest
import torch
from torch import nn

from slimops import quant as Q
from slimops.models import build
from slimops.reference import quant as ref

pytestmark = pytest.mark.usefixtures("one_thread")


def _small_cnn():
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                         nn.Conv2d(8, 16, 3, padding=1, bias=False), nn.BatchNorm2d(16), nn.ReLU(),
                         nn.Conv2d(16, 16, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                         nn.Linear(16, 10))


def test_lsq_quantizer_initialises_and_quantises():
    torch.manual_seed(0)
    q = Q.LSQQuantizer(4, per_channel_axis=0, channels=6)
    w = torch.randn(6, 5, 3, 3)
    y = q(w)
    want = 2 * w.abs().reshape(6, -1).mean(1) / math.sqrt(7)
    torch.testing.assert_close(q.scale.detach(), want)
    for c in range(6):
        assert y[c].unique().numel() <= 16
    a = Q.LSQQuantizer(3, signed=None)
    a(torch.relu(torch.randn(2, 4, 5, 5)))
    assert not a.is_signed  # non-negative first batch: the unsigned grid [0, 7]


def test_quant_layers_match_the_functional_composite_and_train():
    torch.manual_seed(1)
    conv = nn.Conv2d(4, 6, 3, padding=1)
    qc = Q.QuantConv2d.from_float(conv, wbits=4, abits=4)
    x = torch.relu(torch.randn(2, 4, 7, 7)).requires_grad_()
    y = qc(x)
    wq = ref.fake_quantize(conv.weight, qc.weight_quant.scale.detach(), None, 4, 0, True)
    xq = ref.fake_quantize(x, qc.act_quant.scale.detach(), None, 4, None, False)
    torch.testing.assert_close(y, nn.functional.conv2d(xq, wq, conv.bias, padding=1))
    y.square().sum().backward()
    for t in (qc.weight, qc.weight_quant.scale, qc.act_quant.scale, x):
        assert t.grad is not None and torch.isfinite(t.grad).all() and t.grad.abs().sum() > 0


def test_binary_layer_forward_and_fda_gradient():
    torch.manual_seed(2)
    lin = nn.Linear(16, 5)
    b = Q.BinaryLinear.from_float(lin, surrogate="fda", noise_adaptation=True).eval()
    x = torch.randn(3, 16, requires_grad=True)
    y = b(x)
    m = lin.weight.abs().mean(1, keepdim=True)
    want = nn.functional.linear(ref.fda_sign(x), ref.fda_sign(lin.weight) * m, lin.bias)
    torch.testing.assert_close(y, want)
    y.sum().backward()
    gw_sign = (ref.fda_sign(x).detach().t() @ torch.ones(3, 5)).t() * m  # dL/d sign(W)
    torch.testing.assert_close(b.weight.grad, ref.fda_sign_backward(gw_sign, lin.weight.detach(), 10, 0.1, "fda", 1.0))


def test_noise_adaptation_only_in_training_and_schedule():
    torch.manual_seed(3)
    conv = nn.Conv2d(4, 8, 3, padding=1)
    b = Q.BinaryConv2d.from_float(conv)
    with torch.no_grad():
        b.weight_noise.fc2.weight.normal_()
    x = torch.randn(2, 4, 6, 6)
    train_out = b.train()(x)
    eval_out = b.eval()(x)
    assert not torch.allclose(train_out, eval_out)
    Q.set_fda_schedule(b, epoch=0, epochs=10)
    assert int(b.n_terms) == 10 and float(b.alpha) == pytest.approx(0.05 * (1 + math.cos(math.pi * 0.1)))
    Q.set_fda_schedule(b, epoch=9, epochs=10)
    assert int(b.n_terms) == 19 and float(b.alpha) == pytest.approx(0.0, abs=1e-9)
    torch.testing.assert_close(b.train()(x), b.eval()(x))  # α = 0: training forward = the binary net
    ste = Q.BinaryConv2d.from_float(conv, surrogate="ste", noise_adaptation=False)
    assert ste.weight_noise is None and float(ste.alpha) == 0.0


def test_quantize_model_layers_and_errors():
    model = _small_cnn()
    q = Q.quantize_model(model, 4, 4)
    kinds = [(type(m).__name__, getattr(m, "wbits", None)) for m in q.modules()
             if isinstance(m, (Q.QuantConv2d, Q.QuantLinear, Q.BinaryConv2d, Q.BinaryLinear))]
    assert kinds == [("QuantConv2d", 8), ("QuantConv2d", 4), ("QuantConv2d", 4), ("QuantLinear", 8)]
    assert type(model[0]) is nn.Conv2d  # not in place by default
    b = Q.quantize_model(model, 1, 1, method="ste")
    assert [type(m).__name__ for m in b.modules() if hasattr(m, "weight") and m.weight.dim() > 1] == \
        ["QuantConv2d", "BinaryConv2d", "BinaryConv2d", "QuantLinear"]
    assert b[3].surrogate == "ste"
    with pytest.raises(ValueError, match="wbits"):
        Q.quantize_model(model, 0, 4)
    with pytest.raises(ValueError, match="binary"):
        Q.quantize_model(model, 4, 4, method="fda")
    with pytest.raises(ValueError, match="unknown method"):
        Q.quantize_model(model, 4, 4, method="nope")


@pytest.mark.parametrize("bits", [1, 2, 3, 4, 5, 8, 12, 16])
def test_pack_round_trip(bits):
    u = torch.randint(0, 2 ** bits, (1001,))
    p = Q.pack_levels(u, bits)
    assert torch.equal(Q.unpack_levels(p, bits, u.numel()), u.to(torch.int32))
    slot = {1: 1, 2: 2, 3: 4, 4: 4, 5: 8, 8: 8}.get(bits, 16)
    assert p.numel() * p.element_size() == math.ceil(1001 * slot / 8) if slot < 16 else p.numel() == 1001


@pytest.mark.parametrize("wbits,abits,method", [(4, 4, "lsq"), (2, 2, "lsq"), (1, 1, "fda"), (8, 32, "lsq")])
def test_export_reloads_to_the_same_outputs(wbits, abits, method):
    torch.manual_seed(4)
    model = build("vgg11", num_classes=10, in_channels=1, width=0.25)
    q = Q.quantize_model(model, wbits, abits, method=method).eval()
    x = torch.randn(4, 1, 32, 32)
    want = q(x)
    blob = Q.export(q)
    buf = io.BytesIO()
    torch.save(blob, buf)
    buf.seek(0)
    loaded = torch.load(buf, weights_only=True)
    fresh = Q.quantize_model(build("vgg11", num_classes=10, in_channels=1, width=0.25), wbits, abits,
                             method=method).eval()
    Q.load_exported(fresh, loaded)
    torch.testing.assert_close(fresh(x), want, rtol=1e-5, atol=1e-5)
    float_bytes = sum(p.numel() * 4 for p in model.state_dict().values())
    assert Q.exported_nbytes(blob) < float_bytes * (0.5 if wbits <= 4 else 0.6)


def test_load_exported_refuses_other_files():
    q = Q.quantize_model(_small_cnn(), 4, 4)
    with pytest.raises(ValueError, match="not an exported"):
        Q.load_exported(q, {"state": {}})
    blob = Q.export(q)
    other = Q.quantize_model(nn.Sequential(nn.Conv2d(3, 8, 3), nn.Linear(8, 2)), 4, 4)
    with pytest.raises(ValueError, match="does not match"):
        Q.load_exported(other, blob)
