"""Host synchronisations of a whole ``RankTrainer.train_step``, counted on CPU and pinned.

On an accelerator the host waits for the device whenever it reads a value the device computed:
``.item()`` / ``float()`` / ``int()`` / ``bool()`` of a tensor (``aten._local_scalar_dense``),
``.tolist()``, ``.cpu()`` (device -> host copy), and every op whose output size depends on the
data (``nonzero``, ``unique``, ``masked_select``, boolean-mask indexing) or that reads the data to
size its output (``bincount``: its CUDA kernel reads ``min()`` and ``max()`` first). On this CPU none of them
costs anything, so :class:`SyncCounter` records them instead: a ``TorchDispatchMode`` sees every
aten op (including those of autograd's backward, which runs on this thread), and ``tolist`` /
``cpu`` / ``numpy``, which bypass the dispatcher, are patched while it is installed.

The pinned figure for a step of A micro-batches over a model with L MoE layers, on 2 gloo ranks
with capacity dropping on, both for flat all-to-all dispatch with the global load-balancing scope
and for hierarchical dispatch over two nodes with the micro scope:
- A * L ``Tensor.tolist``: each MoE layer forward reads its split sizes once (the dispatcher);
- 1 ``Tensor.tolist``: the step's single scalar read — losses, off-rank sends, traffic bytes and
  the step's expert counts all-reduced in one vector and read at once;
- 1 ``aten._local_scalar_dense``: the global gradient norm (``float(norm)``: decides whether the
  update is applied and is reported).
Nothing per micro-batch outside the dispatchers: the routing statistics keep counts and their id
sample on the device, the balancer and the statistics share one per-expert count, and the
off-rank sends come from the dispatch metadata.
"""

from __future__ import annotations

import collections
import copy

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from moetrain.config import from_dict
from tests.gloo import run_gloo
from tests.parallel.ep_runs import tiny_cfg

SYNC_OPS = ("aten._local_scalar_dense", "aten.nonzero.", "aten._unique2", "aten.unique_dim",
            "aten.unique_consecutive", "aten.masked_select", "aten.bincount")
PATCHED = ("tolist", "cpu", "numpy")  # Tensor methods that read to the host outside the dispatcher


class SyncCounter(TorchDispatchMode):
    """Records every host read (see the module doc) while installed: ``syncs`` in call order.
    A ``.numpy()`` straight on the result of ``.cpu()`` is the same read and is not counted twice."""

    def __init__(self):
        super().__init__()
        self.syncs: list[str] = []
        self._real = {}
        self._last_cpu = None

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = str(func)
        bool_index = name.startswith("aten.index.Tensor") and any(
            i is not None and i.dtype == torch.bool for i in args[1])
        if bool_index or any(name.startswith(op) for op in SYNC_OPS):
            self.syncs.append(name)
        return func(*args, **(kwargs or {}))

    def _patch(self, method: str):
        real = self._real[method] = getattr(torch.Tensor, method)
        counter = self

        def counted(t, *args, **kwargs):
            out = real(t, *args, **kwargs)
            if method == "numpy" and t is counter._last_cpu:
                return out
            counter.syncs.append(f"Tensor.{method}")
            if method == "cpu":
                counter._last_cpu = out
            return out
        setattr(torch.Tensor, method, counted)

    def __enter__(self):
        for m in PATCHED:
            self._patch(m)
        return super().__enter__()

    def __exit__(self, *exc):
        for m, real in self._real.items():
            setattr(torch.Tensor, m, real)
        self._last_cpu = None
        return super().__exit__(*exc)


def test_counter_sees_each_kind_of_host_read():
    x = torch.arange(6.0)
    real = {m: getattr(torch.Tensor, m) for m in PATCHED}
    with SyncCounter() as c:
        x.sum().item()
        x.tolist()
        x.cpu().numpy()  # one read
        x[x > 2]
        torch.bincount(x.long())
        (x * 2).exp()  # no read
    assert c.syncs == ["aten._local_scalar_dense.default", "Tensor.tolist", "Tensor.cpu",
                       "aten.index.Tensor", "aten.bincount.default"]
    assert all(getattr(torch.Tensor, m) is f for m, f in real.items())  # patches removed
    assert x.tolist() == [0.0, 1.0, 2.0, 3.0, 4.0, 5.0]


def _step_syncs(ctx, cfg_dicts: list[dict]) -> list[tuple[list[str], int, int, str]]:
    import dataclasses

    from moetrain.train.trainer import RankTrainer

    out = []
    for cfg_dict in cfg_dicts:
        hier = cfg_dict["model"]["moe"].get("dispatch") == "hierarchical"
        trainer = RankTrainer(from_dict(cfg_dict), ctx=dataclasses.replace(ctx, node_R=(0, 1)) if hier else ctx)
        trainer.train_step()  # warm-up outside the counter (lazy inits, caches)
        with SyncCounter() as counter:
            trainer.train_step()
        out.append((counter.syncs, len(trainer.moe_layers), cfg_dict["train"]["grad_accum_steps"],
                    type(trainer.moe_layers[0].dispatcher).__name__))
    return out


@pytest.mark.slow
def test_train_step_host_syncs_are_pinned(tmp_path):
    flat = tiny_cfg(str(tmp_path), 2)
    flat["model"]["moe"]["capacity_factor"] = 1.0
    hier = copy.deepcopy(flat)
    hier["model"]["moe"]["dispatch"] = "hierarchical"
    hier["train"]["loss"]["lbl_scope"] = "micro"
    for rank, runs in enumerate(run_gloo(_step_syncs, 2, [flat, hier])):
        assert [name for *_, name in runs] == ["AllToAllDispatcher", "HierarchicalDispatcher"]
        for syncs, L, A, name in runs:
            got = collections.Counter(syncs)
            want = collections.Counter({"Tensor.tolist": A * L + 1, "aten._local_scalar_dense.default": 1})
            assert got == want, f"rank {rank} {name}: host syncs of one train_step {syncs}"
