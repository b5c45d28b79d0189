"""The Triton primitives registered with torch.library.triton_op (as on a GPU), called eagerly.

Under the interpreter they are registered as plain custom ops (llm2clip_fast/ops/_library.py); this
test forces the triton_op registration GPU machines get, in a fresh process, and checks that eager
calls of every Triton-backed public op still give the reference values and gradients.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap

CODE = textwrap.dedent("""
    import llm2clip_fast.ops._library as library
    library._triton_op_usable = lambda: True  # before any op module registers its primitives
    import torch, torch.nn.functional as F
    from llm2clip_fast.models.text_adapter import TextAdapter, TextAdapterReference
    from llm2clip_fast.ops.clip_loss import clip_loss
    from llm2clip_fast.ops.masked_mean_pool import masked_mean_pool
    from llm2clip_fast.ops.reference import clip_loss_reference, siglip_loss_reference
    from llm2clip_fast.ops.siglip_loss import siglip_loss
    import torch._library.triton as triton_library

    # registered as triton_op, as on a GPU (torch keeps a table of them)
    assert "llm2clip_fast::clip_lse_forward_triton" in triton_library.triton_ops_to_kernels
    assert "llm2clip_fast::siglip_forward_triton" in triton_library.triton_ops_to_kernels
    assert "llm2clip_fast::adapter_layer_norm_fwd_triton" in triton_library.triton_ops_to_kernels
    torch.manual_seed(0)
    img = F.normalize(torch.randn(37, 16), dim=-1).requires_grad_()
    txt = F.normalize(torch.randn(37, 16), dim=-1).requires_grad_()
    for loss_fn, ref_fn, extra in ((clip_loss, clip_loss_reference, ()),
                                   (siglip_loss, siglip_loss_reference, (torch.tensor(-10.0),))):
        got = loss_fn(img, txt, torch.tensor(10.0), *extra, backend="triton")
        g = torch.autograd.grad(got, (img, txt))
        want = ref_fn(img, txt, torch.tensor(10.0), *extra)
        w = torch.autograd.grad(want, (img, txt))
        torch.testing.assert_close(got, want, atol=2e-5, rtol=2e-5)
        for a, b in zip(g, w):
            torch.testing.assert_close(a, b, atol=2e-5, rtol=2e-5)
    hidden, mask = torch.randn(2, 5, 16), torch.tensor([[1, 1, 0, 0, 0], [1, 1, 1, 1, 1]], dtype=torch.bool)
    want = (hidden * mask[..., None]).sum(1) / mask.sum(1, keepdim=True)
    torch.testing.assert_close(masked_mean_pool(hidden, mask, backend="triton"), want)
    ref = TextAdapterReference(40, 8, num_blocks=1)
    fused = TextAdapter(40, 8, num_blocks=1, backend="triton")
    fused.load_state_dict(ref.state_dict())
    x = torch.randn(5, 40, requires_grad=True)
    torch.testing.assert_close(fused(x), ref(x), atol=1e-5, rtol=1e-5)
    g = torch.autograd.grad(fused(x).sum(), [x, *fused.parameters()])
    w = torch.autograd.grad(ref(x).sum(), [x, *ref.parameters()])
    for a, b in zip(g, w):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)
    print("ok")
""")


def test_triton_op_registered_primitives_run_eagerly():
    r = subprocess.run([sys.executable, "-c", CODE], capture_output=True, text=True, timeout=300,
                       env={**__import__("os").environ, "TRITON_INTERPRET": "1"})
    assert r.returncode == 0 and r.stdout.strip().endswith("ok"), r.stderr[-3000:]
