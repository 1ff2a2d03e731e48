"""PNG plots of a slimming run: the channel-score histogram, per-layer channels kept, training curves.

matplotlib is optional (the ``demo`` extra installs it): it is a large install that headless training
servers and slim images often leave out, and every number a plot shows is also in metrics.json. Without
it, :func:`plot_run` logs one warning and returns no paths; the run itself is unaffected.
"""
from __future__ import annotations

import logging
import os
from typing import Optional, Sequence

import torch
from torch import Tensor, nn

from slimops.pruning.plan import Plan, bn_scores


log = logging.getLogger("slimops.pruning")


def pyplot():
    """matplotlib.pyplot on the file-only Agg backend, or None (with one warning) when matplotlib is missing."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        log.warning("plots skipped: matplotlib is not installed (pip install matplotlib, or slimops[demo])")
        return None
    return plt


def _save(fig, path: str) -> None:
    """PNG through a temporary file and a rename, like every file a run writes (never a torn image)."""
    from slimops.pruning.checkpoint import atomic_write

    atomic_write(path, lambda f: fig.savefig(f, format="png", dpi=110))


def plot_run(out: str, model: nn.Module, plan: Plan, xi: Optional[Sequence[Tensor]], history: list) -> list:
    """Writes scores.png and channels.png (models with BN slim groups) and curves.png into ``out``; returns their
    paths ([] without matplotlib)."""
    plt = pyplot()
    if plt is None:
        return []

    paths = []
    if getattr(plan, "layers", None):  # a model with BN slim groups (a ViT plan has blocks, plotted below)
        scores = torch.cat(list(bn_scores(model, xi).values())).numpy()
        label = "|xi|" if xi is not None else "|gamma|"
        fig, ax = plt.subplots(figsize=(7, 4))
        nz = scores[scores > 0]
        ax.hist(nz if len(nz) else scores, bins=60, color="tab:blue")
        thr = plan.meta.get("threshold")
        if thr is not None and thr > 0:
            ax.axvline(thr, color="tab:red", linestyle="--", label=f"threshold {thr:.3g}")
            ax.legend()
        ax.set(title=f"BN channel scores {label}: {int((scores == 0).sum())} of {len(scores)} exactly 0 (not shown)",
               xlabel=label, ylabel="channels", yscale="log")
        fig.tight_layout()
        paths.append(os.path.join(out, "scores.png"))
        _save(fig, paths[-1])
        plt.close(fig)

        names = list(plan.layers)
        fig, ax = plt.subplots(figsize=(max(7, 0.25 * len(names)), 4))
        xs = range(len(names))
        ax.bar(xs, [plan.channels[n] for n in names], color="lightgray", label="before")
        ax.bar(xs, [len(plan.layers[n]) for n in names], color="tab:green", label="kept")
        ax.set(title=f"channels per BN layer: {plan.channels_kept}/{plan.channels_total} kept "
                     f"({plan.kept_fraction:.1%})", xlabel="BN layer (module order)", ylabel="channels")
        ax.legend()
        fig.tight_layout()
        paths.append(os.path.join(out, "channels.png"))
        _save(fig, paths[-1])
        plt.close(fig)

    if hasattr(plan, "blocks"):  # a ViT plan: what each block keeps, as fractions of its gated widths
        per = plan.summary()["blocks"]
        dims = [plan.block_dims(i) for i in range(len(per))]  # per block: SEMA-T's stages differ in width
        fig, ax = plt.subplots(figsize=(max(7, 0.6 * len(per)), 4))
        xs = torch.arange(len(per)).numpy()
        for k, (key, total, label) in enumerate((("heads", lambda d: d["heads"], "heads"),
                                                 ("in_dims", lambda d: d["dim"], "qkv input dims"),
                                                 ("v_dims", lambda d: d["heads"] * d["head_dim"], "value dims"),
                                                 ("hidden", lambda d: d["hidden"], "MLP units"))):
            ax.bar(xs + (k - 1.5) * 0.2, [p[key] / total(d) for p, d in zip(per, dims)], width=0.2, label=label)
        ax.set(title=f"kept per block: {plan.summary()['gated_dims_kept']:.1%} of the gated dims",
               xlabel="block", ylabel="fraction kept", ylim=(0, 1.3))
        ax.legend(fontsize=8, loc="upper center", ncol=4)
        fig.tight_layout()
        paths.append(os.path.join(out, "vit_kept.png"))
        _save(fig, paths[-1])
        plt.close(fig)

    # patch slimming: the tokens each block computes (a token plan, or the tokens a dimension plan also carries)
    tokens = plan if hasattr(plan, "keep") and hasattr(plan, "order") else getattr(plan, "tokens", None)
    if tokens is not None:
        n, keep = tokens.tokens, list(tokens.keep)
        fig, ax = plt.subplots(figsize=(max(7, 0.6 * len(keep)), 4))
        xs = range(len(keep))
        ax.bar(xs, [n] * len(keep), color="lightgray", label="before")
        ax.bar(xs, keep, color="tab:green", label="kept")
        ax.set(title=f"tokens per block: {tokens.summary()['kept_fraction']:.1%} of the token-block computations kept",
               xlabel="block", ylabel="tokens (class token included)")
        ax.legend()
        fig.tight_layout()
        paths.append(os.path.join(out, "tokens_kept.png"))
        _save(fig, paths[-1])
        plt.close(fig)

    if history:
        fig, axes = plt.subplots(1, 3, figsize=(14, 4))
        ep = list(range(1, len(history) + 1))
        axes[0].plot(ep, [h["loss"] for h in history], marker=".")
        axes[1].plot(ep, [h["test_acc"] for h in history], marker=".", label="test")
        axes[1].plot(ep, [h["train_acc"] for h in history], marker=".", label="train")
        axes[2].plot(ep, [h["zero_fraction"] for h in history], marker=".")
        n_train = sum(h["stage"] == "train" for h in history)
        for ax in axes:
            if n_train < len(history):
                ax.axvline(n_train + 0.5, color="gray", linestyle=":")
        axes[0].set(title="training loss", xlabel="epoch")
        axes[1].set(title="accuracy", xlabel="epoch")
        axes[1].legend()
        axes[2].set(title="fraction of scores exactly 0", xlabel="epoch", ylim=(-0.02, 1.02))
        fig.tight_layout()
        paths.append(os.path.join(out, "curves.png"))
        _save(fig, paths[-1])
        plt.close(fig)
    return paths
