"""cocoa: the training layer that plugs cocoa_kernels into a transformers backbone.

``import cocoa`` registers ``attn_implementation="cocoa_triton"`` with transformers (when it is
installed); see ``cocoa.integration``.
"""

__version__ = "0.1.0"

try:
    from .integration import ATTN_IMPLEMENTATION, register
    from .loading import load_model
    from .embed import Embedder
except ImportError:  # transformers not installed: cocoa_kernels and `cocoa demo` still work
    ATTN_IMPLEMENTATION = "cocoa_triton"
else:
    register()
