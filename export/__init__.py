"""Parity-gated builders of engine artifacts: ONNX, AOTInductor, TensorRT; the manifest."""
