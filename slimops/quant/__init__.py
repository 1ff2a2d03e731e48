"""Quantisation and binary networks (docs/quantization.md, docs/algorithms.md §9): LSQ fake-quantised and FDA
binary drop-in layers (:mod:`slimops.quant.modules`), ``quantize_model`` and the packed integer export
(:mod:`slimops.quant.convert`). The fused ops underneath: :mod:`slimops.ops.quant`."""
from slimops.quant.convert import (FORMAT, METHODS, export, exported_nbytes, load_exported, pack_levels,
                                   quantize_model, unpack_levels)
from slimops.quant.modules import (FULL_PRECISION, BinaryConv2d, BinaryLinear, LSQQuantizer, NoiseAdaptation,
                                   QuantConv2d, QuantLinear, set_fda_schedule)

__all__ = ["LSQQuantizer", "QuantConv2d", "QuantLinear", "BinaryConv2d", "BinaryLinear", "NoiseAdaptation",
           "set_fda_schedule", "quantize_model", "export", "load_exported", "exported_nbytes", "pack_levels",
           "unpack_levels", "FORMAT", "METHODS", "FULL_PRECISION"]
