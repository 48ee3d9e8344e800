"""Torch-free serving runtime: the model reader, preprocessing, the ONNX Predictor, the server.

``serving/artifacts.py`` reads a model (version directory, .mar, MLflow URI);
``serving/predictor.py`` makes an image's answer (decode -> infer -> encode);
``serving/http/`` is the fallback HTTP server (``python -m serving``).

``import serving`` stays light (no onnxruntime, no FastAPI): the TorchServe .mar carries this
package, and ``Predictor`` / ``Prediction`` load on first use (``from serving import
Predictor``).
"""

__all__ = ["Prediction", "Predictor"]


def __getattr__(name: str):
    if name in __all__:
        from serving import predictor

        return getattr(predictor, name)
    raise AttributeError(f"module 'serving' has no attribute {name!r}")
