"""Post-training weight quantization: RTN and GPTQ to a shared group-wise representation, packed
low-bit storage, and a linear layer that dequantizes per layer at matmul time.

    H = HessianAccumulator(in_features)     # feed with H.add_batch(x) / layer hooks (all loops)
    qw = gptq_quantize(W, H.H, bits=4, group_size=128)   # or quantize_rtn(W, 4, 128)
    layer = QuantizedLinear.from_codes(qw, bias)        # packed buffers -> state_dict / safetensors

Whole models (driver.py, checkpoint.py, report.py):

    info = quantize_model(model, "gptq", bits=4, group_size=128, calib=tokens)   # in place
    save_quantized(out_dir, model, {**meta, "quantization": info.meta()}, tokenizer)
    model, tokenizer, meta = load_quantized(out_dir)     # or load_any: fp32 or quantized
"""
from hyperloop_lm.quant.core import QuantizedWeight, dequantize_codes, quantize_rtn
from hyperloop_lm.quant.gptq import HessianAccumulator, gptq_quantize
from hyperloop_lm.quant.driver import QuantResult, QuantSpec, calibration_tokens, quantize_model
from hyperloop_lm.quant.report import quantize_checkpoint, report_markdown
from hyperloop_lm.quant.packed import QuantizedEmbedding, QuantizedLinear, pack_codes, packed_cols, unpack_codes

__all__ = [
    "HessianAccumulator",
    "QuantizedEmbedding",
    "QuantizedLinear",
    "QuantizedWeight",
    "dequantize_codes",
    "gptq_quantize",
    "pack_codes",
    "packed_cols",
    "quantize_rtn",
    "unpack_codes",
    "QuantResult",
    "QuantSpec",
    "calibration_tokens",
    "quantize_checkpoint",
    "quantize_model",
    "report_markdown",
]
