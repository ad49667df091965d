"""attention(): input validation, the impl switch, torch.library registration, torch.compile."""

from __future__ import annotations

import pytest
import torch

from attention_cases import make_mask, make_qkv
from conftest import DEVICE
from cocoa_kernels import KeyRanges, attention


def _inputs(B=1, Hq=2, Hkv=1, N=20, D=64, dtype=torch.float32):
    q, k, v, _ = make_qkv(B, Hq, Hkv, N, D, dtype, DEVICE)
    return q, k, v, make_mask("bidir_packed", B, N).to(DEVICE)


def _raises(exc, match, *args, **kwargs):
    with pytest.raises(exc, match=match):
        attention(*args, **kwargs)


def test_mismatched_heads():
    q, _, _, mask = _inputs(Hq=3)
    _, k, v, _ = _inputs(Hq=2, Hkv=2)
    _raises(ValueError, r"q heads \(3\) must be a multiple of k/v heads \(2\)", q, k, v, mask)


def test_k_v_shape_mismatch():
    q, k, v, mask = _inputs()
    _raises(ValueError, "k and v must have the same shape", q, k, v[:, :, :, :32], mask)
    _raises(ValueError, "k must have shape", q, k[:, :, :10], v[:, :, :10], mask)


def test_wrong_rank_and_type():
    q, k, v, mask = _inputs()
    _raises(ValueError, r"q must have shape \(B, H, N, D\)", q[0], k, v, mask)
    _raises(TypeError, "v must be a torch.Tensor", q, k, v.tolist(), mask)


def test_wrong_dtypes():
    q, k, v, mask = _inputs()
    _raises(TypeError, "k must have q's dtype", q, k.half(), v, mask)
    _raises(TypeError, "q must be one of", q.long(), k.long(), v.long(), mask)
    _raises(TypeError, "q must be one of", q.double(), k.double(), v.double(), mask, impl="triton")
    attention(q.double(), k.double(), v.double(), mask, impl="torch")  # float64 is fine on the torch path


def test_mask_checks():
    q, k, v, mask = _inputs()
    _raises(TypeError, "mask must be a cocoa_kernels.KeyRanges", q, k, v, mask.to_dense())
    other = make_mask("bidir_packed", 2, 20).to(DEVICE)
    _raises(ValueError, r"mask has shape \(2, 20\), expected \(B, N\) = \(1, 20\)", q, k, v, other)


def test_scale_checks():
    q, k, v, mask = _inputs()
    for bad in (0.0, -1.0, float("nan"), "0.1", True):
        _raises(ValueError, "scale must be a positive finite number", q, k, v, mask, scale=bad)


def test_head_dim_above_triton_limit():
    q, k, v, mask = _inputs(D=160)
    _raises(ValueError, "head dim 160 is above the Triton kernels' 128", q, k, v, mask, impl="triton")


def test_unknown_impl():
    q, k, v, mask = _inputs()
    _raises(ValueError, "impl must be one of", q, k, v, mask, impl="cuda")


def test_triton_on_cpu_without_interpreter_is_an_error(monkeypatch):
    q, k, v, mask = _inputs()
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    _raises(RuntimeError, "TRITON_INTERPRET=1", q.cpu(), k.cpu(), v.cpu(), mask.to("cpu"), impl="triton")


@pytest.mark.skipif(DEVICE.type != "cuda", reason="needs two devices")
def test_mask_on_another_device():
    q, k, v, mask = _inputs()
    _raises(ValueError, "mask is on cpu but q is on cuda", q, k, v, mask.to("cpu"))


@pytest.mark.parametrize("impl", ["torch", "triton"])
def test_opcheck(impl):
    """Schema, fake kernels, autograd registration and AOT dispatch of both custom ops."""
    q, k, v, do = make_qkv(1, 2, 1, 33, 64, torch.float32, DEVICE, seed=3)
    mask = make_mask("eos_bridge", 1, 33, seed=3).to(DEVICE)
    lo, hi = mask.lo, mask.effective_hi()
    q, k, v = (t.requires_grad_() for t in (q, k, v))
    torch.library.opcheck(torch.ops.cocoa.attention_fwd.default, (q, k, v, lo, hi, 0.125, impl))
    out, lse = torch.ops.cocoa.attention_fwd(q.detach(), k.detach(), v.detach(), lo, hi, 0.125, impl)
    torch.library.opcheck(
        torch.ops.cocoa.attention_bwd.default, (do, q.detach(), k.detach(), v.detach(), out, lse, lo, hi, 0.125, impl)
    )


def test_torch_compile_traces_without_graph_breaks():
    q, k, v, do = make_qkv(1, 2, 1, 24, 64, torch.float32, DEVICE, seed=4)
    mask = make_mask("causal_packed", 1, 24, seed=4).to(DEVICE)

    def layer(q, k, v):
        return attention(q * 2, k, v, mask).sum(dim=1)

    compiled = torch.compile(layer, fullgraph=True, backend="aot_eager")
    q1, q2 = q.clone().requires_grad_(), q.clone().requires_grad_()
    torch.testing.assert_close(compiled(q1, k, v), layer(q2, k, v))
    compiled(q1, k, v).sum().backward()
    layer(q2, k, v).sum().backward()
    torch.testing.assert_close(q1.grad, q2.grad)
