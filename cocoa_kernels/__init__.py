"""cocoa_kernels: fused Triton ops for CoCoA training (no transformers import here).

    from cocoa_kernels import KeyRanges, attention
"""

from .attention import attention
from .mask import KeyRanges

__all__ = ["KeyRanges", "attention"]
__version__ = "0.1.0"
