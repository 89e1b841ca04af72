"""Post-training weight quantization: RTN and GPTQ to a shared group-wise representation, packed
low-bit storage, and a linear layer that dequantizes per layer at matmul time.

    H = HessianAccumulator(in_features)     # feed with H.add_batch(x) / layer hooks (all loops)
    qw = gptq_quantize(W, H.H, bits=4, group_size=128)   # or quantize_rtn(W, 4, 128)
    layer = QuantizedLinear.from_codes(qw, bias)        # packed buffers -> state_dict / safetensors
"""
from hyperloop_lm.quant.core import QuantizedWeight, dequantize_codes, quantize_rtn
from hyperloop_lm.quant.gptq import HessianAccumulator, gptq_quantize
from hyperloop_lm.quant.packed import QuantizedLinear, pack_codes, packed_cols, unpack_codes

__all__ = [
    "HessianAccumulator",
    "QuantizedLinear",
    "QuantizedWeight",
    "dequantize_codes",
    "gptq_quantize",
    "pack_codes",
    "packed_cols",
    "quantize_rtn",
    "unpack_codes",
]
