"""The quality bar of the slimming pipeline, on the real embedded data with the CLI's defaults.

VGG-11 at width 0.5 on digits (32x32), 15 epochs: proximal network slimming with the default lam/beta
must keep at most half of the BN channels and lose at most one point of test accuracy against the
unpruned baseline trained the same way. Two full 15-epoch runs: about two minutes on two cores.
"""
import pytest
import torch

from slimops.pruning.pipeline import slim

from conftest import TEST_THREADS

pytest.importorskip("sklearn")


@pytest.fixture
def all_threads():
    """Other tests pin torch to one thread; these two real trainings use every core this test process has (its
    share under pytest-xdist), then restore."""
    old = torch.get_num_threads()
    torch.set_num_threads(TEST_THREADS)
    yield
    torch.set_num_threads(old)


def test_proximal_ns_defaults_keep_half_the_channels_within_one_point(tmp_path, all_threads):
    common = dict(model="vgg11", width=0.5, data="digits", epochs=15, seed=0, progress=False, plots=False)
    base = slim(method="none", out=str(tmp_path / "none"), **common)
    pns = slim(method="proximal-ns", out=str(tmp_path / "pns"), **common)
    assert base["channels_kept"] == base["channels_total"]
    assert pns["channels_kept"] <= 0.5 * pns["channels_total"], pns["channels_kept"]
    assert pns["acc"] >= base["acc"] - 0.01, (pns["acc"], base["acc"])
    # the compacted network is really smaller and computes the masked one exactly
    assert pns["params_pruned"] < 0.5 * pns["params_dense"]
    assert pns["flops_pruned"] < 0.5 * pns["flops_dense"]
    assert pns["compaction_vs_masked"]["rel_diff"] < 1e-4
