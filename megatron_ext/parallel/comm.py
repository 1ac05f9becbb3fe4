"""Communication for context parallelism: a ring of batched isend/irecv, autograd collectives
and a per-rank count of the bytes each call sends.

Every function takes the process group as an argument (None = the default group). The autograd
wrappers are documented "forward: X, backward: Y", as Megatron's tensor-parallel mappings are.
Bytes are the payload this rank hands to *other* ranks (its own part of a collective is not
counted), recorded under a key such as ``"ring.fwd"``; tests compare them with the analytic
volume of each plan (``bytes_sent``, ``reset_bytes_sent``).
"""

from __future__ import annotations

from collections import defaultdict

import torch
import torch.distributed as dist

__all__ = [
    "RingComm",
    "all_gather_cp",
    "all_to_all_cp",
    "bytes_sent",
    "gather_from_cp",
    "halo_exchange",
    "reset_bytes_sent",
]

_SENT: defaultdict[str, int] = defaultdict(int)


def reset_bytes_sent() -> None:
    """Zero every byte counter of this process."""
    _SENT.clear()


def bytes_sent(key: str | None = None) -> int | dict[str, int]:
    """Bytes this rank sent since the last reset.

    Args:
        key: None for a dict of every counter; a key ("ring.fwd") or a prefix ("ring") for the
            sum of the matching counters.
    """
    if key is None:
        return dict(_SENT)
    return sum(n for k, n in _SENT.items() if k == key or k.startswith(key + "."))


def _record(key: str, nbytes: int) -> None:
    _SENT[key] += int(nbytes)


def _nbytes(x: torch.Tensor) -> int:
    return x.numel() * x.element_size()


def _peer(group: dist.ProcessGroup | None, rank: int) -> int:
    """Global rank of group rank ``rank`` (P2P ops address global ranks)."""
    return rank if group is None else dist.get_global_rank(group, rank)


class RingComm:
    """Send to the next rank and receive from the previous one, asynchronously.

    ``send_recv`` posts one batched isend/irecv pair and returns the receive buffer with the
    pending requests; ``wait`` completes them. Overlap compute with a transfer by calling
    ``send_recv`` before and ``wait`` after the compute. Distinct ``tag`` values keep
    concurrent streams (K/V and dK/dV) apart.
    """

    def __init__(self, group: dist.ProcessGroup | None) -> None:
        self.group = group
        self.rank = dist.get_rank(group)
        self.world_size = dist.get_world_size(group)
        self.next = _peer(group, (self.rank + 1) % self.world_size)
        self.prev = _peer(group, (self.rank - 1) % self.world_size)

    def send_recv(self, x: torch.Tensor, *, key: str, tag: int = 0):
        """Post: send x to the next rank, receive a tensor like x from the previous one."""
        x = x.contiguous()
        buf = torch.empty_like(x)
        ops = [
            dist.P2POp(dist.isend, x, self.next, self.group, tag),
            dist.P2POp(dist.irecv, buf, self.prev, self.group, tag),
        ]
        _record(key, _nbytes(x))
        return buf, dist.batch_isend_irecv(ops)

    @staticmethod
    def wait(pending) -> torch.Tensor:
        """Complete a ``send_recv`` and return its receive buffer."""
        buf, reqs = pending
        for req in reqs:
            req.wait()
        return buf


class _GatherFromCP(torch.autograd.Function):
    """forward: all-gather; backward: keep this rank's slice (the global grad is replicated)."""

    @staticmethod
    def forward(ctx, x, group, key):
        ctx.rank = dist.get_rank(group)
        parts = [torch.empty_like(x) for _ in range(dist.get_world_size(group))]
        dist.all_gather(parts, x.contiguous(), group=group)
        _record(key, (len(parts) - 1) * _nbytes(x))
        return torch.stack(parts)

    @staticmethod
    def backward(ctx, g):
        return g[ctx.rank], None, None


def gather_from_cp(
    x: torch.Tensor, group: dist.ProcessGroup | None, key: str = "unshard"
) -> torch.Tensor:
    """Stack every rank's x: [P, *x.shape]. forward: all-gather; backward: split.

    The backward returns this rank's slice of the incoming gradient unchanged, which is right
    when every rank computes the same function of the gathered tensor (a replicated loss).
    """
    return _GatherFromCP.apply(x, group, key)


class _AllGatherCP(torch.autograd.Function):
    """forward: all-gather; backward: reduce-scatter (sum of every rank's gradient, in fp32)."""

    @staticmethod
    def forward(ctx, x, group, key):
        ctx.group, ctx.key = group, key
        parts = [torch.empty_like(x) for _ in range(dist.get_world_size(group))]
        dist.all_gather(parts, x.contiguous(), group=group)
        _record(key + ".fwd", (len(parts) - 1) * _nbytes(x))
        return torch.stack(parts)

    @staticmethod
    def backward(ctx, g):
        acc = torch.float64 if g.dtype == torch.float64 else torch.float32
        chunks = [c.contiguous() for c in g.to(acc).unbind(0)]
        out = torch.empty_like(chunks[0])
        dist.reduce_scatter(out, chunks, group=ctx.group)
        _record(ctx.key + ".bwd", (len(chunks) - 1) * _nbytes(out))
        return out.to(g.dtype), None, None


def all_gather_cp(x: torch.Tensor, group: dist.ProcessGroup | None, key: str) -> torch.Tensor:
    """Every rank's x stacked: [P, *x.shape]. forward: all-gather; backward: reduce-scatter.

    The gradient of each rank's slice is summed over all ranks (every rank used every slice)
    in fp32 (fp64 for fp64) and returned to the owner.
    """
    return _AllGatherCP.apply(x, group, key)


class _AllToAllCP(torch.autograd.Function):
    """forward: all-to-all of dim-0 chunks; backward: the same all-to-all (it is self-adjoint)."""

    @staticmethod
    def forward(ctx, x, group, key):
        ctx.group, ctx.key = group, key
        return _a2a(x, group, key + ".fwd")

    @staticmethod
    def backward(ctx, g):
        return _a2a(g, ctx.group, ctx.key + ".bwd"), None, None


def _a2a(x: torch.Tensor, group, key: str) -> torch.Tensor:
    x = x.contiguous()
    out = torch.empty_like(x)
    dist.all_to_all_single(out, x, group=group)
    P = x.shape[0]
    _record(key, (P - 1) * _nbytes(x) // P)
    return out


def all_to_all_cp(x: torch.Tensor, group: dist.ProcessGroup | None, key: str) -> torch.Tensor:
    """x [P, ...]: chunk j goes to rank j; result [P, ...]: chunk i came from rank i.

    forward: all-to-all; backward: the same all-to-all on the gradient.
    """
    if x.shape[0] != dist.get_world_size(group):
        raise ValueError(f"x.shape[0]={x.shape[0]}; expected the group size")
    return _AllToAllCP.apply(x, group, key)


def _exchange(x: torch.Tensor, send: dict, recv: dict, group, key: str, tag: int):
    """Send rows x[send[p]] to every peer p; receive recv[p] rows from each; in peer order."""
    ops, bufs = [], []
    for p in sorted(send):
        rows = x[send[p]].contiguous()
        ops.append(dist.P2POp(dist.isend, rows, _peer(group, p), group, tag))
        _record(key, _nbytes(rows))
    for p in sorted(recv):
        bufs.append(x.new_empty(recv[p], *x.shape[1:]))
        ops.append(dist.P2POp(dist.irecv, bufs[-1], _peer(group, p), group, tag))
    if ops:
        for req in dist.batch_isend_irecv(ops):
            req.wait()
    return torch.cat(bufs) if bufs else x.new_zeros(0, *x.shape[1:])


class _HaloExchange(torch.autograd.Function):
    """forward: send chosen rows to peers; backward: return their gradients, summed at the owner."""

    @staticmethod
    def forward(ctx, x, send, recv, group, key):
        ctx.send, ctx.recv, ctx.group, ctx.key, ctx.shape = send, recv, group, key, x.shape
        return _exchange(x, send, recv, group, key + ".fwd", tag=3)

    @staticmethod
    def backward(ctx, g):
        g = g.contiguous()
        # Reverse roles: what was received goes back (in peer order), what was sent comes home.
        back, offset = {}, 0
        for p in sorted(ctx.recv):
            back[p] = torch.arange(offset, offset + ctx.recv[p], device=g.device)
            offset += ctx.recv[p]
        counts = {p: int(idx.numel()) for p, idx in ctx.send.items()}
        got = _exchange(g, back, counts, ctx.group, ctx.key + ".bwd", tag=4)
        dx = torch.zeros(ctx.shape, dtype=g.dtype, device=g.device)
        if got.shape[0]:
            dx.index_add_(0, torch.cat([ctx.send[p] for p in sorted(ctx.send)]), got)
        return dx, None, None, None, None


def halo_exchange(
    x: torch.Tensor,
    send: dict[int, torch.Tensor],
    recv: dict[int, int],
    group: dist.ProcessGroup | None,
    key: str = "halo",
) -> torch.Tensor:
    """Point-to-point exchange of rows of x [N, ...] with a few peers.

    Args:
        x: [N, ...] rows this rank owns.
        send: peer rank -> int64 row indices of x to send to it (empty peers omitted).
        recv: peer rank -> number of rows to receive from it. Both sides must agree (each
            rank derives them from the same global layout).
        group: the process group.
        key: byte counter prefix.

    Returns:
        [sum(recv.values()), ...], the received rows in increasing peer order.
        forward: isend/irecv; backward: the received rows' gradients go back to their owners
        and are added into dx.
    """
    return _HaloExchange.apply(x, send, recv, group, key)
