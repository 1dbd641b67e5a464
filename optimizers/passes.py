"""Every pass by name: what recipes list and `kiln convert --passes` accepts."""
from optimizers.cleanup import cleanup, fold_weight_transposes
from optimizers.fusion import fusion
from optimizers.plugin_attention import kiln_attention
from optimizers.quantize import fp16, int4, int8_dynamic, int8_static
from optimizers.recipe import FunctionPass

PASSES = {
    p.name: p
    for p in (
        FunctionPass("cleanup", cleanup, "constant folding, dead code, shape-expression simplification (onnxscript)"),
        FunctionPass("fold_weight_transposes", fold_weight_transposes, "transposed weights stored as initializers"),
        FunctionPass("fusion", fusion, "ONNX Runtime fused ops: attention, skip/RMS norms, GELU (onnxscript ort_fusions)"),
        FunctionPass("kiln_attention", kiln_attention,
                     "attention -> the kiln plugin: a parity-checked kiln::CausalAttention node (TensorRT), "
                     "or kiln::causal_attention calls in an AOTInductor package"),
        FunctionPass("fp16", fp16, "weights and math to fp16, IO and sensitive ops kept fp32"),
        FunctionPass("int8_dynamic", int8_dynamic, "int8 weights, dynamic activation quantization (onnxruntime)"),
        FunctionPass("int8_static", int8_static, "int8 QDQ with calibrated activation ranges (onnxruntime)"),
        FunctionPass("int4", int4, "int4 weight-only MatMulNBits blocks, LM head included (onnxruntime)"),
    )
}
