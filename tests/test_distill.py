"""slimops.distill: the KD logit loss and FAQD's feature-affinity loss (exact and fast) against their definitions
(docs/algorithms.md §9), the stage-output finder, and a faqd run of ``slimops quantize``."""
from __future__ import annotations

import math

import pytest
import torch

from slimops.distill import AffinityFeatures, feature_affinity_loss
from slimops.distill.affinity import gaussian_projection
from slimops.models import build

pytestmark = pytest.mark.usefixtures("one_thread")


def _brute(fs, ft):
    """Σ_b Σ_ij |cos(s_i, s_j) - cos(t_i, t_j)| / (HW)², pixel by pixel from the definition (float64)."""
    total = 0.0
    for b in range(fs.shape[0]):
        s = fs[b].flatten(1).double()
        t = ft[b].flatten(1).double()
        s = s / (s.norm(dim=0, keepdim=True) + 1e-5)
        t = t / (t.norm(dim=0, keepdim=True) + 1e-5)
        hw = s.shape[1]
        for i in range(hw):
            total += ((s[:, i] @ s) - (t[:, i] @ t)).abs().sum().item()
    return total / hw ** 2


def test_exact_fa_matches_the_definition_and_ignores_channel_counts():
    fs, ft = torch.randn(3, 5, 4, 6, dtype=torch.float64), torch.randn(3, 9, 4, 6, dtype=torch.float64)
    assert feature_affinity_loss(fs, ft).item() == pytest.approx(_brute(fs, ft), rel=1e-10)
    assert feature_affinity_loss(fs, fs).item() == pytest.approx(0.0, abs=1e-12)


def test_fast_fa_is_the_projected_l1_and_its_expectation_is_the_l21_norm():
    torch.manual_seed(0)
    fs, ft = torch.randn(2, 6, 5, 5, dtype=torch.float64), torch.randn(2, 4, 5, 5, dtype=torch.float64)
    n = lambda f: (f.flatten(2) / (f.flatten(2).norm(dim=1, keepdim=True) + 1e-5))  # noqa: E731
    s, t = n(fs), n(ft)
    delta = s.transpose(1, 2) @ s - t.transpose(1, 2) @ t  # (B, HW, HW)
    z = gaussian_projection(25, 64, 0, "cpu", torch.float64)
    want = (delta @ z).abs().sum().item() / (64 * 25 ** 2)
    assert feature_affinity_loss(fs, ft, fast=True, k=64).item() == pytest.approx(want, rel=1e-10)
    expect = math.sqrt(2 / math.pi) * delta.norm(dim=2).sum().item() / 25 ** 2
    big = feature_affinity_loss(fs, ft, fast=True, k=20000, seed=3).item()
    assert big == pytest.approx(expect, rel=0.03)
    assert big < feature_affinity_loss(fs, ft).item()  # the l2,1 norm is below the entrywise l1 norm


def test_gradients_resize_and_bad_input():
    fs = torch.randn(2, 3, 4, 4, requires_grad=True)
    ft = torch.randn(2, 5, 8, 8)
    for fast in (False, True):
        (g,) = torch.autograd.grad(feature_affinity_loss(fs, ft, fast=fast, k=8), fs)
        assert torch.isfinite(g).all() and g.abs().sum() > 0
    with pytest.raises(ValueError, match="4-D"):
        feature_affinity_loss(fs[0], ft)
    with pytest.raises(ValueError, match="batch"):
        feature_affinity_loss(fs, ft[:1])
    with pytest.raises(ValueError, match="k must be"):
        feature_affinity_loss(fs, ft, fast=True, k=0)
    with pytest.raises(ValueError, match="norm"):
        feature_affinity_loss(fs, ft, norm="l2")


def test_stage_outputs_of_vgg_are_the_relus_before_each_pooling():
    model = build("vgg11", num_classes=10, in_channels=1, width=0.25)
    names = AffinityFeatures.stage_outputs(model, torch.randn(2, 1, 32, 32))
    assert names == ["features.relu0", "features.relu1", "features.relu3", "features.relu5", "features.relu7"]
    cap = AffinityFeatures(model, names)
    model(torch.randn(2, 1, 32, 32))
    maps = cap.pop()
    assert [m.shape[2] for m in maps] == [32, 16, 8, 4, 2]
    cap.remove()


def test_faqd_quantize_run(cli_files, tmp_path):
    pytest.importorskip("sklearn")
    from slimops.quant.pipeline import QuantizeConfig, quantize

    m = quantize(QuantizeConfig(teacher=str(cli_files / "dense.pt"), out=str(tmp_path / "fa"), method="faqd",
                                label_free=True, fa_fast=True, fa_k=16, fa_norm="l2sq", epochs=1, batch=128,
                                progress=False, plots=False))
    assert m["quant"]["fa_fast"] and m["quant"]["label_free"] and m["quant"]["fa_norm"] == "l2sq"
    assert set(m["fa_loss_per_layer"]) == {"features.relu0", "features.relu1", "features.relu3", "features.relu5",
                                           "features.relu7"}
    assert all(math.isfinite(v) and v >= 0 for v in m["fa_loss_per_layer"].values())
