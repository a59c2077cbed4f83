"""Config loading and validation: every error names the field and the bad value."""

import pytest

from moetrain.config import ConfigError, RunConfig, apply_overrides, load_config


def test_shipped_default_loads_and_validates():
    cfg = load_config()
    assert isinstance(cfg, RunConfig)
    assert cfg.model.moe.top_k <= cfg.model.moe.num_experts
    assert load_config("small").cluster.num_workers == 4


def test_overrides_are_typed():
    cfg = load_config(None, ["train.steps=7", "model.moe.dedup=false", "train.lr=1e-3",
                             "data.paths=code=/a,prose=/b", "data.source=paths"])
    assert cfg.train.steps == 7 and cfg.model.moe.dedup is False and cfg.train.lr == 1e-3
    assert cfg.data.paths == ["code=/a", "prose=/b"]


@pytest.mark.parametrize("overrides,needle", [
    (["model.moe.top_k=9"], "model.moe.top_k (9) must be <= model.moe.num_experts (8)"),
    (["model.moe.num_groups=3"], "model.moe.num_groups (3) must divide model.moe.num_experts (8)"),
    (["model.moe.num_groups=4", "model.moe.top_k=2"], "model.moe.num_groups (4) must divide model.moe.top_k (2)"),
    (["model.dim=130"], "model.dim (130) must be divisible by model.n_heads (4)"),
    (["train.loss.lbl_scope=batch"], "train.loss.lbl_scope ('batch') must be one of micro, global, sequence"),
    (["train.global_batch_size=10", "cluster.num_workers=4"], "train.global_batch_size (10) must be divisible"),
    (["cluster.num_workers=3", "train.global_batch_size=12"], "model.moe.num_experts (8) must be divisible by cluster.num_workers (3)"),
    (["train.steps=abc"], "train.steps must be an integer, got 'abc'"),
    (["model.moe.renormalize=maybe"], "model.moe.renormalize must be true or false"),
    (["model.moe.experts=4"], "unknown config key 'model.moe.experts'"),
    (["data.source=paths"], "data.paths is empty"),
    (["logging.wandb=cloud"], "logging.wandb ('cloud') must be offline, online or disabled"),
    (["data.seq_len=512"], "data.seq_len (512) must be <= model.max_seq_len (128)"),
    # values that used to be accepted (issue: failures must be loud)
    (["model.norm_eps=-1e-5"], "model.norm_eps (-1e-05) must be in (0, 1)"),
    (["model.init_std=nan"], "model.init_std (nan) must be a finite number"),
    (["train.weight_decay=-0.1"], "train.weight_decay (-0.1) must be in [0, inf)"),
    (["train.beta1=2"], "train.beta1 (2.0) must be in [0, 1)"),
    (["train.eval_batches=0"], "train.eval_batches (0) must be in [1, inf)"),
    (["train.log_every=0"], "train.log_every (0) must be in [1, inf)"),
    (["train.lr=inf"], "train.lr (inf) must be a finite number"),
    (["cluster.torch_threads=-1"], "cluster.torch_threads (-1) must be in [0, inf)"),
    (["cluster.step_timeout_s=0"], "cluster.step_timeout_s (0.0) must be in (0, inf)"),
    (["cluster.node_wait_s=-1"], "cluster.node_wait_s (-1.0) must be in [0, inf)"),
    (["cluster.placement_strategy=pack"], "cluster.placement_strategy ('pack') must be one of PACK, SPREAD, STRICT_PACK"),
    (["model.moe.first_moe_layer=5"], "model.moe.first_moe_layer (5) must be < model.n_layers (2)"),
    (["cluster.address=bogus"], "cluster.address ('bogus') must be HOST:PORT"),
    (["cluster.run_name=.."], "cluster.run_name ('..') must be 1-128 letters"),
    (["cluster.run_name=my run"], "cluster.run_name ('my run') must be 1-128 letters"),
    (["placement.solver=greedy"], "config key 'placement.solver' was renamed 'placement.method'"),
    (["placement.method=annealing"], "placement.method ('annealing') must be one of ilp, local_search, greedy, validated"),
    (["placement.fault_domain=rack"], "placement.fault_domain ('rack') must be one of none, node, rank"),
    (["placement.val_fraction=1"], "placement.val_fraction (1.0) must be in [0, 1)"),
    (["placement.val_fraction=-0.1"], "placement.val_fraction (-0.1) must be in [0, 1)"),
])
def test_bad_values_name_the_field(overrides, needle):
    with pytest.raises(ConfigError) as exc:
        load_config(None, overrides)
    assert needle in str(exc.value)


def test_bad_yaml_and_missing_file(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: {dim: 64\n")
    with pytest.raises(ConfigError, match="is not valid YAML"):
        load_config(str(bad))
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(str(tmp_path / "nope.yaml"))
    listy = tmp_path / "list.yaml"
    listy.write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="mapping at the top level"):
        load_config(str(listy))


def test_override_syntax_errors():
    with pytest.raises(ConfigError, match="key=value"):
        apply_overrides({}, ["train.steps"])
    with pytest.raises(ConfigError, match="is not a section"):
        apply_overrides({"train": 3}, ["train.steps=1"])


def test_micro_batch_size_and_round_trip():
    cfg = load_config(None, ["train.global_batch_size=32", "train.grad_accum_steps=4", "cluster.num_workers=2"])
    assert cfg.micro_batch_size == 4
    from moetrain.config import from_dict

    assert from_dict(cfg.to_dict()) == cfg


def test_non_utf8_yaml_is_one_clear_error(tmp_path):
    bad = tmp_path / "latin1.yaml"
    bad.write_bytes("train: {steps: 3}  # caf\xe9\n".encode("latin-1"))
    with pytest.raises(ConfigError, match="is not UTF-8 text"):
        load_config(str(bad))


def test_every_numeric_field_has_a_declared_range():
    """A new int / float config field must say what values it accepts (RANGES)."""
    import dataclasses
    import typing

    from moetrain.config import RANGES

    def numeric_paths(cls, prefix):
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            hint = hints[f.name]
            if dataclasses.is_dataclass(hint):
                yield from numeric_paths(hint, f"{prefix}{f.name}.")
            elif hint in (int, float):
                yield f"{prefix}{f.name}"

    missing = sorted(set(numeric_paths(RunConfig, "")) - set(RANGES))
    assert not missing, f"numeric config fields without a range in RANGES: {missing}"
    assert not set(RANGES) - set(numeric_paths(RunConfig, "")), "RANGES names a field that does not exist"
