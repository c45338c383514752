"""Exported models: a checkpoint's predictor as one ONNX graph, and that graph run by onnxruntime.

- `graph`: trace the predictor to ONNX (dynamic batch, height and width), stamp the metadata, check it;
- `metadata`: what the graph carries besides its weights (classes, normalisation, calibrator, ...);
- `parity`: the exported graph against the torch predictor on random images of several sizes;
- `runtime`: the optional dependencies, onnxruntime sessions, and the graph as a `Predictor`'s model.

onnx, onnxscript and onnxruntime are the optional extra ``trustseg[export]``, imported on use.
"""
