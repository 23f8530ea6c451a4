"""flareseg: fast, low-memory abdominal organ segmentation in CT (FLARE21 VGG-13 U-Net).

The top-level package imports only light modules; torch, ONNX Runtime and TensorRT are
imported by the modules that need them.
"""

from flareseg.errors import FlareSegError
from flareseg.labels import LABELS, NUM_CLASSES

__version__ = "0.1.0"

__all__ = ["LABELS", "NUM_CLASSES", "FlareSegError", "__version__"]
