"""quantkit: INT8 quantization and calibration for LLM inference, with measured accuracy and speed.

Importing this package is cheap: torch, onnxruntime and tensorrt are imported only inside the
functions that need them.
"""

__version__ = "0.1.0"
