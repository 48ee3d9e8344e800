"""Torch-free serving runtime: preprocessing, ONNX Predictor, fallback HTTP server.

``import serving`` stays light: ``Predictor`` and ``Prediction`` load onnxruntime only when
first used (``from serving import Predictor``).
"""

__all__ = ["Prediction", "Predictor"]


def __getattr__(name: str):
    if name in __all__:
        from serving import predictor

        return getattr(predictor, name)
    raise AttributeError(f"module 'serving' has no attribute {name!r}")
