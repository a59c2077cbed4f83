"""Expert parallelism for one rank: process-group context, all-to-all dispatchers (flat and
hierarchical), traffic counters, gradient reduction for data-parallel dense parameters and
replicated experts, expert migration.

Knows torch.distributed, not Ray: the cluster layer creates the process group and hands the
rank a :class:`ParallelContext`.
"""

from moetrain.parallel.context import ParallelContext, init_distributed
from moetrain.parallel.dispatcher import AllToAllDispatcher, EPDispatchMeta
from moetrain.parallel.hierarchical import HierarchicalDispatcher

__all__ = ["ParallelContext", "init_distributed", "AllToAllDispatcher", "EPDispatchMeta", "HierarchicalDispatcher"]
