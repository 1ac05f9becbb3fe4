"""LongHeads chunk summaries and per-head chunk selection (vectorised, memory bounded).

Follows README.md in this folder. Two pieces used by prefill (``interface.py``) and, later, by
decode with a KV cache and by context parallelism:

- ``longheads_chunk_summaries``: one attention-pooled key r_c per query head per complete chunk;
- ``longheads_select``: the K chunk indices each (query head, query) attends to, sorted.

Also the argument checks shared by the fast path and the reference.
"""

from __future__ import annotations

import math

import torch

from megatron_ext.ops.rope import apply_rope

__all__ = [
    "check_longheads_args",
    "compute_dtype",
    "longheads_chunk_summaries",
    "longheads_select",
]

SELECTIONS = ("head", "group")
# Largest intermediate (in elements) one chunk block of the summaries may build.
_SUMMARY_BUDGET = 1 << 24


def compute_dtype(x: torch.Tensor) -> torch.dtype:
    """fp64 stays fp64 (so fp64 checks reach 1e-10); every other dtype computes in fp32."""
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def _check_qkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
    for name, x in (("q", q), ("k", k), ("v", v)):
        if not isinstance(x, torch.Tensor) or x.dim() != 4 or not x.is_floating_point():
            got = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
            raise ValueError(f"{name} {got}; expected a floating tensor [B, S, heads, D]")
    if k.shape != v.shape:
        raise ValueError(f"k.shape={tuple(k.shape)} != v.shape={tuple(v.shape)}; expected equal")
    B, S, H, D = q.shape
    if (k.shape[0], k.shape[1], k.shape[3]) != (B, S, D):
        raise ValueError(
            f"k.shape={tuple(k.shape)}; expected [{B}, {S}, Hkv, {D}] to match q.shape="
            f"{tuple(q.shape)}"
        )
    Hkv = k.shape[2]
    if Hkv < 1 or H % Hkv:
        raise ValueError(f"H={H}, Hkv={Hkv}; expected H % Hkv == 0 (GQA)")
    if D < 2 or D % 2:
        raise ValueError(f"head dim D={D}; expected an even D >= 2 (RoPE on the full head dim)")


def _check_chunking(chunk_len: int, num_chunks: int) -> None:
    if not isinstance(chunk_len, int) or chunk_len < 1:
        raise ValueError(f"chunk_len={chunk_len!r}; expected an int >= 1")
    if not isinstance(num_chunks, int) or num_chunks < 3:
        raise ValueError(
            f"num_chunks={num_chunks!r}; expected an int >= 3 (chunks 0, a-1 and a are forced)"
        )


def _check_selection(selection: str) -> None:
    if selection not in SELECTIONS:
        raise ValueError(f"selection={selection!r}; expected one of {SELECTIONS}")


def check_longheads_args(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    chunk_len: int,
    num_chunks: int,
    begin_selective_length: int | None,
    selection: str,
) -> int:
    """Validate the arguments of a LongHeads prefill and resolve begin_selective_length.

    Valid ``begin_selective_length`` values are ints >= (num_chunks - 1) * chunk_len: a query in
    chunk a needs a + 1 >= num_chunks chunks to choose from. Any value in
    [(num_chunks - 1) * chunk_len, num_chunks * chunk_len] gives the same output, because a query
    of chunk num_chunks - 1 selects every chunk and keeps its original positions.

    Returns:
        The resolved begin_selective_length (default num_chunks * chunk_len).
    """
    _check_qkv(q, k, v)
    _check_chunking(chunk_len, num_chunks)
    _check_selection(selection)
    lo = (num_chunks - 1) * chunk_len
    if begin_selective_length is None:
        return num_chunks * chunk_len
    if not isinstance(begin_selective_length, int) or begin_selective_length < lo:
        raise ValueError(
            f"begin_selective_length={begin_selective_length!r}; expected an int >= "
            f"(num_chunks - 1) * chunk_len = {lo} (a query needs num_chunks chunks to choose from)"
        )
    return begin_selective_length


def summaries_from_local(
    q_loc: torch.Tensor, k_loc: torch.Tensor, v: torch.Tensor, chunk_len: int, scale: float
) -> torch.Tensor:
    """Summaries from q, k already rotated at chunk-local positions (all in the compute dtype).

    Args:
        q_loc: [B, S, H, D], R_{i mod w} q_i.
        k_loc: [B, S, Hkv, D], R_{i mod w} k_i.
        v: [B, S, Hkv, D].
        chunk_len: w.
        scale: softmax scale of the in-chunk attention and of the pooling.

    Returns:
        r: [B, S // w, H, D]; a trailing partial chunk gets no summary.
    """
    B, S, H, D = q_loc.shape
    Hkv = k_loc.shape[2]
    n_rep, w = H // Hkv, chunk_len
    nc = S // w
    r = torch.empty(B, nc, H, D, dtype=q_loc.dtype, device=q_loc.device)
    step = max(1, _SUMMARY_BUDGET // max(1, B * H * w * w))
    for c0 in range(0, nc, step):
        c1 = min(nc, c0 + step)
        rows = slice(c0 * w, c1 * w)
        qc = q_loc[:, rows].reshape(B, c1 - c0, w, Hkv, n_rep, D)
        kc = k_loc[:, rows].reshape(B, c1 - c0, w, Hkv, D)
        vc = v[:, rows].reshape(B, c1 - c0, w, Hkv, D)
        # Non-causal attention inside each chunk: [B, c, g, rep, w_q, w_k].
        z = torch.einsum("bcigrd,bcjgd->bcgrij", qc, kc) * scale
        o = torch.einsum("bcgrij,bcjgd->bcgrid", torch.softmax(z, dim=-1), vc)
        s = o.mean(dim=-2)  # [B, c, g, rep, D], a value-space vector per chunk and head
        alpha = torch.softmax(torch.einsum("bcgrd,bcjgd->bcgrj", s, kc) * scale, dim=-1)
        r[:, c0:c1] = torch.einsum("bcgrj,bcjgd->bcgrd", alpha, kc).reshape(B, c1 - c0, H, D)
    return r


def longheads_chunk_summaries(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    chunk_len: int = 256,
    theta: float = 10000.0,
    softmax_scale: float | None = None,
) -> torch.Tensor:
    """Attention-pooled key r_c of every complete chunk, per query head (README.md).

    For chunk c = tokens [c*w, (c+1)*w) and query head h (KV head g = h // (H // Hkv)): rotate
    q, k at chunk-local positions i mod w, attend non-causally inside the chunk, average the
    outputs into s_c, then r_c = sum_i softmax_i(<s_c, k~_i> * scale) k~_i. Only tokens of chunk c
    enter r_c, so a summary never depends on later chunks.

    Args:
        q: un-rotated queries [B, S, H, D].
        k: un-rotated keys [B, S, Hkv, D].
        v: values [B, S, Hkv, D].
        chunk_len: w.
        theta: RoPE base.
        softmax_scale: scale of the in-chunk attention and of the pooling; default 1/sqrt(D).

    Returns:
        r: [B, S // w, H, D] in fp32 (fp64 for fp64 inputs).
    """
    _check_qkv(q, k, v)
    _check_chunking(chunk_len, 3)
    cd = compute_dtype(q)
    scale = softmax_scale if softmax_scale is not None else 1.0 / math.sqrt(q.shape[-1])
    loc = torch.arange(q.shape[1], device=q.device) % chunk_len
    q_loc = apply_rope(q.to(cd), loc, theta=theta)
    k_loc = apply_rope(k.to(cd), loc, theta=theta)
    return summaries_from_local(q_loc, k_loc, v.to(cd), chunk_len, scale)


def _chunk_of(positions: torch.Tensor, batch: int, n: int, chunk_len: int) -> torch.Tensor:
    if positions.dtype.is_floating_point or positions.dim() not in (1, 2):
        raise ValueError(
            f"positions dtype={positions.dtype}, shape={tuple(positions.shape)}; expected an "
            f"integer tensor [{n}] or [{batch}, {n}]"
        )
    if positions.shape[-1] != n or (positions.dim() == 2 and positions.shape[0] not in (1, batch)):
        raise ValueError(
            f"positions.shape={tuple(positions.shape)}; expected [{n}] or [{batch}, {n}]"
        )
    return (positions.reshape(-1, n) // chunk_len).long()  # [1 or B, n]


def longheads_select(
    q: torch.Tensor,
    summaries: torch.Tensor,
    positions: torch.Tensor,
    *,
    chunk_len: int = 256,
    num_chunks: int = 16,
    selection: str = "head",
    num_kv_heads: int | None = None,
) -> torch.Tensor:
    """Chunks each query attends to: 0, a-1, a and the top-(K-3) of {1..a-2} (README.md).

    score_c = <q_p, r_c> with the raw (un-rotated, unscaled) query; ties go to the lower chunk
    index. ``selection="group"`` scores with the mean over the heads of a KV group, so the heads
    of a group share one selection.

    Args:
        q: un-rotated queries [B, n, H, D] of the rows to select for.
        summaries: r_c [B, NC, H, D] from ``longheads_chunk_summaries``; needs NC >= a - 1.
        positions: int [n] or [B, n], absolute positions p of the rows; each needs
            a = p // chunk_len >= num_chunks - 1.
        chunk_len: w.
        num_chunks: K (>= 3).
        selection: "head" (one selection per query head) or "group" (per KV group).
        num_kv_heads: Hkv; required by selection="group" (head h is in group h // (H // Hkv)).

    Returns:
        int64 [B, H, n, K], ascending chunk indices per row; the last one is a.
    """
    _check_chunking(chunk_len, num_chunks)
    _check_selection(selection)
    B, n, H, D = q.shape
    if summaries.dim() != 4 or (summaries.shape[0], summaries.shape[2:]) != (B, (H, D)):
        raise ValueError(
            f"summaries.shape={tuple(summaries.shape)}; expected [{B}, NC, {H}, {D}] for q.shape="
            f"{tuple(q.shape)}"
        )
    a = _chunk_of(positions.to(q.device), B, n, chunk_len)
    K, nc = num_chunks, summaries.shape[1]
    if n and (int(a.min()) < K - 1 or int(a.max()) - 1 > nc):
        raise ValueError(
            f"positions span chunks {int(a.min())}..{int(a.max())}; expected chunks >= "
            f"num_chunks - 1 = {K - 1} and <= NC + 1 = {nc + 1} (summaries hold {nc} chunks)"
        )
    cd = summaries.dtype
    scores = torch.einsum("bnhd,bchd->bhnc", q.to(cd), summaries)  # [B, H, n, NC]
    if selection == "group":
        if not isinstance(num_kv_heads, int) or num_kv_heads < 1 or H % num_kv_heads:
            raise ValueError(
                f"num_kv_heads={num_kv_heads!r}; selection='group' needs the KV head count, a "
                f"divisor of H={H}"
            )
        grouped = scores.reshape(B, num_kv_heads, H // num_kv_heads, n, nc).mean(dim=2)
        scores = grouped.repeat_interleave(H // num_kv_heads, dim=1)
    forced = torch.stack((torch.zeros_like(a), a - 1, a), dim=-1)  # [1 or B, n, 3]
    forced = forced.unsqueeze(1).expand(B, H, n, 3)
    if K == 3:
        return forced.contiguous()
    c = torch.arange(nc, device=q.device)
    free_ok = (c >= 1) & (c <= (a - 2).unsqueeze(-1))  # [1 or B, n, NC]
    scores = scores.masked_fill(~free_ok.unsqueeze(1), float("-inf"))
    # Stable descending sort keeps the lower index first among equal scores.
    free = torch.sort(scores, dim=-1, descending=True, stable=True).indices[..., : K - 3]
    return torch.sort(torch.cat((forced, free), dim=-1), dim=-1).values
