"""Dense softmax attention reference returning (out, lse): the spec every fast path must meet.

Masks follow docs/methods/conventions.md. Query row r sits at absolute position ``i = q_offset + r``
and sees key ``j`` (``0 <= j < Sk``) when all active rules hold:

- causal: ``j <= i``;
- sliding window W: ``i - W < j <= i`` (W keys including the query; requires causal);
- chunked-local c: ``floor(p_i / c) == floor(p_j / c)`` and ``j <= i`` (requires causal), with
  ``p`` the per-document position when ``doc_ids`` is given (document boundaries reset chunks);
- doc_ids: query and key lie in the same document.

Documents: ``doc_ids`` is [B, Sk]; a document is a maximal run of equal consecutive ids, so an id
that reappears after another id starts a new document. Query row r takes the document of key
column ``q_offset + r`` (with ``q_offset = Sk - Sq`` these are the last Sq entries).

With ``causal=True`` or ``doc_ids``, ``q_offset + Sq <= Sk`` is required; plain non-causal
attention accepts any Sq and Sk (cross attention, key shards, empty key sets).

``causal=False`` with ``window`` or ``chunk`` raises ValueError: both are defined as causal masks
here, and silently dropping either half of the mask is the bug class we want to exclude.

Numerics: logits, softmax and lse in fp32 (fp64 when the inputs are fp64); out is returned in the
input dtype, lse in the compute dtype. A row with no visible key gets out = 0 and lse = -inf;
gradients stay finite (no NaN) for such rows.
"""

from __future__ import annotations

import math

import torch

from megatron_ext.ops.documents import document_runs

__all__ = ["attention_mask", "attention_ref", "check_attn_args"]


def _is_int(x: object) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def check_attn_args(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    causal: bool,
    window: int | None,
    chunk: int | None,
    softmax_scale: float | None,
    q_offset: int,
    doc_ids: torch.Tensor | None,
) -> float:
    """Validate attention arguments (shared by every attention op) and return the softmax scale.

    Args:
        q: [B, Sq, H, D]; k, v: [B, Sk, Hkv, D]; other arguments as in ``attention_ref``.

    Returns:
        The softmax scale (``1/sqrt(D)`` when ``softmax_scale`` is None).

    Raises:
        ValueError: naming the offending value and what would be valid.
    """
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor) or t.dim() != 4:
            shape = tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__
            raise ValueError(f"{name}.shape={shape}; expected a 4-D tensor [B, S, H, D]")
        if not t.is_floating_point():
            raise ValueError(f"{name}.dtype={t.dtype}; expected a floating dtype")
    if not (q.dtype == k.dtype == v.dtype):
        raise ValueError(f"dtypes q={q.dtype}, k={k.dtype}, v={v.dtype}; expected all equal")
    B, Sq, H, D = q.shape
    if k.shape != v.shape:
        raise ValueError(f"k.shape={tuple(k.shape)} != v.shape={tuple(v.shape)}; expected equal")
    Bk, Sk, Hkv, Dk = k.shape
    if Bk != B:
        raise ValueError(f"batch sizes q={B}, k={Bk}; expected equal")
    if Dk != D:
        raise ValueError(f"head dims q D={D}, k/v D={Dk}; expected equal")
    if Hkv < 1 or H % Hkv:
        raise ValueError(f"H={H}, Hkv={Hkv}; expected H % Hkv == 0 (GQA groups)")
    if not _is_int(q_offset) or q_offset < 0:
        raise ValueError(f"q_offset={q_offset!r}; expected an int >= 0")
    if (causal or doc_ids is not None) and q_offset + Sq > Sk:
        raise ValueError(
            f"q_offset + Sq = {q_offset} + {Sq} > Sk = {Sk}; with causal=True or doc_ids the "
            "query positions must lie among the keys"
        )
    if window is not None and (not _is_int(window) or window < 1):
        raise ValueError(f"window={window!r}; expected None or an int >= 1")
    if chunk is not None and (not _is_int(chunk) or chunk < 1):
        raise ValueError(f"chunk={chunk!r}; expected None or an int >= 1")
    if not causal and (window is not None or chunk is not None):
        raise ValueError(
            f"causal=False with window={window}, chunk={chunk}; window and chunk masks are "
            "causal: pass causal=True"
        )
    if doc_ids is not None:
        if not isinstance(doc_ids, torch.Tensor) or doc_ids.shape != (B, Sk):
            shape = tuple(doc_ids.shape) if isinstance(doc_ids, torch.Tensor) else doc_ids
            raise ValueError(f"doc_ids.shape={shape}; expected [B, Sk] = [{B}, {Sk}]")
        if doc_ids.is_floating_point():
            raise ValueError(f"doc_ids.dtype={doc_ids.dtype}; expected an integer dtype")
    if softmax_scale is None:
        return 1.0 / math.sqrt(D) if D > 0 else 1.0
    if not math.isfinite(float(softmax_scale)):
        raise ValueError(f"softmax_scale={softmax_scale!r}; expected a finite float or None")
    return float(softmax_scale)


def attention_mask(
    sq: int,
    sk: int,
    *,
    causal: bool = True,
    window: int | None = None,
    chunk: int | None = None,
    q_offset: int = 0,
    doc_ids: torch.Tensor | None = None,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """Boolean visibility mask (True = key visible), built directly from the definitions.

    Args:
        sq, sk: query and key lengths.
        causal, window, chunk, q_offset, doc_ids: as in ``attention_ref``.
        device: device of the mask (default: that of doc_ids, else CPU).

    Returns:
        bool [B, Sq, Sk] (B = 1 when doc_ids is None).
    """
    if doc_ids is not None:
        device = doc_ids.device
    i = torch.arange(sq, device=device).view(-1, 1) + q_offset  # [Sq, 1] absolute query position
    j = torch.arange(sk, device=device).view(1, -1)  # [1, Sk]
    mask = torch.ones(1, sq, sk, dtype=torch.bool, device=device)
    if causal:
        mask &= j <= i
    if window is not None:
        mask &= j > i - window
    if doc_ids is not None:
        run, pos = document_runs(doc_ids)
        rows = slice(q_offset, q_offset + sq)
        mask = mask & (run[:, rows, None] == run[:, None, :])
        if chunk is not None:
            mask &= (pos[:, rows, None] // chunk) == (pos[:, None, :] // chunk)
    elif chunk is not None:
        mask &= (i // chunk) == (j // chunk)
    return mask


def attention_ref(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    causal: bool = True,
    window: int | None = None,
    chunk: int | None = None,
    softmax_scale: float | None = None,
    q_offset: int = 0,
    doc_ids: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Dense masked softmax attention (materialises [B, H, Sq, Sk]); differentiable.

    Args:
        q: [B, Sq, H, D].
        k, v: [B, Sk, Hkv, D]; query head h reads KV head ``h // (H // Hkv)``.
        causal: mask keys after the query position (bottom-right aligned when
            ``q_offset = Sk - Sq``).
        window: sliding window W (keys ``i-W < j <= i``); needs causal.
        chunk: chunked-local attention size c (Llama-4); needs causal.
        softmax_scale: logit multiplier, default ``1/sqrt(D)``.
        q_offset: absolute position of query row 0 among the keys.
        doc_ids: int [B, Sk] document ids (see module docstring).

    Returns:
        out [B, Sq, H, D] in q.dtype and lse [B, H, Sq] (fp32, or fp64 for fp64 inputs, natural
        log; -inf for rows with no visible key, whose out is 0).
    """
    scale = check_attn_args(
        q, k, v, causal=causal, window=window, chunk=chunk, softmax_scale=softmax_scale,
        q_offset=q_offset, doc_ids=doc_ids,
    )  # fmt: skip
    B, Sq, H, D = q.shape
    Sk, Hkv = k.shape[1], k.shape[2]
    cdt = torch.float64 if q.dtype == torch.float64 else torch.float32
    rep = H // Hkv
    qc = q.to(cdt).transpose(1, 2)  # [B, H, Sq, D]
    kc = k.to(cdt).repeat_interleave(rep, dim=2).transpose(1, 2)  # [B, H, Sk, D]
    vc = v.to(cdt).repeat_interleave(rep, dim=2).transpose(1, 2)
    logits = torch.matmul(qc, kc.transpose(-1, -2)) * scale  # [B, H, Sq, Sk]
    mask = attention_mask(
        Sq, Sk, causal=causal, window=window, chunk=chunk, q_offset=q_offset, doc_ids=doc_ids,
        device=q.device,
    ).unsqueeze(1)  # fmt: skip  # [B|1, 1, Sq, Sk]
    has_key = mask.any(-1, keepdim=True)  # [B|1, 1, Sq, 1]
    z = logits.masked_fill(~mask, float("-inf"))
    # Rows without keys get a finite dummy row so logsumexp and its gradient stay finite;
    # their results are overwritten below.
    z = torch.where(has_key, z, torch.zeros((), dtype=cdt, device=q.device))
    lse = torch.logsumexp(z, dim=-1, keepdim=True)
    p = torch.exp(z - lse) * has_key
    out = torch.matmul(p, vc).transpose(1, 2).to(q.dtype)  # [B, Sq, H, D]
    lse = lse.masked_fill(~has_key, float("-inf")).squeeze(-1)  # [B, H, Sq]
    return out, lse
