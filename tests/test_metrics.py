"""slimops.pruning.metrics: parameter and MAC counts on hand-computable models, latency, accuracy."""
import pytest
import torch
from torch import nn

from slimops.data.image_data import ImageData
from slimops.pruning.metrics import accuracy, count_macs, count_params, measure_latency


def test_count_params():
    m = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.Linear(4, 2))
    assert count_params(m) == (8 * 3 * 9 + 8) + (8 + 8) + (4 * 2 + 2)


@pytest.mark.parametrize("conv, in_hw, macs", [
    (nn.Conv2d(3, 8, 3, padding=1), 10, 8 * 10 * 10 * 3 * 9),      # same-size output
    (nn.Conv2d(3, 8, 3, stride=2), 10, 8 * 4 * 4 * 3 * 9),         # (10 - 3) // 2 + 1 = 4
    (nn.Conv2d(8, 16, 3, padding=1, groups=4), 5, 16 * 25 * 2 * 9),  # 8 / 4 input channels per group
    (nn.Conv2d(8, 8, 3, padding=1, groups=8, bias=False), 5, 8 * 25 * 9),  # depthwise
    (nn.Conv2d(4, 6, (1, 3)), 7, 6 * 7 * 5 * 4 * 3),
])
def test_count_macs_single_conv(conv, in_hw, macs):
    assert count_macs(conv, (conv.in_channels, in_hw, in_hw)) == macs


def test_count_macs_conv_linear_ignores_bn_relu_pool():
    m = nn.Sequential(nn.Conv2d(2, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.MaxPool2d(2),
                      nn.Flatten(), nn.Linear(4 * 2 * 2, 5))
    assert count_macs(m, (2, 6, 6)) == 4 * 4 * 4 * 2 * 9 + 16 * 5


def _cifar_vgg19():
    cfg = [64, 64, "M", 128, 128, "M", 256, 256, 256, 256, "M", 512, 512, 512, 512, "M", 512, 512, 512, 512]
    layers, c = [], 3
    for v in cfg:
        if v == "M":
            layers.append(nn.MaxPool2d(2))
        else:
            layers += [nn.Conv2d(c, v, 3, padding=1, bias=False), nn.BatchNorm2d(v), nn.ReLU(inplace=True)]
            c = v
    return nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(512, 10))


def test_vgg19_matches_network_slimming_paper():
    """Liu et al. 2017, Table 1: VGG-19 on CIFAR-10 has 7.97e8 FLOPs and 20.04M parameters, i.e. FLOPs = 2 x MACs."""
    m = _cifar_vgg19()
    macs = count_macs(m, (3, 32, 32))
    assert macs == 398_136_320
    assert abs(2 * macs / 7.97e8 - 1) < 1e-3
    assert round(count_params(m) / 1e6, 2) == 20.04


def test_count_macs_restores_mode_removes_hooks_and_leaves_bn_stats():
    m = nn.Sequential(nn.Conv2d(1, 2, 3), nn.BatchNorm2d(2))
    m.train()
    stats = m[1].running_mean.clone()
    count_macs(m, (1, 5, 5))
    assert m.training and m[0].training and torch.equal(m[1].running_mean, stats)
    assert not m[0]._forward_hooks
    m.eval()
    count_macs(m, [1, 5, 5])
    assert not m.training


def test_count_macs_removes_hooks_on_error():
    m = nn.Sequential(nn.Conv2d(1, 2, 3), nn.Linear(7, 2))  # Linear gets a last dim of 3: shape error
    m.train()
    with pytest.raises(RuntimeError):
        count_macs(m, (1, 5, 5))
    assert not m[0]._forward_hooks and not m[1]._forward_hooks and m.training
    with pytest.raises(ValueError, match="count_macs: input_size must be"):
        count_macs(m, (5, 5))


def test_measure_latency_dict():
    m = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU()).train()
    threads = torch.get_num_threads()
    r = measure_latency(m, (3, 16, 16), batch=2, warmup=1, reps=5, threads=1)
    assert set(r) == {"median_ms", "p10_ms", "p90_ms", "batch", "threads", "reps", "device"}
    assert 0 < r["p10_ms"] <= r["median_ms"] <= r["p90_ms"]
    assert (r["batch"], r["threads"], r["reps"], r["device"]) == (2, 1, 5, "cpu")
    assert torch.get_num_threads() == threads and m.training
    assert measure_latency(m, (3, 16, 16), reps=1)["threads"] == threads
    with pytest.raises(ValueError, match="measure_latency: reps must be >= 1"):
        measure_latency(m, (3, 16, 16), reps=0)


class _ReadLabel(nn.Module):
    """Predicts the class written into the image (pixel value = label / 10) as a one-hot logit."""

    def forward(self, x):
        return nn.functional.one_hot((x.mean(dim=(1, 2, 3)) * 10).round().long(), 10).float()


def test_accuracy_on_trivial_models():
    y = torch.arange(23) % 10
    x = (y.float() / 10)[:, None, None, None].expand(23, 1, 4, 4).contiguous()
    data = ImageData("labels", 10, 1, 4, x, y, x, y, torch.zeros(1), torch.ones(1), 0, False)
    model = _ReadLabel().train()
    assert accuracy(model, data, batch_size=5) == 1.0 and model.training
    always_zero = nn.Sequential(nn.Flatten(), nn.Linear(16, 10))
    with torch.no_grad():
        always_zero[1].weight.zero_()
        always_zero[1].bias.copy_(torch.arange(10, 0, -1).float())
    assert accuracy(always_zero.eval(), data) == pytest.approx(3 / 23) and not always_zero.training


def test_compare_latency_measures_both_side_by_side():
    from slimops.pruning.metrics import compare_latency

    a = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU())
    b = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU())
    r = compare_latency(a, b, (3, 8, 8), batch=2, rounds=3, reps=2, warmup=1)
    assert set(r) >= {"baseline_ms", "candidate_ms", "speedup", "batch", "threads", "rounds", "reps"}
    assert r["baseline_ms"] > 0 and r["candidate_ms"] > 0 and r["speedup"] > 0
    assert r["batch"] == 2 and r["rounds"] == 3
