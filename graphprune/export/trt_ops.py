"""ONNX operators that TensorRT's ONNX parser imports, and the restrictions graphprune's exports must respect.

Source: onnx/onnx-tensorrt ``docs/operators.md`` for **TensorRT 10.15** (opset 9 to 24), the rows marked ``Y``
(read 2026-11 from the stored snapshot; see ``/work/shared/research/deploy.md`` section 1). TensorRT 11.x keeps
this list (its opset guide points to the same file) and adds custom ops that graphprune does not use.
"""

from __future__ import annotations

TENSORRT_VERSION = "10.15"
OPSET_RANGE = (9, 24)

#: Every ONNX operator (default domain) marked supported ("Y") in the TensorRT 10.15 parser table.
SUPPORTED_OPS: frozenset[str] = frozenset("""
Abs Acos Acosh Add And ArgMax ArgMin Asin Asinh Atan Atanh Attention AveragePool BatchNormalization BlackmanWindow
Cast CastLike Ceil Celu Clip Concat Constant ConstantOfShape Conv ConvTranspose Cos Cosh CumSum DeformConv
DepthToSpace DequantizeLinear Div Dropout Einsum Elu Equal Erf Exp Expand EyeLike Flatten Floor Gather
GatherElements GatherND Gelu Gemm GlobalAveragePool GlobalLpPool GlobalMaxPool Greater GreaterOrEqual GridSample
GroupNormalization GRU HammingWindow HannWindow HardSigmoid HardSwish Hardmax Identity If ImageScaler
InstanceNormalization IsInf IsNaN LayerNormalization LeakyRelu Less LessOrEqual Log LogSoftmax Loop LRN LSTM
LpNormalization LpPool MatMul Max MaxPool Mean MeanVarianceNormalization Min Mish Mod Mul Neg NonMaxSuppression
NonZero Not OneHot Or Pad ParametricSoftplus Pow PRelu QuantizeLinear RandomNormal RandomNormalLike RandomUniform
RandomUniformLike Range Reciprocal ReduceL1 ReduceL2 ReduceLogSum ReduceLogSumExp ReduceMax ReduceMean ReduceMin
ReduceProd ReduceSum ReduceSumSquare Relu Reshape Resize ReverseSequence RMSNormalization RNN RoiAlign
RotaryEmbedding Round STFT ScaledTanh Scan Scatter ScatterElements ScatterND Selu Shape Shrink Sigmoid Sign Sin
Sinh Size Slice Softmax Softplus Softsign SpaceToDepth Split Sqrt Squeeze Sub Sum Tan Tanh TensorScatter
ThresholdedRelu Tile TopK Transpose Trilu Unsqueeze Upsample Where Xor
""".split())

#: Supported by the parser but forbidden in graphprune's exports (data-dependent output shapes).
FORBIDDEN_OPS: frozenset[str] = frozenset({"NonZero", "Unique", "Compress"})

#: TopK: "``sorted`` must be 1. ``K`` input must be less than 3840" (TensorRT 10.15 table).
TOPK_MAX_K = 3840

__all__ = ["TENSORRT_VERSION", "OPSET_RANGE", "SUPPORTED_OPS", "FORBIDDEN_OPS", "TOPK_MAX_K"]
