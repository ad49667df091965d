"""cocoa: the training layer that plugs cocoa_kernels into a transformers backbone.

The transformers integration, the three CoCoA stages and the embedder land here; for now the
package holds the command-line entry point (``cocoa demo``).
"""

__version__ = "0.1.0"
