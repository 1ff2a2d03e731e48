"""Proximal optimizers built on the fused ``prox`` kernels."""
from slimops.optim.prox_adamw import ProxAdamW
from slimops.optim.prox_sgd import ProxSGD
from slimops.optim.proximal_slimming import ProximalSlimming, batchnorm_weights

__all__ = ["ProxSGD", "ProxAdamW", "ProximalSlimming", "batchnorm_weights"]
