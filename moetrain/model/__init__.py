"""The decoder-only MoE transformer (single rank) and its MoE building blocks."""

from moetrain.model.moe.dispatcher import DispatchMeta, Dispatcher, LocalDispatcher
from moetrain.model.moe.experts import GroupedExperts
from moetrain.model.moe.layer import MoELayer
from moetrain.model.moe.router import RouterOutput, TopKRouter
from moetrain.model.transformer import Transformer, count_moe_blocks

__all__ = [
    "Transformer",
    "count_moe_blocks",
    "RouterOutput",
    "TopKRouter",
    "MoELayer",
    "GroupedExperts",
    "Dispatcher",
    "DispatchMeta",
    "LocalDispatcher",
]
