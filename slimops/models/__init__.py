"""The model zoo: the CIFAR networks of network slimming (Liu et al., ICCV 2017; docs/algorithms.md §2) and the
Fourier-domain backbones (docs/algorithms.md §7: AFIDAF-T, AFIDAF, GFNet-Ti) and the SEMA attention backbone
(docs/algorithms.md §8: SEMA-T), and DeiT-style vision transformers (docs/algorithms.md §6: ViT-Ti, ViT-S, DeiT-B).

``build(name, num_classes=10, in_channels=3, width=1.0)`` makes one of :data:`MODELS` (the ViTs also take
``img_size`` and ``patch``). Every model is a
:class:`SlimmableModel`: it knows its build configuration (``config()``) and lists its prunable
BatchNorms with the layers they touch (``slim_groups()``), which is what the compaction engine of
:mod:`slimops.pruning` consumes.
"""
from __future__ import annotations

import os

import torch
from torch import nn

from slimops.models._slim import SlimGroup, SlimmableModel, arch_summary, check_config
from slimops.models.afidaf import AFIDAFNet
from slimops.models.densenet import DenseNet
from slimops.models.gfnet import GFNet
from slimops.models.preresnet import PreResNet
from slimops.models.sema import SEMANet
from slimops.models.vgg import VGG
from slimops.models.vit import VisionTransformer

_FACTORIES = {
    "vgg11": lambda **kw: VGG(11, **kw),
    "vgg13": lambda **kw: VGG(13, **kw),
    "vgg16": lambda **kw: VGG(16, **kw),
    "vgg19": lambda **kw: VGG(19, **kw),
    "preresnet20": lambda **kw: PreResNet(20, bottleneck=False, **kw),
    "preresnet56": lambda **kw: PreResNet(56, bottleneck=False, **kw),
    "preresnet164": lambda **kw: PreResNet(164, bottleneck=True, **kw),
    "densenet40": lambda **kw: DenseNet(40, growth=12, **kw),
    # Fourier-domain backbones (ImageNet-sized: the papers' parameter counts at 1000 classes); any input size.
    "afidaf_t": lambda **kw: AFIDAFNet("afidaf_t", **kw),
    "afidaf": lambda **kw: AFIDAFNet("afidaf", **kw),
    "gfnet_ti": lambda **kw: GFNet("gfnet_ti", **kw),
    # SEMA attention in Mamba-like blocks (MLLA-T's layout); any input size.
    "sema_t": lambda **kw: SEMANet("sema_t", **kw),
    # DeiT-style vision transformers; built for one input size (img_size, patch), run at others by interpolating
    # their position embedding.
    "vit_ti": lambda **kw: VisionTransformer("vit_ti", **kw),
    "vit_s": lambda **kw: VisionTransformer("vit_s", **kw),
    "deit_b": lambda **kw: VisionTransformer("deit_b", **kw),
}

# The models whose build takes the input resolution (img_size, patch): their position embedding has one entry
# per patch of the image they are built for.
VIT_MODELS: tuple[str, ...] = ("vit_ti", "vit_s", "deit_b")
RESOLUTION_MODELS: tuple[str, ...] = VIT_MODELS
# The models with VTP / SiDT dimension gates (``gates=True``; slimops.pruning.vit plans and compacts them).
GATED_MODELS: tuple[str, ...] = VIT_MODELS + ("sema_t",)

MODELS: tuple[str, ...] = tuple(_FACTORIES)


def build(name: str, num_classes: int = 10, in_channels: int = 3, width: float = 1.0, *, img_size: int | None = None,
          patch: int | None = None, gates: bool | None = None) -> nn.Module:
    """Build model ``name`` (one of :data:`MODELS`) with Liu et al.'s initialisation (BN γ = 0.5).

    ``width`` scales every channel count ``c`` to ``max(1, round(c·width))`` (for DenseNet: the growth
    rate and the stem's channels; for AFIDAF the nearest multiple of 8; for GFNet the embedding; for SEMA-T
    the head dim, to the nearest multiple of 8; for the ViTs the head dim, from 64). ``img_size`` (default 224)
    and ``patch`` (default 16 from 224 up, else 4) are for the ViTs (:data:`RESOLUTION_MODELS`) only; ``gates``
    (VTP / SiDT's dimension gates, :meth:`VisionTransformer.add_gates`) for the ViTs and SEMA-T
    (:data:`GATED_MODELS`). The Fourier-domain and SEMA models initialise their spectral
    and transformer parts as their papers do (see their docstrings). Raises ``ValueError`` naming the bad argument.
    """
    if name not in _FACTORIES:
        raise ValueError(f"slimops.models.build: unknown model {name!r} (expected one of: {', '.join(MODELS)})")
    check_config("slimops.models.build", num_classes, in_channels, width)
    extra = {k: v for k, v in (("img_size", img_size), ("patch", patch)) if v is not None}
    if extra and name not in RESOLUTION_MODELS:
        raise ValueError(f"slimops.models.build: {name} runs at any input size and takes no "
                         f"{' or '.join(extra)} (only {', '.join(RESOLUTION_MODELS)} do)")
    if gates is not None:
        if name not in GATED_MODELS:
            raise ValueError(f"slimops.models.build: {name} takes no gates (only {', '.join(GATED_MODELS)} have "
                             "dimension gates)")
        extra["gates"] = gates
    return _FACTORIES[name](num_classes=num_classes, in_channels=in_channels, width=width, **extra)


__all__ = ["MODELS", "RESOLUTION_MODELS", "VIT_MODELS", "GATED_MODELS", "build", "build_from_config", "arch_summary", "SlimGroup", "SlimmableModel",
           "VGG", "PreResNet", "DenseNet", "AFIDAFNet", "GFNet", "SEMANet", "VisionTransformer"]


# The largest model a configuration read from a file may ask for (parameters + buffers, elements): a plan or
# model file is data from anywhere, and `width: 1e6` must be an error, not a terabyte allocation.
# SLIMOPS_MAX_MODEL_ELEMENTS raises it for real models bigger than this (8 GiB of float32).
MAX_MODEL_ELEMENTS = 2**31


def build_from_config(config: dict) -> nn.Module:
    """Rebuilds a model from its ``model.config()`` (as stored in plans and model files).

    The configuration is untrusted data: the model is first built on the ``meta`` device (shapes, no
    memory) and refused when it would hold more than ``MAX_MODEL_ELEMENTS`` elements."""
    where = "slimops.models.build_from_config"
    try:
        kw = dict(num_classes=config["num_classes"], in_channels=config["in_channels"], width=config["width"])
        kw.update({k: config[k] for k in ("img_size", "patch", "gates") if k in config})
        name = config["arch"]
    except (KeyError, TypeError) as e:
        raise ValueError(f"{where}: not a model config: {config!r}") from e
    if not isinstance(name, str):
        raise ValueError(f"{where}: not a model config (arch {name!r}): {config!r}")
    limit = int(os.environ.get("SLIMOPS_MAX_MODEL_ELEMENTS", MAX_MODEL_ELEMENTS))
    try:
        with torch.device("meta"):
            shape_only = build(name, **kw)
        size = sum(t.numel() for t in shape_only.state_dict().values())
    except (TypeError, RuntimeError, OverflowError, MemoryError) as e:
        raise ValueError(f"{where}: cannot build {config!r} ({type(e).__name__}: {str(e).splitlines()[0]})") from e
    if size > limit:
        raise ValueError(f"{where}: {config!r} asks for a model of {size:,} elements, more than the limit of "
                         f"{limit:,} (SLIMOPS_MAX_MODEL_ELEMENTS raises it)")
    return build(name, **kw)
