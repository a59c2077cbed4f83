"""moetrain.data: corpus, byte-level BPE tokenizer, packed sequences, data cursor.

Public API::

    ds = build_dataset(cfg.data)             # PackedDataset: .train / .val Splits, .tokenizer, ...
    cursor = BatchCursor(len(ds.train), cfg.train.global_batch_size, seed=cfg.train.seed)
    batch_BT1 = ds.train.tokens_NT1[cursor.next_indices()]
    micro = shard_global_batch(batch_BT1, num_micro, world_size, rank)   # list of [b, T1]
    for x_BT1 in val_batches(ds.val, "code", batch_size=8, max_batches=4): ...

Shapes: ``N`` rows, ``B`` rows per batch, ``T1`` = ``seq_len + 1`` tokens per row.
"""

from moetrain.data.corpus import Corpus, load_corpus
from moetrain.data.cursor import BatchCursor, shard_global_batch
from moetrain.data.dataset import PackedDataset, Split, build_dataset, val_batches
from moetrain.data.errors import DataError

__all__ = [
    "BatchCursor",
    "Corpus",
    "DataError",
    "PackedDataset",
    "Split",
    "build_dataset",
    "load_corpus",
    "shard_global_batch",
    "val_batches",
]
