"""Deployment: pruned programs (torch.export), ONNX files, TensorRT engines, and pipeline wrappers.

    from graphprune.export import export_program, to_onnx, to_tensorrt
    ep = export_program(unet, (latents, t, text_embeddings), method="sito", ratio=0.5)   # ExportedProgram
    to_onnx(unet, (latents, t, text_embeddings), "unet_sito50.onnx", method="sito", ratio=0.5)
    engine = to_tensorrt(unet, (latents, t, text_embeddings), method="sito", ratio=0.5)  # CUDA + torch-tensorrt
    pipe.unet = DeployedUNet.from_onnx("unet_sito50.onnx", pipe.unet)                    # back into a pipeline

Modules: ``program`` (export -> rewrite -> re-export), ``onnx`` (ONNX file + TensorRT-parser checks), ``trt_ops``
(the parser's op table), ``tensorrt`` (torch-tensorrt), ``deploy`` (the pipeline wrapper).
"""

from .deploy import DeployedUNet, OnnxRunner, replace_unet
from .onnx import OnnxCheck, check_onnx, to_onnx
from .program import ExportInfo, export_info, export_program, random_feed
from .tensorrt import load_engine, save_engine, tensorrt_unavailable, to_tensorrt

__all__ = ["export_program", "export_info", "random_feed", "ExportInfo", "to_onnx", "check_onnx", "OnnxCheck",
           "to_tensorrt", "save_engine", "load_engine", "tensorrt_unavailable", "DeployedUNet", "OnnxRunner",
           "replace_unet"]
