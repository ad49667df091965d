"""``torch.compile(model, fullgraph=True)`` of Qwen2 and Qwen2-VL models running "cocoa_triton":
forward and backward, with and without ``key_ranges``, with padding, on the PyTorch CPU path and
on the Triton kernels (through the interpreter where no GPU is present). The compiled model
equals the same model uncompiled and the "sdpa" model.

Qwen2-VL with images compiles whole when the vision tower makes one attention call
(``cocoa.integration.one_call_vision_attention``, which ``cocoa.load_model`` applies; transformers'
per-image split reads lengths on the host, and breaks the graph for "sdpa" too) and the
position ids are given (transformers' ``get_rope_index`` is not traceable either; our collators
compute them).

Most cases compile with the ``aot_eager`` backend (dynamo's whole-graph capture and AOT autograd,
what fullgraph is about, in seconds); one text case goes through inductor, the default backend.
"""

from __future__ import annotations

import pytest
import torch
from transformers import Qwen2ForCausalLM, Qwen2VLForConditionalGeneration

import cocoa
from cocoa.integration import one_call_vision_attention
from cocoa_kernels import KeyRanges
from cocoa_kernels._backend import interpreting
from tiny_models import IMAGE_TOKEN, VISION_END, VISION_START, image_grid, qwen2_config, qwen2vl_config, same_weights

IMPL = cocoa.ATTN_IMPLEMENTATION
IMPLS = ["torch", pytest.param("triton", marks=pytest.mark.skipif(
    not (torch.cuda.is_available() or interpreting()), reason="the Triton kernels need a GPU or TRITON_INTERPRET=1"))]


def _text_inputs(case: str) -> dict:
    ids = torch.randint(1, 280, (2, 13), generator=torch.Generator().manual_seed(0))
    if case == "padding":
        am = torch.ones(2, 13, dtype=torch.long)
        am[1, :3] = 0
        return {"input_ids": ids, "attention_mask": am}
    if case == "key_ranges":
        seg = torch.tensor([[0] * 6 + [1] * 7, [0] * 10 + [-1] * 3])
        return {"input_ids": ids, "key_ranges": KeyRanges.from_segments(seg), "attention_mask": (seg >= 0).long()}
    return {"input_ids": ids}


def _vl_inputs(case: str) -> dict:
    row = [VISION_START] + [IMAGE_TOKEN] * 4 + [VISION_END, 10, 11, 12, 13, 14, 15]
    ids = torch.tensor([row, [30 + i for i in range(12)]])
    pixels, grid = image_grid(1)
    inputs = {"input_ids": ids, "pixel_values": pixels, "image_grid_thw": grid,
              "mm_token_type_ids": (ids == IMAGE_TOKEN).int()}
    if case == "padding":
        am = torch.ones(2, 12, dtype=torch.long)
        am[1, 9:] = 0
        inputs["attention_mask"] = am
    elif case == "key_ranges":
        seg = torch.tensor([[0] * 12, [0] * 5 + [1] * 7])
        target = torch.zeros(2, 12, dtype=torch.bool)
        target[0, 9:] = True
        target[1, 3:5] = True
        inputs["key_ranges"] = KeyRanges.eos_bridge(seg, target)
    return inputs


def _loss_and_grads(model, inputs, impl):
    model.zero_grad()
    logits = model(**inputs, cocoa_impl=impl).logits if impl else model(**inputs).logits
    valid = inputs.get("attention_mask", torch.ones(logits.shape[:2], dtype=torch.long)).bool()
    weights = torch.randn(logits.shape, generator=torch.Generator().manual_seed(1))
    (logits * weights)[valid].sum().backward()
    return logits.detach()[valid], {n.removeprefix("_orig_mod."): p.grad.clone()
                                    for n, p in model.named_parameters() if p.grad is not None}


CASES = [
    ("qwen2", Qwen2ForCausalLM, qwen2_config, _text_inputs),
    ("qwen2vl", Qwen2VLForConditionalGeneration, qwen2vl_config, _vl_inputs),
]


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("case", ["no_mask", "padding", "key_ranges"])
@pytest.mark.parametrize("name, model_cls, config, make_inputs", CASES, ids=[c[0] for c in CASES])
def test_fullgraph_compile_matches_the_uncompiled_model_and_sdpa(name, model_cls, config, make_inputs, case, impl):
    torch._dynamo.reset()
    sdpa, ours = same_weights(model_cls, config(), ["sdpa", IMPL])
    inputs = make_inputs(case)
    if name == "qwen2vl":
        assert one_call_vision_attention(ours) == 2
        inputs["position_ids"], _ = ours.model.get_rope_index(
            inputs["input_ids"], mm_token_type_ids=inputs["mm_token_type_ids"], image_grid_thw=inputs["image_grid_thw"],
            attention_mask=inputs.get("attention_mask"))
    backend = "inductor" if (name, case, impl) == ("qwen2", "key_ranges", "torch") else "aot_eager"
    compiled = torch.compile(ours, fullgraph=True, backend=backend)

    got, got_grads = _loss_and_grads(compiled, inputs, impl)
    want, want_grads = _loss_and_grads(ours, inputs, impl)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert got_grads.keys() == want_grads.keys() and len(want_grads) > 10
    for n in want_grads:
        torch.testing.assert_close(got_grads[n], want_grads[n], rtol=1e-4, atol=1e-5, msg=n)

    if case != "key_ranges":  # sdpa has no key_ranges: same mask from the same padding
        ref, ref_grads = _loss_and_grads(sdpa, inputs, None)
        torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-4)
        for n in ref_grads:
            torch.testing.assert_close(got_grads[n], ref_grads[n], rtol=1e-3, atol=1e-4, msg=n)


def test_an_invalid_mask_fails_the_compiled_run_instead_of_computing_garbage():
    """Under compile the mask checks run on the device (cocoa_kernels.mask.refuse)."""
    torch._dynamo.reset()
    (ours,) = same_weights(Qwen2ForCausalLM, qwen2_config(), [IMPL])
    compiled = torch.compile(ours, fullgraph=True, backend="aot_eager")
    am = torch.ones(2, 13, dtype=torch.long)
    am[1, 5] = 0  # padding inside a row
    with pytest.raises(RuntimeError, match="invalid attention mask"):
        compiled(input_ids=_text_inputs("none")["input_ids"], attention_mask=am)
