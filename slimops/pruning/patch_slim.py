"""Patch slimming (Tang et al., "Patch Slimming for Efficient Vision Transformers", CVPR 2022; docs/algorithms.md
§10): a ViT computes, in block ``l``, only the ``keep[l]`` tokens with the largest impact on its output, chosen top
down and nested (a token a block drops is dropped for every deeper block: the kept sets shrink with depth, a pyramid).

Impact (the paper's top-down approximation through the attention maps). The model's output reads the class token at
the last block's output. Going down, a token's impact at the input of block ``l`` is what reaches the scored tokens
through block ``l``'s residual path and its attention (``A_l``, (n, n), averaged over heads), counting only the
tokens the block above keeps (a token block ``l+1`` drops feeds nothing above it)::

    s_L = e_cls                              (the class token at the output of the last block)
    s_l = t + t A_l,   t = s_{l+1} ⊙ 1[S_{l+1}]   (row vectors: token j's impact flows through every query that reads it)

(the MLP is per token: it does not mix tokens). ``s_l`` is averaged over a few batches of training images and
normalised to sum 1 per block, then ``S_l`` is chosen before going down: ``S_{L-1}`` = the class token and the
``keep[L-1] - 1`` best patches by ``s_{L-1}``; ``S_l = S_{l+1} ∪`` the best ``keep[l] - |S_{l+1}|`` of the rest by
``s_l``. (One forward over the scoring images per block: the sets above a block must be known before its scores.)
The masks are then fixed and the model fine-tuned with them.

Running the slimmed model: because the sets are nested, ordering the tokens once by how deep they stay makes every
``S_l`` a prefix, so block ``l`` runs on ``x[:, :keep[l]]`` — a view: one gather of the embedded tokens per forward
(:meth:`slimops.models.VisionTransformer.set_token_plan`), no per-layer gathers, no masks, and both attention and the
MLP cost ``keep[l]`` tokens. (Per-sample kept sets, whose queries and keys are read by index from full-length q/k/v,
are what :func:`slimops.ops.kept_token_attention` computes.)

``keep_schedule(depth, tokens, keep)``: a linear pyramid whose mean kept fraction of the patches over the blocks is
``keep`` (block 0 keeps every token; the slope is set so that the mean matches; never fewer than the class token and
one patch).
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Iterable, List, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["TokenPlan", "keep_schedule", "attention_maps", "impact_scores", "token_plan_from_scores", "plan_tokens"]

TOKEN_PLAN_FORMAT = "slimops.token_plan"


def _fail(msg: str, exc=ValueError):
    raise exc(f"slimops.pruning.patch_slim: {msg}")


@dataclass(frozen=True)
class TokenPlan:
    """The tokens each block of a ViT computes: ``order`` (every token position once, 0 = the class token first,
    then by how deep each stays) and ``keep`` (per block, non-increasing): block ``l`` computes tokens
    ``order[:keep[l]]``."""

    order: tuple
    keep: tuple
    meta: dict = field(default_factory=dict, compare=False)  # how it was made (method, keep, ...)

    def __post_init__(self):
        n = len(self.order)
        if sorted(self.order) != list(range(n)) or n < 2:
            _fail(f"order must hold each of the {n} token positions once, got {list(self.order)[:8]}...")
        if self.order[0] != 0:
            _fail("order must start with the class token (position 0): the head reads it")
        if not self.keep or any(not isinstance(k, int) or isinstance(k, bool) for k in self.keep):
            _fail(f"keep must be a non-empty list of ints, got {list(self.keep)}")
        if any(not 1 <= k <= n for k in self.keep) or any(a < b for a, b in zip(self.keep, self.keep[1:])):
            _fail(f"keep must be non-increasing counts in [1, {n}], got {list(self.keep)}")

    @property
    def tokens(self) -> int:
        return len(self.order)

    def kept_fraction(self) -> List[float]:
        """Per block, the fraction of the tokens it computes."""
        return [k / self.tokens for k in self.keep]

    def summary(self) -> dict:
        """Tokens per block and the mean kept fraction of the token-block computations (the class token included)."""
        return {"tokens": self.tokens, "tokens_per_block": list(self.keep),
                "kept_fraction": sum(self.keep) / (self.tokens * len(self.keep))}

    def to_dict(self) -> dict:
        return {"format": TOKEN_PLAN_FORMAT, "order": list(self.order), "keep": list(self.keep), "meta": self.meta}

    @classmethod
    def from_dict(cls, d: dict) -> "TokenPlan":
        if not isinstance(d, dict) or d.get("format") != TOKEN_PLAN_FORMAT:
            _fail(f"not a token plan (format {TOKEN_PLAN_FORMAT!r} expected)")
        order, keep = d.get("order"), d.get("keep")
        for name, v in (("order", order), ("keep", keep)):
            if not isinstance(v, list) or any(isinstance(i, bool) or not isinstance(i, int) for i in v):
                _fail(f"a token plan's {name!r} must be a list of ints, got {v!r:.80}")
        meta = d.get("meta") or {}
        if not isinstance(meta, dict):
            _fail(f"a token plan's 'meta' must be a dict, got {type(meta).__name__}")
        return cls(tuple(order), tuple(keep), dict(meta))

    def save(self, path: str) -> None:
        from slimops.pruning.checkpoint import atomic_write_text

        atomic_write_text(path, json.dumps(self.to_dict()))

    @classmethod
    def load(cls, path: str) -> "TokenPlan":
        from slimops.pruning.checkpoint import read_json_file
        from slimops.pruning.plan import MAX_PLAN_BYTES

        return cls.from_dict(read_json_file(path, MAX_PLAN_BYTES, "slimops.pruning.TokenPlan.load", "a token plan"))


def keep_schedule(depth: int, tokens: int, keep: float) -> List[int]:
    """Tokens per block (class token included) of a linear pyramid: block 0 keeps all ``tokens``; the patch
    fraction falls linearly, floored at one patch, with the slope for which its mean over the blocks is ``keep``."""
    if not isinstance(depth, int) or depth < 1:
        _fail(f"depth must be a positive int, got {depth!r}")
    patches = tokens - 1
    if patches < 1:
        _fail(f"a token plan needs at least one patch token, got {tokens} tokens")
    if isinstance(keep, bool) or not isinstance(keep, (int, float)) or not 0 < keep <= 1:
        _fail(f"keep must be a fraction in (0, 1], got {keep!r}")
    floor = 1.0 / patches
    lowest = (1.0 + (depth - 1) * floor) / depth  # block 0 keeps every token, the others one patch
    if keep < lowest - 1e-12:
        _fail(f"keep {keep:g} is below the smallest mean this pyramid reaches for {depth} blocks and {patches} "
              f"patches ({lowest:.4g}: the first block computes every token)")

    def fractions(slope):
        return [max(floor, 1.0 - slope * l) for l in range(depth)]

    lo, hi = 0.0, 2.0  # slope 0: mean 1; slope 2 reaches the floor by block 1
    for _ in range(60):
        mid = (lo + hi) / 2
        if sum(fractions(mid)) / depth > keep:
            lo = mid
        else:
            hi = mid
    return [1 + max(1, round(f * patches)) for f in fractions(hi)]


def attention_maps(model: nn.Module, x: Tensor) -> List[Tensor]:
    """Per block, the softmax attention of the model's forward on ``x`` averaged over heads, (B, n, n) float32,
    recomputed from each block's ``norm1`` input by hooks (the model's own forward is unchanged)."""
    maps: List[Tensor] = []

    def hook(block, inp, _out):
        attn = block.attn
        t = block.norm1(inp[0])
        if attn.in_index is not None:
            t = t.index_select(-1, attn.in_index)
        if attn.gate_in is not None:
            t = attn.gate_in(t)
        b, n, _ = t.shape
        h, d = attn.num_heads, attn.head_dim
        qk = attn.qkv(t)[..., : 2 * h * d].reshape(b, n, 2, h, d).permute(2, 0, 3, 1, 4).float()
        maps.append(torch.softmax(qk[0] @ qk[1].transpose(-1, -2) * attn.scale, -1).mean(1))

    handles = [blk.register_forward_hook(hook) for blk in model.blocks]
    try:
        model(x)
    finally:
        for hd in handles:
            hd.remove()
    return maps


def _propagate(maps: List[Tensor], lowest: int, masks: dict) -> List[Tensor]:
    """Per block j = lowest .. L-1, (B, n): per image, the impact of block j's input tokens on the class token at
    the last block's output, propagated down through blocks L-1 .. j; ``masks[j]`` (float 0/1 (n,)), when present,
    zeroes the tokens block j drops (they feed nothing above it)."""
    b, n = maps[-1].shape[:2]
    s = torch.zeros(b, n, device=maps[-1].device)
    s[:, 0] = 1.0
    levels = []
    for j in range(len(maps) - 1, lowest - 1, -1):
        if (j + 1) in masks:
            s = s * masks[j + 1]
        s = s + torch.bmm(s[:, None, :], maps[j])[:, 0]
        s = s / s.sum(1, keepdim=True)
        levels.append(s)
    return levels[::-1]


def _select(score: Tensor, kept: Tensor, k: int) -> Tensor:
    """The tokens a block keeps: every one already ``kept`` (by the blocks above it), then the best of the rest by
    ``score`` up to ``k``; returns the indices."""
    s = score.clone().double()
    s[kept] = float("inf")
    return torch.topk(s, k).indices


@torch.no_grad()
def impact_scores(model: nn.Module, batches: Iterable[Tensor], keep: Sequence[int] | None = None) -> Tensor:
    """(depth, tokens): each token's impact at the input of each block on the class token at the last block's
    output (module docstring), averaged over the images of ``batches`` and normalised to sum 1 per block. The model
    must run on every token (no token plan set).

    With ``keep`` (tokens per block), top down as the paper: block l's scores propagate only through the tokens the
    blocks above it keep (chosen from their scores by the same rule as :func:`token_plan_from_scores`), so a token
    that a deeper block drops adds nothing. That costs one forward over ``batches`` per block; without ``keep``, one
    forward in all (every token propagates)."""
    if getattr(model, "token_keep", None) is not None:
        _fail("impact_scores needs the model without a token plan (every block computing every token)")
    batches = list(batches)
    if not batches:
        _fail("impact_scores needs at least one batch")
    was = model.training
    model.eval()
    try:
        depth = len(model.blocks)
        if keep is not None and len(keep) != depth:
            _fail(f"keep has {len(keep)} entries but the model has {depth} blocks")
        rows: List[Tensor] = []
        masks: dict = {}
        kept = None
        for l in (range(depth - 1, -1, -1) if keep is not None else [0]):
            total, count = None, 0
            for x in batches:
                maps = attention_maps(model, x)
                if keep is None:  # every block's row from one pass down (no masks)
                    s = torch.stack(_propagate(maps, 0, {}), 1)  # (B, depth, n)
                else:
                    s = _propagate(maps, l, masks)[0]
                total = s.sum(0) if total is None else total + s.sum(0)
                count += s.shape[0]
            mean = (total / count).cpu()
            if keep is None:
                return mean
            rows.append(mean)
            if kept is None:
                kept = torch.zeros(mean.numel(), dtype=torch.bool)
                kept[0] = True
            kept[_select(mean, kept, int(keep[l]))] = True
            masks[l] = kept.to(maps[-1].device, torch.float32)
        return torch.stack(rows[::-1])
    finally:
        model.train(was)


def token_plan_from_scores(scores: Tensor, keep: Sequence[int]) -> TokenPlan:
    """The nested kept sets of ``scores`` (depth, tokens) with ``keep[l]`` tokens in block ``l``, chosen top down
    (module docstring), as a :class:`TokenPlan`."""
    depth, n = scores.shape
    keep = [int(k) for k in keep]
    if len(keep) != depth:
        _fail(f"keep has {len(keep)} entries but the scores cover {depth} blocks")
    TokenPlan(tuple(range(n)), tuple(keep))  # validates keep
    life = torch.full((n,), -1, dtype=torch.long)  # the deepest block that computes each token
    kept = torch.zeros(n, dtype=torch.bool)
    kept[0] = True  # the class token: the head reads it after the last block
    for l in range(depth - 1, -1, -1):
        take = _select(scores[l], kept, keep[l])  # the kept ones first, then the best of the rest
        new = take[~kept[take]]
        life[new] = l
        kept[take] = True
        life[0] = depth - 1
    # Order: by life, deepest first (class token first); ties by the last block's score that saw them.
    rank = [(-int(life[t]), -float(scores[max(int(life[t]), 0), t]) if life[t] >= 0 else 0.0, t) for t in range(n)]
    order = [t for _, _, t in sorted(rank)]
    order.remove(0)
    return TokenPlan(tuple([0] + order), tuple(keep))


def plan_tokens(model: nn.Module, batches: Iterable[Tensor], keep: float) -> TokenPlan:
    """Scores every token of ``model`` on ``batches`` and keeps a linear pyramid with mean patch fraction ``keep``
    (:func:`keep_schedule`): the :class:`TokenPlan` to fine-tune and run with
    (:meth:`~slimops.models.VisionTransformer.set_token_plan`)."""
    batches = list(batches)
    if not batches:
        _fail("plan_tokens needs at least one batch")
    n = 1 + model.grid * model.grid
    if tuple(batches[0].shape[-2:]) != (model.img_size, model.img_size):
        _fail(f"plan_tokens: the batches hold {tuple(batches[0].shape[-2:])} images, the model's tokens are those of "
              f"{model.img_size}x{model.img_size} inputs")
    counts = keep_schedule(len(model.blocks), n, keep)
    return token_plan_from_scores(impact_scores(model, batches, counts), counts)
