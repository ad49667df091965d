"""cocoa_kernels: fused Triton ops for CoCoA training (no transformers import here).

    from cocoa_kernels import KeyRanges, attention
"""

from . import _mkl_vml  # noqa: F401  (settles MKL's lazy kernel choice before threads race on it)
from .attention import attention
from .losses import linear_cross_entropy
from .mask import KeyRanges

__all__ = ["KeyRanges", "attention", "linear_cross_entropy"]
__version__ = "0.1.0"
