"""Public functional ops (``slimops.ops.<name>``): argument checks, backend choice, fake kernels, autograd."""
from slimops.ops.channel_conv import channel_conv2d, masked_conv2d
from slimops.ops.distill import feature_affinity_loss
from slimops.ops.token_attention import kept_token_attention
from slimops.ops.prox import (
    palm_slimming_,
    penalty_grad_,
    prox,
    prox_adamw_,
    prox_backward,
    prox_sgd_,
    split_step_,
)
from slimops.ops.quant import fake_quantize, fda_sign
from slimops.ops.sema import sema_attention
from slimops.ops.spectral import adaptive_spectral_filter, spectral_filter

__all__ = ["prox", "prox_backward", "prox_sgd_", "prox_adamw_", "palm_slimming_", "penalty_grad_", "split_step_",
           "channel_conv2d", "masked_conv2d", "spectral_filter", "adaptive_spectral_filter",
           "sema_attention", "fda_sign", "fake_quantize", "kept_token_attention",
           "feature_affinity_loss"]
