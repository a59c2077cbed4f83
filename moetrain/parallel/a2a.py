"""Autograd all-to-alls with uneven splits: a blocking one, and an asynchronous start / wait pair
that lets compute run while the rows travel (forward and backward), plus the clock that measures
how long a rank sat blocked in them.

Owns: the collectives that move token rows. ``all_to_all`` blocks; ``start_all_to_all`` returns
an output buffer that is filled in the background and a :class:`Pending` that
``wait_all_to_all`` completes. The backward of the pair is the reverse pair: the wait's backward
*starts* the reverse all-to-all and the start's backward *waits* for it, so in backward too
the transfer of one chunk runs while autograd computes the others.

An optional ``tally`` (:class:`moetrain.parallel.traffic.LayerTally`) counts the bytes this rank
sends in every call, forward and backward, from the splits (no device work).

Every rank must issue the collectives in the same order. The forward does (same code, same
number of chunks on every rank); in backward, autograd runs ready nodes by creation order, and
every rank builds the same collective nodes in the same order, so the reverse collectives are
issued in the same order too (tests/parallel/test_chunked_dispatch.py checks 2 and 4 ranks).
"""

from __future__ import annotations

import time

import torch
import torch.distributed as dist


class CommClock:
    """Seconds this rank spent blocked in token all-to-alls: inside blocking ``all_to_all`` calls
    and inside ``wait`` of asynchronous ones (issuing a started one is counted as well). Only
    benchmarks pass one; the dispatcher works without."""

    def __init__(self) -> None:
        self.blocked_s = 0.0
        self.calls = 0

    def add(self, seconds: float) -> None:
        self.blocked_s += seconds
        self.calls += 1

    def reset(self) -> None:
        self.blocked_s, self.calls = 0.0, 0


def _timed_a2a(out, inp, out_splits, in_splits, group, clock, async_op=False, tally=None, backward=False):
    if tally is not None:  # bytes this rank sends, counted where they are sent
        tally.sent(inp, in_splits, backward=backward)
    t0 = time.perf_counter()
    work = dist.all_to_all_single(out, inp, out_splits, in_splits, group=group, async_op=async_op)
    if clock is not None:
        clock.add(time.perf_counter() - t0)
    return work


class _AllToAll(torch.autograd.Function):
    """``all_to_all_single`` with uneven splits whose backward is the reverse all-to-all."""

    @staticmethod
    def forward(ctx, x, out_splits: list[int], in_splits: list[int], group, clock, tally):
        ctx.splits, ctx.group, ctx.clock, ctx.tally = (out_splits, in_splits), group, clock, tally
        out = x.new_empty((sum(out_splits),) + tuple(x.shape[1:]))
        _timed_a2a(out, x.contiguous(), out_splits, in_splits, group, clock, tally=tally)
        return out

    @staticmethod
    def backward(ctx, grad_out):
        out_splits, in_splits = ctx.splits
        grad_in = grad_out.new_empty((sum(in_splits),) + tuple(grad_out.shape[1:]))
        _timed_a2a(
            grad_in, grad_out.contiguous(), in_splits, out_splits, ctx.group, ctx.clock, tally=ctx.tally, backward=True
        )
        return grad_in, None, None, None, None, None


def all_to_all(
    x: torch.Tensor, out_splits: list[int], in_splits: list[int], group=None, clock: CommClock | None = None, tally=None
) -> torch.Tensor:
    """Rows of ``x`` (``in_splits[r]`` to rank r) exchanged; returns ``sum(out_splits)`` rows.
    ``tally`` (a :class:`moetrain.parallel.traffic.LayerTally`) counts the bytes sent, forward
    and backward."""
    return _AllToAll.apply(x, out_splits, in_splits, group, clock, tally)


def all_to_all_ints(
    x: torch.Tensor, out_splits: list[int], in_splits: list[int], group=None, clock: CommClock | None = None, tally=None
) -> torch.Tensor:
    """Blocking, non-differentiable all-to-all (metadata)."""
    out = x.new_empty((sum(out_splits),) + tuple(x.shape[1:]))
    _timed_a2a(out, x.contiguous(), out_splits, in_splits, group, clock, tally=tally)
    return out


class Pending:
    """The in-flight collective of one start / wait pair: the forward's, then (set by the wait's
    backward) the reverse one. Keeps the send buffer alive until the transfer completes."""

    __slots__ = ("work", "send", "clock", "grad_in", "tally")

    def __init__(self, clock: CommClock | None, tally=None) -> None:
        self.work, self.send, self.clock, self.grad_in, self.tally = None, None, clock, None, tally

    def launch(self, out, inp, out_splits, in_splits, group, backward: bool = False) -> None:
        self.send = inp
        self.work = _timed_a2a(
            out, inp, out_splits, in_splits, group, self.clock, async_op=True, tally=self.tally, backward=backward
        )

    def wait(self) -> None:
        t0 = time.perf_counter()
        assert self.work is not None, "wait() without a started all-to-all"
        self.work.wait()
        if self.clock is not None:
            self.clock.add(time.perf_counter() - t0)
        self.work, self.send = None, None


class _StartAllToAll(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, out_splits, in_splits, group, pending: Pending):
        ctx.pending = pending
        out = x.new_empty((sum(out_splits),) + tuple(x.shape[1:]))
        pending.launch(out, x.contiguous(), out_splits, in_splits, group)
        return out

    @staticmethod
    def backward(ctx, _grad_out):
        ctx.pending.wait()  # the reverse transfer the wait's backward started
        grad_in, ctx.pending.grad_in = ctx.pending.grad_in, None
        return grad_in, None, None, None, None


class _WaitAllToAll(torch.autograd.Function):
    @staticmethod
    def forward(ctx, out, out_splits, in_splits, group, pending: Pending):
        ctx.splits, ctx.group, ctx.pending = (out_splits, in_splits), group, pending
        pending.wait()
        return out.view_as(out)

    @staticmethod
    def backward(ctx, grad_out):
        out_splits, in_splits = ctx.splits
        grad_in = grad_out.new_empty((sum(in_splits),) + tuple(grad_out.shape[1:]))
        ctx.pending.launch(grad_in, grad_out.contiguous(), in_splits, out_splits, ctx.group, backward=True)
        ctx.pending.grad_in = grad_in  # filled in the background; the start's backward returns it
        return grad_out, None, None, None, None


def start_all_to_all(
    x: torch.Tensor, out_splits: list[int], in_splits: list[int], group=None, clock: CommClock | None = None, tally=None
) -> tuple[torch.Tensor, Pending]:
    """Start the exchange of ``x``; the returned buffer is valid only after ``wait_all_to_all``."""
    pending = Pending(clock, tally)
    return _StartAllToAll.apply(x, out_splits, in_splits, group, pending), pending


def wait_all_to_all(
    out: torch.Tensor, pending: Pending, out_splits: list[int], in_splits: list[int], group=None
) -> torch.Tensor:
    """Complete a started exchange; returns the received rows (differentiable)."""
    return _WaitAllToAll.apply(out, out_splits, in_splits, group, pending)
