"""cocoa: the training layer that plugs cocoa_kernels into a transformers backbone.

``import cocoa`` registers ``attn_implementation="cocoa_triton"`` with transformers; see
``cocoa.integration``. The training layer needs the ``transformers`` extra
(``pip install "cocoa[transformers]"``: transformers, accelerate, pillow, ...); ``cocoa_kernels``
alone needs only torch and triton. Without the extra, ``import cocoa`` still works and names the
extra when something that needs it is used.
"""

__version__ = "0.1.0"

# Distributions the "transformers" extra installs, by the module name they import as.
EXTRA_MODULES = {"transformers": "transformers", "accelerate": "accelerate", "PIL": "pillow",
                 "safetensors": "safetensors", "tqdm": "tqdm", "matplotlib": "matplotlib", "pyarrow": "pyarrow"}


def missing_extra(error: ModuleNotFoundError) -> str | None:
    """The message for a missing training-layer dependency, or None if ``error`` is about another module."""
    name = (error.name or "").split(".")[0]
    if name not in EXTRA_MODULES:
        return None
    return (f"the package '{EXTRA_MODULES[name]}' is not installed; cocoa's training layer needs the "
            "'transformers' extra: pip install \"cocoa[transformers]\" (cocoa_kernels alone needs only torch and triton)")


try:
    from .integration import ATTN_IMPLEMENTATION, one_call_vision_attention, register
    from .loading import load_model
    from .embed import Embedder
except ModuleNotFoundError as error:
    _message, _missing = missing_extra(error), error.name
    if _message is None:
        raise
    ATTN_IMPLEMENTATION = "cocoa_triton"

    def __getattr__(name):
        if name.startswith("__"):  # import machinery probing dunders
            raise AttributeError(name)
        raise ModuleNotFoundError(f"cocoa.{name}: {_message}", name=_missing)
else:
    register()
