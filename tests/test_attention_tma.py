"""The Hopper TMA forward (``triton_fwd_tma``) and its opt-in two-pass, warp-specialised form
(``triton_fwd_ws``) against the float64 truth, and the TMA predicate.

The interpreter runs host-side tensor descriptors (Triton 3.6 materialises a descriptor block as
masked pointer loads: zeros past the shape, stores clipped), so the kernel runs here as it is,
descriptors included; a GPU (compiled, capability >= 9.0) runs the same tests. Small, mismatched
tiles give every query tile masked edges, full middles and a partial last tile at N ~ 100.
"""

from __future__ import annotations

import math

import pytest
import torch

from attention_cases import (
    FAMILIES, assert_close, dense_attention, make_mask, make_qkv, run_with_grads, truth_and_baseline,
)
from conftest import DEVICE, _PoisonedTorch
from cocoa_kernels import KeyRanges, attention
from cocoa_kernels._backend import choose_impl
from cocoa_kernels.attention import reference, triton_fwd, triton_fwd_tma, triton_fwd_ws
from cocoa_kernels.attention.config import KernelConfig, forward_path, tma_fwd_config, tma_ws_config
from cocoa_kernels.attention.triton_common import LOG2E
from cocoa_kernels.attention.triton_fwd_tma import attention_fwd_tma, tma_forward_supported
from cocoa_kernels.attention.triton_fwd_ws import attention_fwd_tma_ws
from cocoa_kernels.mask import query_tile_bounds

HOPPER = DEVICE.type == "cuda" and torch.cuda.get_device_capability() >= (9, 0)
if DEVICE.type == "cuda" and not HOPPER:
    pytest.skip("the TMA forward needs compute capability 9.0 (tensor descriptors)", allow_module_level=True)

SMALL = KernelConfig(32, 16)  # block_m != block_n: edges and full tiles at different offsets
# The launcher is called directly here, not through attention(): ask for Triton the way the API
# does, which (on the CPU) makes the interpreter's bf16 dots and casts behave as a GPU's.
choose_impl("attention", DEVICE, "triton")


@pytest.fixture(autouse=True)
def _poison_outputs(monkeypatch):
    """Fresh buffers the launcher allocates come back NaN, so a row the kernel skips fails."""
    monkeypatch.setattr(triton_fwd_tma, "torch", _PoisonedTorch())
    monkeypatch.setattr(triton_fwd_ws, "torch", _PoisonedTorch())


def _two_pass(q, k, v, lo, hi, scale, cfg):
    return attention_fwd_tma_ws(q, k, v, lo, hi, scale, cfg, cfg)


LAUNCHERS = {"one_pass": attention_fwd_tma, "two_pass_ws": _two_pass}


def forward(q, k, v, mask: KeyRanges, scale=None, cfg=SMALL, launcher="one_pass"):
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    lo, hi = mask.lo.int().contiguous(), mask.effective_hi().int().contiguous()
    return LAUNCHERS[launcher](q, k, v, lo, hi, scale, cfg)


def check_forward(q, k, v, mask, scale=None, cfg=SMALL, launcher="one_pass"):
    """Output within 2x PyTorch's own error in the inputs' dtype, lse (log2 units) within float32
    rounding of the float64 truth, +inf exactly where a row sees nothing."""
    out, lse = forward(q, k, v, mask, scale, cfg, launcher)
    cpu = [t.detach().cpu() for t in (q, k, v)]
    dense_mask = mask.to("cpu")
    truth = dense_attention(*[t.double() for t in cpu], dense_mask, scale)
    baseline = dense_attention(*cpu, dense_mask, scale)
    assert_close("out", out, truth, baseline)
    s = q.shape[-1] ** -0.5 if scale is None else scale
    _, lse_truth = reference.attention_forward(*[t.double() for t in cpu], dense_mask.lo, dense_mask.effective_hi(), s)
    lse_truth = lse_truth * LOG2E
    lse = lse.cpu().double()
    empty = torch.isinf(lse_truth)
    assert torch.equal(torch.isinf(lse) & (lse > 0), empty), "lse must be +inf exactly on the rows that see nothing"
    torch.testing.assert_close(lse[~empty], lse_truth[~empty], rtol=2e-6, atol=1e-5, msg="lse (log2 units)")
    return out, lse


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("launcher", list(LAUNCHERS))
def test_mask_families_gqa(family, dtype, launcher):
    B, Hq, Hkv, N, D = 2, 4, 2, 130, 64
    mask = make_mask(family, B, N, seed=1).to(DEVICE)
    q, k, v, _ = make_qkv(B, Hq, Hkv, N, D, dtype, DEVICE, seed=2)
    check_forward(q, k, v, mask, launcher=launcher)


@pytest.mark.parametrize("D", [64, 80, 96, 128], ids=lambda d: f"d{d}")
@pytest.mark.parametrize("launcher", list(LAUNCHERS))
def test_head_dims(D, launcher):
    """80 and 96 run in a 128-wide tile: the descriptor reads zeros past D and writes only D columns."""
    mask = make_mask("eos_bridge", 1, 45, seed=D).to(DEVICE)
    q, k, v, _ = make_qkv(1, 2, 1, 45, D, torch.bfloat16, DEVICE, seed=D)
    out, _ = check_forward(q, k, v, mask, launcher=launcher)
    assert out.shape == (1, 2, 45, D)


@pytest.mark.parametrize("N", [1, 17], ids=lambda n: f"n{n}")
@pytest.mark.parametrize("family", ["causal_packed", "eos_bridge"])
@pytest.mark.parametrize("launcher", list(LAUNCHERS))
def test_odd_lengths(family, N, launcher):
    mask = make_mask(family, 2, N, seed=N).to(DEVICE)
    q, k, v, _ = make_qkv(2, 2, 2, N, 64, torch.float32, DEVICE, seed=N)
    check_forward(q, k, v, mask, launcher=launcher)


@pytest.mark.parametrize("cfg", [KernelConfig(16, 32), KernelConfig(64, 64)], ids=["16x32", "64x64"])
@pytest.mark.parametrize("launcher", list(LAUNCHERS))
def test_other_tiles_and_custom_scale(cfg, launcher):
    mask = make_mask("random_intervals", 2, 100, seed=4).to(DEVICE)
    q, k, v, _ = make_qkv(2, 3, 1, 100, 64, torch.float16, DEVICE, seed=4)
    check_forward(q, k, v, mask, scale=0.3, cfg=cfg, launcher=launcher)


@pytest.mark.parametrize("launcher", list(LAUNCHERS))
def test_strided_inputs_as_transformers_passes_them(launcher):
    """q a (B, N, H, D) projection viewed as (B, H, N, D); k and v slices of one fused tensor:
    descriptors take their strides as they are, and the output is token-major in memory."""
    B, Hq, Hkv, N, D = 2, 4, 2, 37, 64
    gen = torch.Generator().manual_seed(5)
    q = torch.randn(B, N, Hq, D, generator=gen).to(DEVICE, torch.bfloat16).transpose(1, 2)
    kv = torch.randn(B, N, 2 * Hkv, D, generator=gen).to(DEVICE, torch.bfloat16)
    k, v = kv[:, :, :Hkv].transpose(1, 2), kv[:, :, Hkv:].transpose(1, 2)
    assert not q.is_contiguous() and not k.is_contiguous()
    assert tma_forward_supported(q, k, v, capability=(9, 0))
    out, _ = check_forward(q, k, v, make_mask("causal_packed", B, N, seed=5).to(DEVICE), launcher=launcher)
    assert out.transpose(1, 2).is_contiguous()


@pytest.mark.parametrize("launcher", list(LAUNCHERS))
def test_rows_that_see_nothing_give_zeros(launcher):
    B, H, N, D = 1, 2, 40, 64
    lo = torch.zeros(B, N, dtype=torch.int32)
    hi = torch.full((B, N), N, dtype=torch.int32)
    hi[0, 10:25] = 0
    mask = KeyRanges(lo, hi).to(DEVICE)
    q, k, v, _ = make_qkv(B, H, H, N, D, torch.float32, DEVICE, seed=7)
    out, lse = check_forward(q, k, v, mask, launcher=launcher)
    assert torch.all(out[:, :, 10:25] == 0)
    # Huge scores (softmax ~one-hot) leave every row finite and the empty ones zero.
    out, lse = forward(q * 1e3, k, v, mask, launcher=launcher)
    assert torch.isfinite(out).all() and torch.all(out[:, :, 10:25] == 0)
    assert torch.all(lse[:, :, 10:25] == math.inf) and torch.isfinite(lse[:, :, :10]).all()


@pytest.mark.parametrize("launcher", list(LAUNCHERS))
def test_all_padding_batch(launcher):
    mask = KeyRanges.from_segments(torch.full((2, 19), -1)).to(DEVICE)
    q, k, v, _ = make_qkv(2, 2, 1, 19, 64, torch.bfloat16, DEVICE)
    out, lse = forward(q, k, v, mask, launcher=launcher)
    assert torch.all(out == 0) and torch.all(lse == math.inf)


def test_backward_from_its_lse(monkeypatch):
    """The Triton backward, fed this forward's (out, lse), gives the true gradients: the lse is in
    the units and form the backward recomputes its probabilities with."""
    calls = []

    def tma_launch(q, k, v, lo, hi, scale, cfg):
        calls.append(cfg)
        return attention_fwd_tma(q, k, v, lo, hi, scale, cfg)

    monkeypatch.setattr(triton_fwd, "attention_fwd", tma_launch)
    mask = make_mask("eos_bridge", 2, 75, seed=23).to(DEVICE)
    q, k, v, do = make_qkv(2, 6, 2, 75, 64, torch.bfloat16, DEVICE, seed=23)
    got = run_with_grads(lambda a, b, c: attention(a, b, c, mask, impl="triton"), q, k, v, do)
    assert calls, "the op did not launch the forward through triton_fwd.attention_fwd"
    truth, base = truth_and_baseline(q, k, v, do, mask)
    for name, g, t, b in zip(("out", "dq", "dk", "dv"), got, truth, base):
        assert_close(name, g, t, b)


# --- the two-pass forward: full tiles warp-specialised, then the masked edges merged ---------------

def _long_segments(kind: str, N: int = 130) -> KeyRanges:
    """Masks whose tiles have many full key tiles at 16x16 (the packed families' 40-token
    segments leave few): one causal row, two bidirectional samples, a bridge with long blocks."""
    if kind == "causal":
        return KeyRanges.from_segments(torch.zeros(2, N, dtype=torch.long), causal=True)
    seg = torch.tensor([[0] * 70 + [1] * (N - 70), [0] * 90 + [1] * (N - 100) + [-1] * 10])
    if kind == "bidir":
        return KeyRanges.from_segments(seg)
    is_target = torch.zeros(2, N, dtype=torch.bool)
    is_target[0, 45:70] = is_target[0, 110:] = True
    is_target[1, 60:90] = True
    return KeyRanges.eos_bridge(seg, is_target)


def _spy_full_pass(monkeypatch) -> list:
    """The (part, lse_part) each two-pass launch hands its edge pass, recorded."""
    seen = []
    launch = triton_fwd_tma.launch_tma_forward

    def spy(*args, full_partial=None, **kwargs):
        seen.append(full_partial)
        return launch(*args, full_partial=full_partial, **kwargs)

    monkeypatch.setattr(triton_fwd_ws, "launch_tma_forward", spy)
    return seen


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("kind", ["causal", "bidir", "bridge"])
@pytest.mark.parametrize("cfg", [KernelConfig(16, 16), KernelConfig(32, 16)], ids=["16x16", "32x16"])
def test_two_pass_merges_the_full_tiles(monkeypatch, kind, dtype, cfg):
    """Both passes do work (the full pass's partial is finite on many rows) and the merge gives
    the truth, GQA and padding included."""
    seen = _spy_full_pass(monkeypatch)
    mask = _long_segments(kind).to(DEVICE)
    q, k, v, _ = make_qkv(2, 4, 2, 130, 64, dtype, DEVICE, seed=31)
    check_forward(q, k, v, mask, cfg=cfg, launcher="two_pass_ws")
    (part, lse_part), = seen
    # Rows of tiles with full key tiles have a written (finite) partial; the others' stay poisoned.
    bounds = query_tile_bounds(mask.lo.int(), mask.effective_hi().int(), cfg.block_m, cfg.block_n).cpu()
    rows_full = (bounds[..., 2] > bounds[..., 1]).repeat_interleave(cfg.block_m, dim=1)[:, None, :130]
    written = torch.isfinite(lse_part.cpu())
    assert torch.equal(written, rows_full.expand_as(written)), "the partial is written exactly on tiles with full key tiles"
    assert rows_full.float().mean() > 0.3, "the full-tile pass ran on too few rows to test the merge"
    assert torch.isfinite(part.cpu()[written]).all()


def test_two_pass_head_dim_80():
    """The partial holds D columns of a 128-wide tile: written and read back with the D mask."""
    mask = _long_segments("bridge").to(DEVICE)
    q, k, v, _ = make_qkv(2, 2, 1, 130, 80, torch.bfloat16, DEVICE, seed=37)
    check_forward(q, k, v, mask, cfg=KernelConfig(16, 16), launcher="two_pass_ws")


def test_two_pass_needs_one_tiling():
    q, k, v, _ = make_qkv(1, 1, 1, 8, 64, torch.bfloat16, DEVICE)
    lo = torch.zeros(1, 8, dtype=torch.int32, device=DEVICE)
    with pytest.raises(ValueError, match="same tiles"):
        attention_fwd_tma_ws(q, k, v, lo, lo + 8, 0.1, KernelConfig(16, 16), KernelConfig(32, 16))


def test_forward_path_tma_ws_runs_it_through_attention(monkeypatch):
    """``forward_path("tma_ws")`` routes the op's forward to the two passes where the TMA forward
    would run (forced here: the CPU has no capability to ask), and the backward takes its lse."""
    calls = []

    def two_pass(q, k, v, lo, hi, scale, cfg, full_cfg):
        calls.append((cfg, full_cfg))
        return attention_fwd_tma_ws(q, k, v, lo, hi, scale, SMALL, SMALL)

    monkeypatch.setattr(triton_fwd_tma, "tma_forward_tiles", lambda *args, **kwargs: SMALL)
    monkeypatch.setattr(triton_fwd_ws, "attention_fwd_tma_ws", two_pass)
    mask = _long_segments("bridge").to(DEVICE)
    q, k, v, do = make_qkv(2, 4, 2, 130, 64, torch.bfloat16, DEVICE, seed=41)
    with forward_path("tma_ws"):
        got = run_with_grads(lambda a, b, c: attention(a, b, c, mask, impl="triton"), q, k, v, do)
    assert calls, "forward_path('tma_ws') did not launch the two-pass forward"
    truth, base = truth_and_baseline(q, k, v, do, mask)
    for name, g, t, b in zip(("out", "dq", "dk", "dv"), got, truth, base):
        assert_close(name, g, t, b)


@pytest.mark.parametrize("D", [64, 128], ids=lambda d: f"d{d}")
def test_shipped_two_pass_tiles_agree(D):
    """The full-tile pass's shipped tiles are the TMA forward's (the passes share tile bounds)."""
    one, full = tma_fwd_config(D, on_gpu=True), tma_ws_config(D, on_gpu=True)
    assert (one.block_m, one.block_n) == (full.block_m, full.block_n)


@pytest.mark.gpu
@pytest.mark.skipif(not HOPPER, reason="the shipped 128x128 tiles compile for a Hopper GPU")
@pytest.mark.parametrize("D", [64, 96, 128], ids=lambda d: f"d{d}")
def test_shipped_tiles_match_pointer_forward(D):
    """The tables' tiles, compiled: the same output and lse as the pointer forward, in one pass and in
    two (the warp-specialised full-tile pass, then the edges), 3k tokens. Row 0 a bridge of long
    samples (tiles with full key tiles: the specialised loop runs), row 1 the packed families'
    40-token samples (none at 128x128: it runs zero times)."""
    seg = torch.tensor([0] * 1100 + [1] * 900 + [2] * 1000)
    is_target = torch.zeros(3000, dtype=torch.bool)
    for start, length in ((0, 1100), (1100, 900), (2000, 1000)):
        is_target[start + 3 * length // 4 : start + length] = True
    long_rows = KeyRanges.eos_bridge(seg[None], is_target[None])
    packed = make_mask("eos_bridge", 1, 3000, seed=29)
    mask = KeyRanges(torch.cat([long_rows.lo, packed.lo]), torch.cat([long_rows.effective_hi(), packed.effective_hi()]))
    mask = mask.to(DEVICE)
    q, k, v, _ = make_qkv(2, 4, 2, 3000, D, torch.bfloat16, DEVICE, seed=29)
    lo, hi = mask.lo.int().contiguous(), mask.effective_hi().int().contiguous()
    out, lse = attention_fwd_tma(q, k, v, lo, hi, D**-0.5, tma_fwd_config(D, on_gpu=True))
    ref_out, ref_lse = triton_fwd.attention_fwd(q, k, v, lo, hi, D**-0.5, KernelConfig(128, 64, 8, 3))
    torch.testing.assert_close(out.float(), ref_out.float(), atol=2e-2, rtol=2e-2)
    torch.testing.assert_close(lse, ref_lse, atol=1e-4, rtol=1e-5)
    tiles = tma_fwd_config(D, on_gpu=True)
    bounds = query_tile_bounds(lo, hi, tiles.block_m, tiles.block_n)
    has_full = bounds[..., 2] > bounds[..., 1]
    assert has_full.any() and not has_full.all(), "both kinds of tile: a specialised loop that runs, one that does not"
    ws_out, ws_lse = attention_fwd_tma_ws(q, k, v, lo, hi, D**-0.5, tiles, tma_ws_config(D, on_gpu=True))
    torch.testing.assert_close(ws_out.float(), ref_out.float(), atol=2e-2, rtol=2e-2)
    torch.testing.assert_close(ws_lse, ref_lse, atol=1e-4, rtol=1e-5)


# --- tma_forward_supported: what a TMA descriptor takes, checked on the CPU -----------------------

def _qkv(dtype=torch.bfloat16, D=64):
    return [torch.zeros(2, 4, 33, D, dtype=dtype) for _ in range(3)]


def _wide_rows(D=64):
    """(B, H, N, D) views whose rows are D + 2 elements apart: 132 bytes, not a multiple of 16."""
    return torch.zeros(2, 4, 33, D + 2, dtype=torch.bfloat16)[..., :D]


REJECTED = {
    "ampere": lambda: ((*_qkv(),), (8, 0)),
    "ada": lambda: ((*_qkv(),), (8, 9)),
    "fp32": lambda: ((*_qkv(torch.float32),), (9, 0)),
    "mixed-dtypes": lambda: ((_qkv()[0], *_qkv(torch.float16)[1:]), (9, 0)),
    "d59-odd-row-bytes": lambda: ((*_qkv(D=59),), (9, 0)),
    "d256-too-wide": lambda: ((*_qkv(D=256),), (9, 0)),
    "last-stride-not-1": lambda: ((_qkv()[0].transpose(-1, -2).contiguous().transpose(-1, -2), *_qkv()[1:]), (9, 0)),
    "misaligned-base": lambda: ((torch.zeros(2 * 4 * 33 * 64 + 1, dtype=torch.bfloat16)[1:].view(2, 4, 33, 64),
                                 *_qkv()[1:]), (9, 0)),
    "row-stride-not-16-bytes": lambda: ((_qkv()[0], _wide_rows(), _qkv()[2]), (9, 0)),
}


@pytest.mark.parametrize("name", REJECTED)
def test_predicate_rejects(name):
    tensors, capability = REJECTED[name]()
    assert not tma_forward_supported(*tensors, capability=capability)


@pytest.mark.parametrize("capability", [(9, 0), (10, 0)], ids=["sm90", "sm100"])
@pytest.mark.parametrize("dtype, D", [(torch.bfloat16, 64), (torch.float16, 128), (torch.bfloat16, 80),
                                      (torch.bfloat16, 96)], ids=["bf16-d64", "fp16-d128", "bf16-d80", "bf16-d96"])
def test_predicate_accepts(dtype, D, capability):
    assert tma_forward_supported(*_qkv(dtype, D), capability=capability)


def test_predicate_off_cuda_without_capability():
    """CPU tensors and no capability given: no TMA (there is no device to ask)."""
    assert not tma_forward_supported(*_qkv())
