"""The MKL VML warm-up that ``import cocoa_kernels`` runs (see cocoa_kernels/_mkl_vml.py)."""

from __future__ import annotations

import pytest
import torch

from cocoa_kernels import _mkl_vml


def test_import_warmed_every_vml_op():
    assert _mkl_vml.WARMED == torch.backends.mkl.is_available()


@pytest.mark.skipif(not torch.backends.mkl.is_available(), reason="this torch build has no MKL")
def test_warm_up_calls_each_op_once_per_precision_on_one_element(monkeypatch):
    calls = []
    for name in _mkl_vml.VML_OPS:
        real = getattr(torch, name)
        monkeypatch.setattr(torch, name, lambda x, _n=name, _f=real: (calls.append((_n, x.dtype, x.numel())), _f(x))[1])
    assert _mkl_vml.warm_up()
    expected = {(n, d, 1) for n in _mkl_vml.VML_OPS for d in (torch.float32, torch.float64)}
    assert set(calls) == expected and len(calls) == len(expected)


@pytest.mark.skipif(not torch.backends.mkl.is_available(), reason="this torch build has no MKL")
def test_the_list_names_the_vml_functions_this_torch_links():
    """Every op whose VML kernel libtorch_cpu links is warmed (the list follows torch's build)."""
    import ctypes
    import os

    lib = ctypes.CDLL(os.path.join(os.path.dirname(torch.__file__), "lib", "libtorch_cpu.so"))
    vml = {"acos": "Acos", "asin": "Asin", "atan": "Atan", "cos": "Cos", "erf": "Erf", "erfc": "Erfc",
           "erfinv": "ErfInv", "exp": "Exp", "log": "Ln", "log10": "Log10", "log2": "Log2", "sin": "Sin",
           "sqrt": "Sqrt", "tan": "Tan", "tanh": "Tanh", "trunc": "Trunc"}
    assert set(vml) == set(_mkl_vml.VML_OPS)
    for op, fn in vml.items():
        assert hasattr(lib, f"vms{fn}") and hasattr(lib, f"vmd{fn}"), op
    # and nothing beyond the list: no other single-precision VML kernel is linked
    for extra in ("Exp2", "Expm1", "Log1p", "Cosh", "Sinh", "Cbrt", "InvSqrt", "Pow", "LGamma"):
        assert not hasattr(lib, f"vms{extra}"), extra
