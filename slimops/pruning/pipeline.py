"""The network-slimming pipeline, step by step as in the papers' algorithm boxes:

    train (method) -> plan (plan_from_bn) -> compact -> fine-tune (optional) -> report

:func:`slim` runs all of it; :func:`prune`, :func:`finetune` and :func:`evaluate_file` run one step on
files a previous step wrote. Output directory layout (rank 0 writes):

    dense.pt      the trained full-size model (+ xi for proximal NS)      ``slimops-model``, kind dense
    plan.json     kept channels per BN layer (:class:`Plan`)
    pruned.pt     the compacted model: its plan and state_dict            ``slimops-model``, kind pruned
    metrics.json  accuracy, channels, params, FLOPs, latency, per-epoch history
    *.png         score histogram, per-layer channels before/after, training curves
    log.txt       the log;  checkpoint-<stage>.pt  the per-epoch checkpoints (``--resume``)
"""
from __future__ import annotations

import json
import logging
import os
from dataclasses import asdict, dataclass, field
from typing import Callable, Optional

import torch
from torch import nn

from slimops.pruning import distributed as D
from slimops.pruning.checkpoint import (FORMAT_VERSION, MODEL_FORMAT, atomic_save, atomic_write_text, check_free_space,
                                        load_file, prepare_output_dir, read_json_file)
from slimops.pruning.guard import check_finite_state, check_on_nonfinite
from slimops.pruning.compact import build_pruned, compact, compaction_error
from slimops.pruning.config import SlimConfig
from slimops.pruning.methods import METHODS, TOKEN_METHODS, VIT_METHODS, MethodConfig, default_lam
from slimops.pruning.plan import Plan, plan_from_bn
from slimops.pruning.metrics import accuracy
from slimops.pruning.train import TrainConfig, recalibrate_bn, run_config_of, train_stage

log = logging.getLogger("slimops.pruning")



class _ConsoleHandler(logging.StreamHandler):
    """Writes through tqdm so log lines and a live progress bar do not overwrite each other."""

    def emit(self, record):
        try:
            from tqdm import tqdm

            tqdm.write(self.format(record), file=self.stream)
        except Exception:  # pragma: no cover - logging must never raise
            self.handleError(record)


def setup_logging(out: str, is_main: bool) -> None:
    logger = logging.getLogger("slimops")
    logger.setLevel(logging.INFO)
    for h in list(logger.handlers):
        if getattr(h, "_slimops", False):
            logger.removeHandler(h)
            h.close()
    if not is_main:
        return
    os.makedirs(out, exist_ok=True)
    fmt = logging.Formatter("%(asctime)s %(message)s", "%H:%M:%S")
    for h in (logging.FileHandler(os.path.join(out, "log.txt")), _ConsoleHandler()):
        h.setFormatter(fmt)
        h._slimops = True
        logger.addHandler(h)
    logger.propagate = False


def save_model_file(path: str, model: nn.Module, *, kind: str, plan: Optional[Plan] = None,
                    xi=None, extra: Optional[dict] = None) -> None:
    check_finite_state(model, f"model file '{path}'")
    obj = {"format": MODEL_FORMAT, "version": FORMAT_VERSION, "kind": kind, "config": dict(model.config()),
           "state_dict": model.state_dict(), "plan": None if plan is None else plan.to_dict(),
           "xi": None if xi is None else [t.detach().cpu().clone() for t in xi], "extra": extra or {}}
    atomic_save(obj, path)


def load_model_file(path: str, device=None) -> tuple:
    """(model, file dict) from a dense.pt / pruned.pt; a foreign, corrupted or mismatching file raises."""
    obj = load_file(path, MODEL_FORMAT, "slimops.pruning.load_model_file")
    try:
        model = build_model_of_file(obj)
        model.load_state_dict(obj["state_dict"])
    except (KeyError, RuntimeError, TypeError, ValueError) as e:
        raise ValueError(f"slimops.pruning.load_model_file: '{path}' does not hold a loadable slimops model ({e})") from e
    if device is not None:
        model.to(device)
    return model, obj


def build_model_of_file(obj: dict) -> nn.Module:
    """The architecture a model file describes (its kind, config and plan), with fresh weights."""
    from slimops.models import build_from_config
    from slimops.pruning.patch_slim import TokenPlan
    from slimops.pruning.vit import ViTPlan, build_pruned_vit

    if obj["kind"] == "pruned":
        plan = plan_of_file(obj)
        if plan is None:
            raise ValueError("a pruned model without its plan")
        if isinstance(plan, TokenPlan):  # patch slimming: the dense architecture running fewer tokens per block
            return build_from_config(obj["config"]).set_token_plan(plan)
        return build_pruned_vit(plan) if isinstance(plan, ViTPlan) else build_pruned(plan)
    return build_from_config(obj["config"])


def plan_of_file(obj: dict):
    """The plan a model file carries (a BN :class:`Plan`, a :class:`~slimops.pruning.vit.ViTPlan` or a
    :class:`~slimops.pruning.patch_slim.TokenPlan`), or None."""
    from slimops.pruning.patch_slim import TOKEN_PLAN_FORMAT, TokenPlan
    from slimops.pruning.vit import VIT_PLAN_FORMAT, ViTPlan

    d = obj.get("plan")
    if not d:
        return None
    if d.get("format") == TOKEN_PLAN_FORMAT:
        return TokenPlan.from_dict(d)
    return ViTPlan.from_dict(d) if d.get("format") == VIT_PLAN_FORMAT else Plan.from_dict(d)


@torch.no_grad()
def _masked_copy(model: nn.Module, plan: Plan) -> nn.Module:
    """The dense model with the removed channels' gamma zeroed (beta kept): what a masked network
    computes. The compacted model equals it (up to rounding) when the plan folds the removed channels'
    constants; compaction_error against it measures exactly that."""
    import copy

    m = copy.deepcopy(model)
    for g in m.slim_groups():
        bn = m.get_submodule(g.bn)
        mask = torch.ones(bn.num_features, dtype=torch.bool)
        mask[plan.layers[g.bn]] = False
        bn.weight[mask.to(bn.weight.device)] = 0
    return m


def model_report(model: nn.Module, data, device: torch.device, *, latency_batch: int = 64,
                 latency: bool = True) -> dict:
    from slimops.pruning.metrics import count_macs, count_params, measure_latency

    shape = (data.in_channels, data.size, data.size)
    macs = count_macs(model, shape)
    rep = {"params": count_params(model), "macs": macs, "flops": 2 * macs}
    if latency:
        lat = measure_latency(model, shape, batch=latency_batch)
        rep.update(latency_ms=lat["median_ms"], latency=lat)
    return rep


def _compaction_errors(dense: nn.Module, masked: nn.Module, pruned: nn.Module, data, device) -> dict:
    """How far the compacted model is from the dense one and from the dense one with the removed units zeroed
    (``masked``), on a probe batch spread over the test set (which is stored grouped by class)."""
    probe = torch.linspace(0, len(data.y_test) - 1, min(256, len(data.y_test))).long()
    x = data.normalise(data.x_test[probe]).to(device)
    return {"compaction_vs_dense": compaction_error(dense, pruned, x),
            "compaction_vs_masked": compaction_error(masked, pruned, x)}


def _size_and_speed(dense: nn.Module, pruned: nn.Module, data, device) -> dict:
    """Parameters, FLOPs, MACs of both models, and their latency measured side by side."""
    from slimops.pruning.metrics import compare_latency

    rd, rp = model_report(dense, data, device, latency=False), model_report(pruned, data, device, latency=False)
    lat = compare_latency(dense, pruned, (data.in_channels, data.size, data.size), batch=64)
    return {"params_dense": rd["params"], "params_pruned": rp["params"],
            "flops_dense": rd["flops"], "flops_pruned": rp["flops"],
            "macs_dense": rd["macs"], "macs_pruned": rp["macs"],
            "latency_ms_dense": lat["baseline_ms"], "latency_ms_pruned": lat["candidate_ms"],
            "latency_speedup": lat["speedup"], "latency_batch": lat["batch"], "latency_threads": lat["threads"]}


def prune_report(dense: nn.Module, plan: Plan, data, device: torch.device, *, bn_recal: int = 100) -> tuple:
    """Compacts ``dense`` with ``plan``, re-estimates its BN statistics from ``bn_recal`` training batches
    (0: keep the trained ones) and measures both models: (pruned model, report dict)."""
    pruned = compact(dense, plan)
    errors = _compaction_errors(dense, _masked_copy(dense, plan), pruned, data, device)
    acc_stale = accuracy(pruned, data, device=device)
    images = recalibrate_bn(pruned, data, device, batches=bn_recal)
    return pruned, {
        "acc_pruned_no_finetune": accuracy(pruned, data, device=device),
        "acc_pruned_trained_bn_stats": acc_stale, "bn_recalibration_images": images,
        "channels_total": plan.channels_total, "channels_kept": plan.channels_kept,
        "kept_fraction": plan.kept_fraction,
        **_size_and_speed(dense, pruned, data, device),
        **errors,
        "constant_channels": len(plan.constant),
        "layers": {k: {"total": plan.channels[k], "kept": len(v)} for k, v in plan.layers.items()},
    }


def vit_prune_report(dense: nn.Module, plan, data, device: torch.device, *, bn_recal: int = 0) -> tuple:
    """:func:`prune_report` for a gated ViT or SEMA-T and its :class:`~slimops.pruning.vit.ViTPlan` (no BatchNorm to
    recalibrate): (compacted model, report dict with the heads / dims kept per block)."""
    import copy

    from slimops.pruning.vit import compact_vit, zero_removed_gates

    pruned = compact_vit(dense, plan)
    errors = _compaction_errors(dense, zero_removed_gates(copy.deepcopy(dense), plan), pruned, data, device)
    summary = plan.summary()
    total = summary["gated_dims_total"]
    kept = round(summary["gated_dims_kept"] * total)
    return pruned, {
        "acc_pruned_no_finetune": accuracy(pruned, data, device=device),
        "channels_total": total, "channels_kept": kept, "kept_fraction": kept / total, "units": "gated dims",
        **_size_and_speed(dense, pruned, data, device),
        **errors,
        "blocks": summary["blocks"], "v_dims": [plan.v_dim(i) for i in range(len(plan.blocks))],
        **_token_fields(plan.tokens),
    }


def _token_fields(tokens) -> dict:
    """The report's fields for a :class:`~slimops.pruning.patch_slim.TokenPlan` (none for None)."""
    if tokens is None:
        return {}
    s = tokens.summary()
    return {"tokens": s["tokens"], "tokens_per_block": s["tokens_per_block"], "tokens_kept_fraction": s["kept_fraction"]}


def with_tokens(plan, model: nn.Module, data, device: torch.device, keep: float, seed: int = 0):
    """The dimension plan ``plan`` of the ViT ``model`` (gated, or already compacted by ``plan``) with patch
    slimming's tokens added: scored on the compacted model (:func:`~slimops.pruning.patch_slim.plan_tokens`, 512
    training images), so that the kept tokens are those that matter to the model that will run them."""
    import dataclasses

    from slimops.pruning.patch_slim import plan_tokens
    from slimops.pruning.vit import compact_vit

    small = compact_vit(model, plan) if getattr(model, "gated", False) else model
    batches = score_batches(data, device, seed=seed)
    tokens = plan_tokens(small, batches, keep)
    tokens.meta.update(method="patch-slim", keep_tokens=keep, score_images=sum(len(b) for b in batches))
    return dataclasses.replace(plan, tokens=tokens)


def token_prune_report(dense: nn.Module, plan, data, device: torch.device, **_) -> tuple:
    """:func:`prune_report` for patch slimming: the dense ViT running ``plan``'s tokens per block (a
    :class:`~slimops.pruning.patch_slim.TokenPlan`) and the report with the tokens kept per block."""
    import copy

    pruned = copy.deepcopy(dense).set_token_plan(plan)
    s = plan.summary()
    total = s["tokens"] * len(plan.keep)
    return pruned, {
        "acc_pruned_no_finetune": accuracy(pruned, data, device=device),
        "channels_total": total, "channels_kept": sum(plan.keep), "kept_fraction": s["kept_fraction"],
        "units": "token-blocks", "tokens": s["tokens"], "tokens_per_block": s["tokens_per_block"],
        **_size_and_speed(dense, pruned, data, device),
    }


def _combined_token_report(compacted: nn.Module, plan, data, device: torch.device, **_) -> tuple:
    """:func:`token_prune_report` for a dimension-pruned ViT (``compacted``) given the tokens of ``plan`` (a
    :class:`~slimops.pruning.vit.ViTPlan` that carries them): the report's size and speed are against the
    dimension-pruned model, and its kept dims are added."""
    pruned, rep = token_prune_report(compacted, plan.tokens, data, device)
    summary = plan.summary()
    return pruned, {**rep, "gated_dims_kept": summary["gated_dims_kept"], "blocks": summary["blocks"]}


def score_batches(data, device: torch.device, images: int = 512, batch: int = 128, seed: int = 0) -> list:
    """``images`` training images drawn at random (seeded: the training split may be ordered by class), unaugmented,
    in batches on ``device``: what patch slimming scores the tokens on."""
    g = torch.Generator().manual_seed(seed)
    idx = torch.randperm(len(data.y_train), generator=g)[:images].sort().values
    return [data.train_batch(idx[i:i + batch], 0, seed, augment=False)[0].to(device) for i in range(0, len(idx), batch)]


def _format_of(path: str):
    """The "format" field of a JSON file (read as plans are), or None when it is not a JSON object."""
    from slimops.pruning.plan import MAX_PLAN_BYTES

    try:
        d = read_json_file(path, MAX_PLAN_BYTES, "slimops.pruning.slim", "a plan")
    except (OSError, ValueError):
        return None
    return d.get("format") if isinstance(d, dict) else None


def write_metrics(out: str, metrics: dict) -> None:
    atomic_write_text(os.path.join(out, "metrics.json"), json.dumps(metrics, indent=2, default=str))


def resolve_method(method: str, penalty: Optional[str], lam: Optional[float], beta: Optional[float],
                   a: Optional[float], steps: int, keep_dims: Optional[float] = None) -> MethodConfig:
    """A MethodConfig whose unset lam/beta/a take the defaults for a run of ``steps`` steps (a: the
    exponent p = 1/2 for ns-lp, the tl1 shape 1 otherwise). ``keep_dims`` (sidt): the target, lam its start (1 by
    default)."""
    if method not in METHODS:
        raise ValueError(f"slimops.pruning: unknown method '{method}' (expected one of: {', '.join(METHODS)})")
    if a is None:
        a = 0.5 if method == "ns-lp" else 1.0
    target = {} if keep_dims is None else {"keep_dims": keep_dims, "steps": int(steps)}  # it sets sidt's default penalty
    cfg = MethodConfig(method=method, penalty=penalty, a=a, **target)
    cfg.lam = default_lam(method, steps, cfg.penalty) if lam is None else float(lam)
    if keep_dims is not None:
        cfg.keep_dims = float(keep_dims)
        cfg.lam = 1.0 if lam is None else cfg.lam
    if beta is not None:
        cfg.beta = float(beta)
    cfg.__post_init__()
    return cfg


def slim(config: Optional[SlimConfig] = None, /, **fields) -> dict:
    """Train -> plan -> compact -> (fine-tune) -> report, writing everything to ``config.out``.

    Takes a :class:`~slimops.pruning.config.SlimConfig`, or its fields as keywords (``slim(model="vgg11",
    epochs=15, ...)``); the configuration is validated before anything runs. ``percent="auto"`` (the
    default) picks per method: remove the exact zeros for none / prox-sgd / proximal-ns, the lowest 50% of
    |gamma| for the subgradient methods (whose gammas never reach 0). The compacted model's BN statistics
    are re-estimated from ``bn_recal`` training batches (:func:`slimops.pruning.train.recalibrate_bn`; 0
    keeps the trained ones). ``on_nonfinite``: what a NaN/inf loss or gradient does, ``"stop"`` or
    ``"skip"`` the step (:mod:`slimops.pruning.guard`). Everything that can be checked before training is:
    the arguments, the data, that ``out`` is writable and has room for the files. ``metrics.json`` is
    written when the run starts (its ``config``, ``status: "running"``) and completed at the end.
    """
    if config is not None and fields:
        raise TypeError("slimops.pruning.slim: pass a SlimConfig or keyword fields, not both")
    cfg = config if config is not None else SlimConfig(**fields)
    if not isinstance(cfg, SlimConfig):
        raise TypeError(f"slimops.pruning.slim: expected a SlimConfig, got {type(cfg).__name__}")
    return _run_slim(cfg)


def resolution_args(model: str, img_size: int, patch: Optional[int]) -> dict:
    """The build arguments of a model built for the data's image size (the ViTs: ``img_size``, ``patch``)."""
    from slimops.models import RESOLUTION_MODELS

    return {"img_size": img_size, "patch": patch} if model in RESOLUTION_MODELS else {}


def _run_slim(cfg: SlimConfig) -> dict:
    from slimops.data import load as load_data
    from slimops.models import build
    from slimops.models.vit import VisionTransformer

    out, percent = cfg.out, cfg.resolved_percent()
    tcfg = cfg.train_config(cfg.epochs, cfg.seed)
    dev, info = D.init_run(cfg.device)
    try:
        ds = load_data(cfg.data, cfg.data_dir)
        steps = cfg.epochs * tcfg.steps_per_epoch(len(ds.y_train))
        mcfg = cfg.method_config(steps)
        torch.manual_seed(cfg.seed)
        vit_method = cfg.method in VIT_METHODS
        token_method = cfg.method in TOKEN_METHODS
        net = build(cfg.model, num_classes=ds.num_classes, in_channels=ds.in_channels, width=cfg.width,
                    **resolution_args(cfg.model, ds.size, cfg.patch), **({"gates": True} if vit_method else {}))
        run_cfg = run_config_of(net.config(), cfg.data, mcfg, tcfg)
        if cfg.resolved_keep_tokens() is not None:  # a keep the token pyramid cannot reach fails now, not after training
            from slimops.pruning.patch_slim import keep_schedule

            keep_schedule(len(net.blocks), 1 + net.grid * net.grid, cfg.resolved_keep_tokens())
        # the teacher of the fine-tuning is checked now (it must predict these classes from these images), not
        # after the training it would follow
        kd = distillation(cfg.teacher, cfg.kd_weight, cfg.temperature, net, ds, dev, cfg.seed, "slimops.pruning.slim")
        if info.is_main:
            prepare_output_dir(out, "slimops.pruning.slim")
            check_free_space(out, run_bytes(net), "slimops.pruning.slim")
            write_metrics(out, {"status": "running", "config": cfg.to_dict()})
        setup_logging(out, info.is_main)
        if info.is_main:
            log.info("slim: %s (width %g) on %s: %d train / %d test images; method %s; %d steps", cfg.model,
                     cfg.width, cfg.data, len(ds.y_train), len(ds.y_test), json.dumps(asdict(mcfg)), steps)
            if cfg.optimizer == "sgd" and isinstance(net, VisionTransformer):  # ~20% on digits (docs/vit.md)
                log.warning("slim: %s with SGD (the CNN recipe) trains poorly; ViTs want e.g. --optimizer adamw "
                            "--lr 1e-3 --schedule cosine --warmup-epochs 3 (docs/vit.md, \"Training\")", cfg.model)
        res = train_stage(net, ds, mcfg, tcfg, stage="train", ckpt_path=os.path.join(out, "checkpoint-train.pt"),
                          resume=cfg.resume, device=dev, dist_info=info, run_config=run_cfg, progress=cfg.progress,
                          on_nonfinite=cfg.on_nonfinite)
        xi = res.method.scores()
        acc_dense = accuracy(net, ds, device=dev)
        if token_method:
            from slimops.pruning.patch_slim import TOKEN_PLAN_FORMAT, TokenPlan, plan_tokens

            keep = cfg.resolved_keep_tokens()
            saved = os.path.join(out, "plan.json")
            if cfg.resume and os.path.isfile(saved) and _format_of(saved) == TOKEN_PLAN_FORMAT:
                # a resumed run fine-tunes with the plan it made (re-scoring could flip a near tie: another run)
                plan = TokenPlan.load(saved)
            else:
                batches = score_batches(ds, dev, seed=cfg.seed)
                plan = plan_tokens(net, batches, keep)
                plan.meta.update(keep_tokens=keep, score_images=sum(len(b) for b in batches))
        elif vit_method:
            from slimops.pruning.vit import VIT_PLAN_FORMAT, ViTPlan, vit_plan_from_gates

            plan = vit_plan_from_gates(net, percent)
            keep = cfg.resolved_keep_tokens()
            if keep is not None:  # dims and tokens: patch slimming of the dimension-pruned model
                saved = os.path.join(out, "plan.json")
                old = ViTPlan.load(saved) if cfg.resume and os.path.isfile(saved) and \
                    _format_of(saved) == VIT_PLAN_FORMAT else None
                if old is not None and old.tokens is not None and old.blocks == plan.blocks:
                    plan = old  # a resumed run fine-tunes with the tokens it scored (as patch-slim does)
                else:
                    plan = with_tokens(plan, net, ds, dev, keep, seed=cfg.seed)
        else:
            plan = plan_from_bn(net, percent, xi=xi, fold=cfg.fold)
        plan.meta.update(method=cfg.method, lam=mcfg.lam, beta=mcfg.beta, penalty=mcfg.penalty)
        metrics = {"model": net.config(), "data": cfg.data, "method": asdict(mcfg), "train": run_cfg["train"],
                   "steps": steps, "percent": percent, "acc_before_prune": acc_dense}
        if cfg.resolved_keep_tokens() is not None:
            metrics["keep_tokens"] = cfg.resolved_keep_tokens()
        if info.is_main:
            save_model_file(os.path.join(out, "dense.pt"), net, kind="dense", xi=xi, extra={"method": asdict(mcfg)})
            plan.save(os.path.join(out, "plan.json"))
        report = token_prune_report if token_method else vit_prune_report if vit_method else prune_report
        pruned, rep = report(net, plan, ds, dev, bn_recal=cfg.bn_recal)
        metrics.update(rep)
        history = list(res.history)
        if cfg.finetune_epochs > 0:
            ft_cfg = cfg.train_config(cfg.finetune_epochs, cfg.seed + 1)
            ft_run = run_config_of(pruned.config(), cfg.data, MethodConfig("none"), ft_cfg, plan=plan.to_dict(),
                                   **kd.run_config)
            ft = train_stage(pruned, ds, MethodConfig("none"), ft_cfg, stage="finetune",
                             ckpt_path=os.path.join(out, "checkpoint-finetune.pt"), resume=cfg.resume, device=dev,
                             dist_info=info, run_config=ft_run, progress=cfg.progress, on_nonfinite=cfg.on_nonfinite,
                             criterion=kd.criterion)
            history += ft.history
            metrics.update(kd.metrics)
        metrics["finetune_epochs"] = cfg.finetune_epochs
        metrics["acc"] = accuracy(pruned, ds, device=dev)
        metrics["history"] = history
        metrics["config"] = cfg.to_dict()
        metrics["status"] = "done"
        if info.is_main:
            save_model_file(os.path.join(out, "pruned.pt"), pruned, kind="pruned", plan=plan)
            write_metrics(out, metrics)
            if cfg.plots:
                from slimops.pruning.plots import plot_run

                metrics["plots"] = plot_run(out, net, plan, xi, history)
                write_metrics(out, metrics)
            log.info("slim: %s", summary_line(metrics))
        D.barrier(info)
        return metrics
    finally:
        D.shutdown(info)


@dataclass
class Distillation:
    """What a fine-tuning stage needs to learn from a teacher: the criterion (None: the labels' cross-entropy),
    the fields its checkpoint must agree with, and the metrics that record the teacher."""

    criterion: Optional[Callable] = None
    run_config: dict = field(default_factory=dict)
    metrics: dict = field(default_factory=dict)


def distillation(teacher: Optional[str], kd_weight: float, temperature: float, student: nn.Module, data,
                 device: torch.device, seed: int, where: str) -> Distillation:
    """The :class:`Distillation` of a fine-tuning of ``student``: without a teacher, plain cross-entropy; with one,
    :func:`slimops.distill.logit_kd_criterion` on the frozen teacher (checked on a probe batch of ``data`` first,
    so a teacher of other data fails before training)."""
    if teacher is None:
        return Distillation()
    from slimops.distill import check_kd_options, load_teacher, logit_kd_criterion

    check_kd_options(kd_weight, temperature, where)
    with torch.random.fork_rng(devices=[]):  # building the teacher draws a fresh init: the run's RNG stays as it was
        probe = data.train_batch(torch.arange(min(16, len(data.y_train))), 0, seed, augment=False)[0].to(device)
        net = load_teacher(teacher, device, probe, student, where)
    kd = {"teacher": teacher, "kd_weight": float(kd_weight), "temperature": float(temperature)}
    return Distillation(logit_kd_criterion(net, kd_weight=kd_weight, temperature=temperature), dict(kd),
                        {**kd, "acc_teacher": accuracy(net, data, device=device)})


def run_bytes(model: nn.Module) -> int:
    """What a run writes, at most: a checkpoint (weights, momentum, scores) and the dense and pruned model
    files, each at most the size of the weights; 5x the weights' bytes plus 1 MiB of JSON, logs and plots."""
    weights = sum(t.numel() * t.element_size() for t in model.state_dict().values())
    return 5 * weights + 2**20


def summary_line(m: dict) -> str:
    return (f"acc {m['acc']:.4f} (before pruning {m['acc_before_prune']:.4f}, pruned without fine-tuning "
            f"{m['acc_pruned_no_finetune']:.4f}); {m.get('units', 'channels')} {m['channels_kept']}/{m['channels_total']}; "
            f"params {m['params_dense']:,} -> {m['params_pruned']:,}; FLOPs {m['flops_dense']:.3g} -> "
            f"{m['flops_pruned']:.3g}; latency x{m['latency_speedup']:.2f}")


def prune(*, weights: str, percent: Optional[float] = None, data: str = "digits", data_dir: Optional[str] = None,
          seed: int = 0, out: str = "runs/prune", device: str = "cpu", fold: bool = True,
          bn_recal: int = 100, keep_tokens: Optional[float] = None) -> dict:
    """Plans and compacts a trained dense model file (``dense.pt``; its xi is used when present). ``keep_tokens``
    (ViTs): patch slimming instead, the mean kept fraction of the patches over the blocks
    (:func:`slimops.pruning.patch_slim.plan_tokens` on 512 training images); given a dimension-pruned ViT's
    ``pruned.pt``, its tokens are slimmed too and the written plan carries both (:func:`with_tokens`)."""
    from slimops.data import load as load_data

    where = "slimops.pruning.prune"
    if keep_tokens is not None:
        if isinstance(keep_tokens, bool) or not isinstance(keep_tokens, (int, float)) or not 0 < keep_tokens <= 1:
            raise ValueError(f"{where}: keep_tokens must be a fraction in (0, 1], got {keep_tokens!r}")
        if percent is not None:
            raise ValueError(f"{where}: give percent (channels or dimension gates) or keep_tokens (patch slimming), "
                             "not both")
    dev = torch.device(device)
    net, obj = load_model_file(weights, dev)
    if keep_tokens is not None and not hasattr(net, "set_token_plan"):
        raise ValueError(f"{where}: keep_tokens slims the tokens of a ViT; '{weights}' holds a "
                         f"{net.config().get('arch')}")
    prepare_output_dir(out, "slimops.pruning.prune")
    check_free_space(out, run_bytes(net), "slimops.pruning.prune")
    setup_logging(out, True)
    from slimops.pruning.vit import ViTPlan

    dims_plan = plan_of_file(obj) if obj["kind"] == "pruned" else None
    dims_only = isinstance(dims_plan, ViTPlan) and dims_plan.tokens is None
    if obj["kind"] != "dense" and not (dims_only and keep_tokens is not None):
        raise ValueError(f"slimops.pruning.prune: '{weights}' holds a {obj['kind']} model; prune a dense.pt (or "
                         "slim the tokens of a dimension-pruned ViT's pruned.pt with keep_tokens)")
    ds = load_data(data, data_dir)
    gated = getattr(net, "gated", False)  # a ViT trained with vtp / sidt: planned by its dimension gates
    if dims_only:  # dims and tokens: the tokens of the compacted ViT, one plan for both
        plan = with_tokens(dims_plan, net, ds, dev, float(keep_tokens), seed=seed)
        report = _combined_token_report
    elif keep_tokens is not None:
        from slimops.pruning.patch_slim import plan_tokens

        batches = score_batches(ds, dev, seed=seed)
        plan = plan_tokens(net, batches, float(keep_tokens))
        plan.meta.update(method="patch-slim", keep_tokens=float(keep_tokens), score_images=sum(len(b) for b in batches))
        report = token_prune_report
    elif gated:
        from slimops.pruning.vit import vit_plan_from_gates

        plan = vit_plan_from_gates(net, percent)
        report = vit_prune_report
    else:
        plan = plan_from_bn(net, percent, xi=obj["xi"], fold=fold)
        report = prune_report
    metrics = {"model": net.config(), "data": data, "percent": percent, "source": weights,
               "acc_before_prune": accuracy(net, ds, device=dev)}
    if keep_tokens is not None:
        metrics["keep_tokens"] = float(keep_tokens)
    pruned, rep = report(net, plan, ds, dev, bn_recal=bn_recal)
    plan.save(os.path.join(out, "plan.json"))
    metrics.update(rep)
    metrics["acc"] = metrics["acc_pruned_no_finetune"]
    save_model_file(os.path.join(out, "pruned.pt"), pruned, kind="pruned", plan=plan)
    write_metrics(out, metrics)
    log.info("prune: %s", summary_line(metrics))
    return metrics


def finetune(*, weights: str, epochs: int, data: str = "digits", data_dir: Optional[str] = None, lr: float = 0.1,
             batch: int = 64, seed: int = 0, out: str = "runs/finetune", resume: bool = False,
             device: str = "cpu", augment: bool = True, progress: bool = True, on_nonfinite: str = "stop",
             optimizer: str = "sgd", weight_decay: Optional[float] = None, schedule: str = "step",
             warmup_epochs: int = 0, teacher: Optional[str] = None, kd_weight: float = 1.0,
             temperature: float = 4.0) -> dict:
    """Fine-tunes a model file (usually ``pruned.pt``) with plain SGD or AdamW (see
    :class:`~slimops.pruning.train.TrainConfig`); writes ``finetuned.pt``. ``teacher``: a model file (usually the
    dense model the student was pruned from, or any model of the same data) whose logits the student also learns
    (``CE + kd_weight · T² KL`` at temperature ``temperature``, :func:`slimops.distill.logit_kd_criterion`)."""
    from slimops.data import load as load_data

    check_on_nonfinite(on_nonfinite)
    dev = torch.device(device)
    info = D.init_from_env(dev)
    try:
        net, obj = load_model_file(weights, dev)
        ds = load_data(data, data_dir)
        cfg = TrainConfig(epochs=epochs, lr=lr, batch=batch, seed=seed, augment=augment, optimizer=optimizer,
                          weight_decay=weight_decay, schedule=schedule, warmup_epochs=warmup_epochs)
        kd = distillation(teacher, kd_weight, temperature, net, ds, dev, seed, "slimops.pruning.finetune")
        if info.is_main:
            prepare_output_dir(out, "slimops.pruning.finetune")
            check_free_space(out, run_bytes(net), "slimops.pruning.finetune")
        setup_logging(out, info.is_main)
        plan = plan_of_file(obj)
        run = run_config_of(net.config(), data, MethodConfig("none"), cfg, plan=obj.get("plan"), source=weights,
                            **kd.run_config)
        acc0 = accuracy(net, ds, device=dev)
        res = train_stage(net, ds, MethodConfig("none"), cfg, stage="finetune",
                          ckpt_path=os.path.join(out, "checkpoint-finetune.pt"), resume=resume, device=dev,
                          dist_info=info, run_config=run, progress=progress, on_nonfinite=on_nonfinite,
                          criterion=kd.criterion)
        metrics = {"model": net.config(), "data": data, "source": weights, "acc_before": acc0,
                   "acc": accuracy(net, ds, device=dev), "history": res.history, **kd.metrics}
        if info.is_main:
            save_model_file(os.path.join(out, "finetuned.pt"), net, kind=obj["kind"], plan=plan, xi=obj.get("xi"))
            write_metrics(out, metrics)
            log.info("finetune: acc %.4f -> %.4f%s", acc0, metrics["acc"],
                     f" (teacher {teacher}: acc {kd.metrics['acc_teacher']:.4f})" if teacher else "")
        return metrics
    finally:
        D.shutdown(info)


def evaluate_file(*, weights: str, data: str = "digits", data_dir: Optional[str] = None, seed: int = 0,
                  device: str = "cpu", latency_batch: int = 64, sparse: bool = False,
                  plan: Optional[str] = None, bn_recal: int = 100) -> dict:
    """Accuracy, params, FLOPs and latency of a model file.

    ``sparse``: evaluate the dense model file (``dense.pt``) run channel-sparse by ``plan`` (default: the
    ``plan.json`` beside it) through :func:`slimops.pruning.sparsify`, and time it side by side with the
    dense model (what a masked network costs) and with the compacted one (``compact``, the ideal).
    Both have their BN statistics re-estimated from ``bn_recal`` training batches first, as ``prune``
    does (0: the statistics of the file), so the accuracy is that of the pruned model.
    """
    from slimops.data import load as load_data

    dev = torch.device(device)
    net, obj = load_model_file(weights, dev)
    ds = load_data(data, data_dir)
    if not sparse:
        rep = model_report(net, ds, dev, latency_batch=latency_batch)
        return {"weights": weights, "kind": obj["kind"], "model": net.config(), "data": data,
                "acc": accuracy(net, ds, device=dev), "params": rep["params"], "flops": rep["flops"],
                "latency_ms": rep["latency_ms"], "latency": rep["latency"]}
    from slimops.pruning.metrics import compare_latency
    from slimops.pruning.sparsify import sparsify

    if obj["kind"] != "dense":
        raise ValueError(f"slimops.pruning.evaluate_file: --sparse runs a dense model file on its kept channels; "
                         f"'{weights}' holds a {obj['kind']} model")
    plan_path = plan or os.path.join(os.path.dirname(os.path.abspath(weights)), "plan.json")
    if not os.path.exists(plan_path):
        raise FileNotFoundError(f"slimops.pruning.evaluate_file: no plan at '{plan_path}' (pass --plan)")
    p = Plan.load(plan_path)
    net.eval()
    fast = sparsify(net, p).eval()
    small = compact(net, p).eval()
    for m in (fast, small):
        recalibrate_bn(m, ds, dev, batches=bn_recal, seed=seed)
    rep = model_report(fast, ds, dev, latency=False)
    shape = (ds.in_channels, ds.size, ds.size)
    vs_dense = compare_latency(net, fast, shape, batch=latency_batch)
    vs_compact = compare_latency(small, fast, shape, batch=latency_batch)
    return {"weights": weights, "plan": plan_path, "kind": "sparse", "model": net.config(), "data": data,
            "bn_recal_batches": bn_recal,
            "acc": accuracy(fast, ds, device=dev), "acc_compact": accuracy(small, ds, device=dev),
            "params": rep["params"], "flops": rep["flops"], "latency_ms": vs_dense["candidate_ms"],
            "dense_latency_ms": vs_dense["baseline_ms"], "speedup_vs_dense": vs_dense["speedup"],
            "compact_latency_ms": vs_compact["baseline_ms"], "speed_vs_compact": vs_compact["speedup"],
            "latency": {"vs_dense": vs_dense, "vs_compact": vs_compact}}
