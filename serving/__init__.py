"""Torch-free serving runtime: preprocessing, ONNX Predictor, fallback HTTP server."""
