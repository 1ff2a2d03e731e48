"""slimops: fused kernels for network compression and efficient vision backbones.

Importing the package loads the compiled library (`slimops._C`), which registers every
`torch.ops.slimops.*` op, then the Python layer: public functional ops (`slimops.ops`), fake kernels
and autograd, the optimizers (`slimops.optim`), modules (`slimops.nn`), the model zoo
(`slimops.models`), data sets (`slimops.data`), the slimming pipelines (`slimops.pruning`) and the quantised /
binary layers with their export (`slimops.quant`).
"""
import torch  # noqa: F401  (loads libtorch, which the compiled library links against)

from slimops import _C  # noqa: F401  (registers torch.ops.slimops.*)
from slimops import ops, optim  # noqa: F401
from slimops import data, models, nn, pruning, quant  # noqa: F401

__version__ = "0.1.0"
