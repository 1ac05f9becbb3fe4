"""Chunked cross-entropy and activation checkpointing against the unchunked / plain maths.

- `chunked_cross_entropy` vs `F.cross_entropy` of the full logits in fp64: loss and both
  gradients agree to 1e-12 (the same arithmetic, only split into chunks), for chunk sizes that
  divide the token count, that do not, of one token and larger than all tokens.
- No tensor bigger than one chunk's logits is created: a dispatch mode records the largest
  tensor any aten op produces in forward + backward, which must stay at chunk x vocab while
  the full logits would be 8x larger.
- On a real GPTModel, `enable_chunked_loss` returns the model's own per-token loss and the
  same parameter gradients to fp32 rounding (1e-5: the logits are the same products summed in
  another grouping), and activation checkpointing ('selective', 'full') gives bit-identical
  losses and gradients (recompute runs the same kernels on the same inputs).
"""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

from megatron_ext.config import config_from_dict
from megatron_ext.training.loss import chunked_cross_entropy, enable_chunked_loss
from megatron_ext.training.recompute import apply_activation_checkpointing


@pytest.mark.parametrize("chunk", [1, 8, 37, 100], ids=["one", "divides-not", "exact", "big"])
def test_chunked_equals_full_fp64(chunk: int) -> None:
    S, B, H, V = 37, 2, 16, 50
    g = torch.Generator().manual_seed(1)
    h = torch.randn(S, B, H, dtype=torch.float64, generator=g, requires_grad=True)
    w = torch.randn(V, H, dtype=torch.float64, generator=g, requires_grad=True)
    y = torch.randint(0, V, (S, B), generator=g)
    dl = torch.randn(S, B, dtype=torch.float64, generator=g)
    ref = F.cross_entropy((h @ w.t()).reshape(-1, V), y.reshape(-1), reduction="none")
    ref = ref.reshape(S, B)
    dh_ref, dw_ref = torch.autograd.grad((ref * dl).sum(), (h, w))
    out = chunked_cross_entropy(h, w, y, chunk_size=chunk)
    dh, dw = torch.autograd.grad((out * dl).sum(), (h, w))
    assert out.shape == (S, B)
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-12)
    torch.testing.assert_close(dh, dh_ref, rtol=0, atol=1e-12)
    torch.testing.assert_close(dw, dw_ref, rtol=0, atol=1e-12)


class _Largest(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else [out]:
            if isinstance(t, torch.Tensor):
                self.largest = max(self.largest, t.numel())
        return out


def test_never_materialises_full_logits() -> None:
    N, H, V, chunk = 256, 16, 1000, 32
    h = torch.randn(N, H, requires_grad=True)
    w = torch.randn(V, H, requires_grad=True)
    y = torch.randint(0, V, (N,))
    with _Largest() as mode:
        chunked_cross_entropy(h, w, y, chunk_size=chunk).sum().backward()
    assert mode.largest == chunk * V  # one chunk's logits, 8x below the full [N, V]
    with _Largest() as full:
        F.cross_entropy(h @ w.t(), y, reduction="none").sum().backward()
    assert full.largest == N * V


def test_bad_chunk_size() -> None:
    with pytest.raises(ValueError, match="chunk_size=0"):
        chunked_cross_entropy(torch.zeros(2, 4), torch.zeros(3, 4), torch.zeros(2).long(),
                              chunk_size=0)


@pytest.fixture
def tiny_model():
    from megatron.core import parallel_state as ps

    from megatron_ext.dist import init_distributed
    from megatron_ext.specs import build_gpt_model

    init_distributed()
    ps.initialize_model_parallel(tensor_model_parallel_size=1)
    cfg = config_from_dict({"model": {"num_layers": 2, "hidden_size": 32,
                                      "num_attention_heads": 4, "tie_embeddings": False}})

    def build():
        torch.manual_seed(3)
        return build_gpt_model(cfg.model, cfg.attention, vocab_size=96)

    yield build
    ps.destroy_model_parallel()
    dist.destroy_process_group()


def _loss_and_grads(model, tokens, labels):
    from megatron_ext.layers.forward import gpt_forward

    loss = gpt_forward(model, tokens, labels=labels)
    loss.sum().backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}


def test_model_chunked_loss_equals_own_loss(tiny_model) -> None:
    tokens = torch.randint(0, 96, (2, 24), generator=torch.Generator().manual_seed(0))
    labels = torch.roll(tokens, -1, 1)
    ref, ref_g = _loss_and_grads(tiny_model(), tokens, labels)
    model = enable_chunked_loss(tiny_model(), 7)
    out, g = _loss_and_grads(model, tokens, labels)
    assert out.shape == (2, 24)
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-5)
    for name in ref_g:
        torch.testing.assert_close(g[name], ref_g[name], rtol=1e-4, atol=1e-6, msg=name)
    # without labels the model still returns logits
    from megatron_ext.layers.forward import gpt_forward

    assert gpt_forward(model, tokens).shape == (2, 24, 96)


@pytest.mark.parametrize("mode", ["selective", "full"])
def test_activation_checkpointing_is_exact(tiny_model, mode: str) -> None:
    tokens = torch.randint(0, 96, (2, 24), generator=torch.Generator().manual_seed(0))
    labels = torch.roll(tokens, -1, 1)
    ref, ref_g = _loss_and_grads(tiny_model(), tokens, labels)
    model = tiny_model()
    assert apply_activation_checkpointing(model, mode) == 2
    out, g = _loss_and_grads(model, tokens, labels)
    assert torch.equal(out, ref)
    for name in ref_g:
        assert torch.equal(g[name], ref_g[name]), name
