"""Merge, ONNX export and onnxruntime inference (installed as ``sdlora_dist.export``)."""
