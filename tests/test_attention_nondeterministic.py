"""``attention(..., deterministic=False)``: the fused backward (the dK/dV kernel with
``ACCUMULATE_DQ``: 5 products per tile, dQ added atomically into fp32) against the float64 dense truth; the flag's
validation and plumbing (custom op, torch implementation, transformers keyword).

On the CPU the interpreter runs programs one after another, so the atomic adds happen in a fixed
order here; the run-to-run variation the flag allows only shows on a GPU.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from attention_cases import FAMILIES, assert_close, make_mask, make_qkv, run_with_grads, truth_and_baseline
from conftest import DEVICE, SMALL_TILES, _PoisonedTorch
from cocoa_kernels import KeyRanges, attention
from cocoa_kernels.attention import config as attn_config
from cocoa_kernels.attention import triton_bwd

NAMES = ("out", "dq", "dk", "dv")


@pytest.fixture(autouse=True)
def _poison_fused_buffers(monkeypatch):
    """Every buffer the fused launcher allocates (delta, the fp32 dQ accumulator the delta kernel
    must zero, dK/dV and their split partials, dQ) starts as NaN, so an element left unwritten or
    an accumulator left unzeroed fails the comparison."""
    monkeypatch.setattr(triton_bwd, "torch", _PoisonedTorch())


def check_fused(q, k, v, do, mask, scale=None, mult=2.0):
    got = run_with_grads(
        lambda a, b, c: attention(a, b, c, mask, scale=scale, impl="triton", deterministic=False), q, k, v, do
    )
    truth, base = truth_and_baseline(q, k, v, do, mask, scale)
    for name, g, t, b in zip(NAMES, got, truth, base):
        assert_close(f"fused {name}", g, t, b, mult=mult)
    return got


@pytest.mark.parametrize("family", FAMILIES)
def test_mask_families_gqa_bf16(family):
    B, Hq, Hkv, N, D = 2, 4, 2, 130, 64
    mask = make_mask(family, B, N, seed=1).to(DEVICE)
    q, k, v, do = make_qkv(B, Hq, Hkv, N, D, torch.bfloat16, DEVICE, seed=2)
    check_fused(q, k, v, do, mask)


@pytest.mark.parametrize("N", [1, 17], ids=lambda n: f"n{n}")
@pytest.mark.parametrize("family", ["causal_packed", "eos_bridge"])
def test_odd_lengths_fp32(family, N):
    mask = make_mask(family, 2, N, seed=N).to(DEVICE)
    q, k, v, do = make_qkv(2, 2, 2, N, 64, torch.float32, DEVICE, seed=N)
    check_fused(q, k, v, do, mask)


@pytest.mark.parametrize("D", [64, 80, 96, 128], ids=lambda d: f"d{d}")
def test_head_dims(D):
    dtype = torch.bfloat16 if D == 80 else torch.float32  # 80: the vision tower's, in bf16
    mask = make_mask("eos_bridge", 1, 45, seed=D).to(DEVICE)
    q, k, v, do = make_qkv(1, 2, 1, 45, D, dtype, DEVICE, seed=D)
    check_fused(q, k, v, do, mask)


@pytest.mark.parametrize("splits", [1, 2, 3], ids=lambda s: f"splits{s}")
def test_group_of_six_query_heads_on_one_kv_head(splits):
    """Hq=6, Hkv=1: six query heads add into dQ from every key tile's program; with splits, the
    group's heads are shared out over programs whose fp32 dK/dV partials the launcher sums."""
    cfg = attn_config.AttentionConfig(SMALL_TILES.fwd, SMALL_TILES.dq, SMALL_TILES.dkdv, dkdv_splits=splits)
    mask = make_mask("eos_bridge", 2, 75, seed=23).to(DEVICE)
    q, k, v, do = make_qkv(2, 6, 1, 75, 64, torch.bfloat16, DEVICE, seed=23)
    with attn_config.use_config(cfg):
        check_fused(q, k, v, do, mask)


def test_fp16_custom_scale_and_strided_inputs():
    """q a (B, N, H, D) projection viewed as (B, H, N, D); k and v slices of one fused tensor."""
    B, Hq, Hkv, N, D = 2, 4, 2, 37, 64
    gen = torch.Generator().manual_seed(5)
    q = torch.randn(B, N, Hq, D, generator=gen).to(DEVICE, torch.float16).transpose(1, 2)
    kv = torch.randn(B, N, 2 * Hkv, D, generator=gen).to(DEVICE, torch.float16)
    k, v = kv[:, :, :Hkv].transpose(1, 2), kv[:, :, Hkv:].transpose(1, 2)
    do = torch.randn(B, Hq, N, D, generator=gen).to(DEVICE, torch.float16)
    mask = make_mask("causal_packed", B, N, seed=5).to(DEVICE)
    out, dq, dk, dv = check_fused(q, k, v, do, mask, scale=0.3)
    assert dq.stride() == q.stride(), "dq strided like q (token-major, as transformers hands it over)"


def test_rows_that_see_nothing_get_zero_grads():
    B, H, N, D = 1, 2, 40, 64
    lo = torch.zeros(B, N, dtype=torch.int32)
    hi = torch.full((B, N), N, dtype=torch.int32)
    hi[0, 10:25] = 0  # these queries see nothing
    mask = KeyRanges(lo, hi).to(DEVICE)
    q, k, v, do = make_qkv(B, H, H, N, D, torch.float32, DEVICE, seed=7)
    out, dq, dk, dv = check_fused(q, k, v, do, mask)
    assert torch.all(dq[:, :, 10:25] == 0)
    # Huge scores (softmax ~one-hot) must not turn any gradient into NaN/inf.
    got = run_with_grads(lambda a, b, c: attention(a, b, c, mask, impl="triton", deterministic=False),
                         q * 1e3, k, v, do)
    for name, t in zip(NAMES, got):
        assert torch.isfinite(t).all(), name
    assert torch.all(got[1][:, :, 10:25] == 0)


def test_flag_picks_the_backward(monkeypatch):
    """False runs the delta kernel and the dK/dV kernel with ACCUMULATE_DQ only, True (the
    default) the dQ kernel and the dK/dV kernel without it, and True gives bitwise the same
    gradients as not passing the flag."""
    calls = []
    for name in ("_attn_bwd_dq_kernel", "_delta_kernel", "_attn_bwd_dkdv_kernel"):
        kernel = getattr(triton_bwd, name)

        class Spy:
            def __init__(self, kernel, name):
                self.kernel, self.name = kernel, name

            def __getitem__(self, grid):
                def launch(*args, **kwargs):
                    calls.append(self.name + ("+dq" if kwargs.get("ACCUMULATE_DQ") else ""))
                    return self.kernel[grid](*args, **kwargs)
                return launch

        monkeypatch.setattr(triton_bwd, name, Spy(kernel, name))
    mask = make_mask("eos_bridge", 1, 40, seed=3).to(DEVICE)
    q, k, v, do = make_qkv(1, 2, 1, 40, 64, torch.bfloat16, DEVICE, seed=3)
    runs = {}
    for flag in (None, True, False):
        kwargs = {} if flag is None else {"deterministic": flag}
        calls.clear()
        runs[flag] = run_with_grads(lambda a, b, c: attention(a, b, c, mask, impl="triton", **kwargs), q, k, v, do)
        expected = (["_delta_kernel", "_attn_bwd_dkdv_kernel+dq"] if flag is False
                    else ["_attn_bwd_dq_kernel", "_attn_bwd_dkdv_kernel"])
        assert calls == expected, f"deterministic={flag}"
    for name, a, b in zip(NAMES, runs[None], runs[True]):
        assert torch.equal(a, b), f"{name}: deterministic=True differs from the default"
    assert torch.equal(runs[False][0], runs[True][0]), "the forward does not depend on the flag"


def test_torch_impl_accepts_and_ignores_the_flag():
    mask = make_mask("bidir_packed", 2, 33, seed=4)
    q, k, v, do = make_qkv(2, 4, 2, 33, 64, torch.float32, "cpu", seed=4)
    det = run_with_grads(lambda a, b, c: attention(a, b, c, mask, impl="torch", deterministic=True), q, k, v, do)
    fused = run_with_grads(lambda a, b, c: attention(a, b, c, mask, impl="torch", deterministic=False), q, k, v, do)
    for name, a, b in zip(NAMES, det, fused):
        assert torch.equal(a, b), name


@pytest.mark.parametrize("bad", [0, 1, None, "False", np.bool_(False), torch.tensor(True)],
                         ids=["int0", "int1", "None", "str", "numpy_bool", "tensor"])
@pytest.mark.parametrize("impl", ["triton", "torch"])
def test_deterministic_must_be_a_bool(impl, bad):
    mask = make_mask("bidir_packed", 1, 8).to(DEVICE)
    q, k, v, _ = make_qkv(1, 2, 2, 8, 64, torch.float32, DEVICE)
    with pytest.raises(TypeError, match=r"attention: deterministic must be True or False, got"):
        attention(q, k, v, mask, impl=impl, deterministic=bad)


@pytest.fixture
def deterministic_algorithms():
    """Turns torch.use_deterministic_algorithms on for a test (``enable(warn_only)``), and back."""
    before = (torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled())
    yield lambda warn_only: torch.use_deterministic_algorithms(True, warn_only=warn_only)
    torch.use_deterministic_algorithms(before[0], warn_only=before[1])


def test_refused_under_use_deterministic_algorithms(deterministic_algorithms):
    """As PyTorch's own nondeterministic ops: an error, or a warning with warn_only=True; the
    torch implementation is deterministic, so it runs either way."""
    mask = make_mask("bidir_packed", 1, 8).to(DEVICE)
    q, k, v, _ = make_qkv(1, 2, 2, 8, 64, torch.float32, DEVICE)
    deterministic_algorithms(False)
    with pytest.raises(RuntimeError, match=r"deterministic=False .* torch.use_deterministic_algorithms\(True\)"):
        attention(q, k, v, mask, impl="triton", deterministic=False)
    attention(q, k, v, mask, impl="torch", deterministic=False)
    deterministic_algorithms(True)
    with pytest.warns(UserWarning, match=r"deterministic=False"):
        attention(q, k, v, mask, impl="triton", deterministic=False)


def test_custom_ops_take_the_flag():
    """The flag is an op argument (torch.compile sees it) with a default, so 7-argument callers
    keep working; opcheck: schema, fake kernels, autograd registration, AOT dispatch."""
    for op in (torch.ops.cocoa.attention_fwd, torch.ops.cocoa.attention_bwd):
        assert "bool deterministic=True" in str(op.default._schema), op.default._schema
    mask = make_mask("eos_bridge", 1, 20, seed=9).to(DEVICE)
    lo, hi = mask.lo, mask.effective_hi()
    q, k, v, do = make_qkv(1, 2, 1, 20, 64, torch.float32, DEVICE, seed=9)
    grads = [t.clone().requires_grad_() for t in (q, k, v)]
    torch.library.opcheck(torch.ops.cocoa.attention_fwd.default, (*grads, lo, hi, 0.125, "triton", False))
    out, lse = torch.ops.cocoa.attention_fwd(q, k, v, lo, hi, 0.125, "triton", False)
    torch.library.opcheck(torch.ops.cocoa.attention_bwd.default,
                          (do, q, k, v, out, lse, lo, hi, 0.125, "triton", False))


def test_fused_tiles_follow_pin_table_and_interpreter():
    pinned = attn_config.AttentionConfig(SMALL_TILES.fwd, SMALL_TILES.dq, SMALL_TILES.dkdv,
                                         fused_bwd=attn_config.KernelConfig(64, 16))
    assert attn_config.fused_bwd_config(pinned, 64, 2, on_gpu=True, capability=(9, 0)).block_m == 64
    assert attn_config.fused_bwd_config(SMALL_TILES, 64, 2, on_gpu=False) == SMALL_TILES.dkdv
    hopper = attn_config.fused_bwd_config(SMALL_TILES, 128, 2, on_gpu=True, capability=(9, 0))
    ada = attn_config.fused_bwd_config(SMALL_TILES, 128, 2, on_gpu=True, capability=(8, 9))
    assert hopper == attn_config._FUSED_BWD_16BIT[128] and ada == attn_config._FUSED_BWD_16BIT_MMA_V2[128]
    assert attn_config.fused_bwd_config(SMALL_TILES, 64, 4, on_gpu=True, capability=(9, 0)) == \
        attn_config._FUSED_BWD_FP32


def test_transformers_keyword_reaches_every_attention_call(monkeypatch):
    """``model(..., cocoa_deterministic=False)`` reaches ``attention`` in every cocoa_triton
    layer; without it the layers get the deterministic default."""
    transformers = pytest.importorskip("transformers")
    import cocoa
    from cocoa import integration
    from tiny_models import qwen2_config

    seen = []
    real = integration.attention
    monkeypatch.setattr(integration, "attention",
                        lambda *a, deterministic=True, **kw: seen.append(deterministic) or real(*a, **kw))
    torch.manual_seed(0)
    model = transformers.Qwen2ForCausalLM._from_config(qwen2_config(), attn_implementation=cocoa.ATTN_IMPLEMENTATION)
    ids = torch.randint(1, 280, (2, 9), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        model(input_ids=ids, cocoa_deterministic=False)
        assert seen == [False, False], seen  # one call per decoder layer
        seen.clear()
        model(input_ids=ids)
        assert seen == [True, True], seen
