"""One run name, one lineage: every manifest records its run id; a new run refuses to write next to
an earlier run's checkpoints (unless told to overwrite them); retention deletes only its own
lineage's checkpoints."""

from __future__ import annotations

import pytest
import torch

from cluster.checkpointing import lineage_of, retain_lineage
from moetrain.checkpoint import AsyncCheckpointWriter, CheckpointError, commit, list_checkpoints, open_store


def _commit(store, run: str, step: int, run_id: str) -> None:
    with AsyncCheckpointWriter(store, run, async_upload=False) as w:
        result = w.save(step, {"x.pt": {"t": torch.full((2,), float(step))}}).result()
    commit(store, run, step, [result], {"step": step, "run_id": run_id})


def test_retention_touches_only_its_own_lineage(tmp_path):
    store = open_store(str(tmp_path))
    for step in (1, 2, 3):
        _commit(store, "r", step, "old")
    for step in (4, 5, 6):
        _commit(store, "r", step, "new")
    deleted = retain_lineage(store, "r", keep=1, run_id="new")
    assert deleted == [4, 5]
    left = {i.step: lineage_of(store, "r", i.step) for i in list_checkpoints(store, "r") if i.committed}
    assert left == {1: "old", 2: "old", 3: "old", 6: "new"}


@pytest.mark.ray
@pytest.mark.slow
def test_a_second_run_of_a_name_is_refused_unless_it_overwrites(tmp_path, ray_local):
    from cluster.api import run
    from moetrain.config import from_dict

    def cfg(**checkpoint):
        return from_dict({
            "model": {"dim": 32, "n_layers": 2, "n_heads": 2, "ffn_dim": 64, "max_seq_len": 32,
                      "moe": {"num_experts": 4, "top_k": 2, "expert_ffn_dim": 32}},
            "data": {"seq_len": 32, "vocab_size": 300, "max_bytes_per_domain": 150_000},
            "train": {"steps": 4, "global_batch_size": 8, "warmup_steps": 1, "eval_every": 0, "eval_batches": 1},
            "checkpoint": {"uri": str(tmp_path / "store"), "every": 2, "keep": 5, **checkpoint},
            "cluster": {"num_workers": 2, "run_name": "lin"},
            "logging": {"wandb": "disabled", "out_dir": str(tmp_path / "out")},
        })

    first = run(cfg())
    store = open_store(str(tmp_path / "store"))
    assert {lineage_of(store, "lin", s) for s in (2, 4)} == {first.summary["run_id"]}
    assert not store.exists("lin/lease.json")  # released when the run finished
    with pytest.raises(CheckpointError, match=r"already holds committed checkpoints of run 'lin' \(steps \.\.2, 4\)"):
        run(cfg())
    assert not store.exists("lin/lease.json")  # and when it was refused after taking the lease
    # a corrupted object of the step to resume: refused on the driver, naming the intact step 2
    obj = next(p for p in (tmp_path / "store" / "lin" / "step-4").rglob("*") if p.is_file() and p.name != "manifest.json")
    obj.write_bytes(b"x" + obj.read_bytes()[1:])
    with pytest.raises(CheckpointError, match=r"cannot resume from .*step-4: corrupt: .* the newest intact committed "
                                              r"step is .*/lin/step-2: resume from it with --resume"):
        run(cfg(resume="latest"))
    with pytest.raises(CheckpointError, match="after step 2, the step this run resumes from"):
        run(cfg(resume=str(tmp_path / "store" / "lin" / "step-2")))
    second = run(cfg(overwrite=True))
    assert second.summary["run_id"] != first.summary["run_id"]
    assert {lineage_of(store, "lin", s) for s in (2, 4)} == {second.summary["run_id"]}
    resumed = run(cfg(resume=str(tmp_path / "store" / "lin" / "step-2"), overwrite=True))
    assert resumed.summary["run_id"] == second.summary["run_id"]  # a resumed run continues its lineage
