"""Fill a moetrain model with Hugging Face or checkpoint weights, on any rank of any placement.

Owns: :func:`resolve_init_from` (a run config whose ``model.init_from`` is ``hf:DIR`` -> the
same config with the model's shape fields taken from ``DIR/config.json``), :func:`load_hf_weights`
(copy DIR's tensors into a built :class:`Transformer`: dense ones, and only the experts this
rank's placement gives it, each read with its own ranged read) and :func:`model_from_checkpoint`
(a one-process model holding every expert, for ``moetrain generate``).
"""

from __future__ import annotations

import dataclasses
import logging

import torch

from moetrain.checkpoint import load_objects, read_manifest, resolve
from moetrain.config import RunConfig, StoreConfig, validate
from moetrain.hf.arch import arch_of, context_of, context_text, model_config_from_hf
from moetrain.hf.errors import HFError
from moetrain.hf.safetensors_io import CONFIG, HFDir, open_dir, read_json
from moetrain.hf.tensors import tensor_plan, to_moetrain
from moetrain.model.transformer import Transformer
from moetrain.train.state import DENSE, expert_object_name

HF_PREFIX = "hf:"
log = logging.getLogger(__name__)


def hf_dir_of(spec: str) -> str:
    return spec[len(HF_PREFIX) :] if spec.startswith(HF_PREFIX) else ""


def resolve_init_from(cfg: RunConfig) -> RunConfig:
    """``cfg`` with the model shape from ``model.init_from``'s config.json (identity when empty).
    Run-side fields (max_seq_len, init_std, capacity, balancing) keep the run's values;
    model.max_seq_len may not exceed the config's max_position_embeddings (logged: the cap)."""
    src = hf_dir_of(cfg.model.init_from)
    if not src:
        return cfg
    store = open_dir(src, cfg.storage)
    hf, where = read_json(store, CONFIG), store.uri_of(CONFIG)
    model = model_config_from_hf(hf, base=cfg.model, where=where)
    log.info(context_text(model.max_seq_len, context_of(hf, cfg.model, where)[1]))
    return validate(dataclasses.replace(cfg, model=model))


def context_of_run(cfg: RunConfig) -> str:
    """The context line of a run config (``moetrain plan``): with ``model.init_from=hf:DIR`` the
    cap is DIR's max_position_embeddings, else the run's own model.max_seq_len."""
    src = hf_dir_of(cfg.model.init_from)
    if not src:
        return context_text(cfg.model.max_seq_len, "model.max_seq_len of the run config")
    store = open_dir(src, cfg.storage)
    return context_text(cfg.model.max_seq_len, context_of(read_json(store, CONFIG), cfg.model, store.uri_of(CONFIG))[1])


@torch.no_grad()
def load_hf_weights(model: Transformer, src_uri: str, store_cfg: StoreConfig | None = None) -> int:
    """Copy ``src_uri``'s weights into ``model`` (built for some placement and rank): dense
    tensors and the experts this rank hosts. Returns the tensors read."""
    src = HFDir(src_uri, store_cfg)
    try:
        spec = arch_of(src.config, src.store.uri_of(CONFIG))
        plan = tensor_plan(spec, model.cfg)
        src.check((s, shape) for m in plan for s, shape in zip(m.sources, m.shapes))
        params, buffers = dict(model.dense_parameters()), dict(model.named_buffers())
        wanted = {(layer.layer_index, int(e)) for layer in model.moe_layers() for e in layer.experts.local_experts}
        expert_rows: dict[tuple[int, int, str], torch.Tensor] = {}
        read = 0
        for m in plan:
            kind, rest = m.target.split(":", 1)
            if kind == "expert":
                layer, e, key = rest.split(":")
                if (int(layer), int(e)) not in wanted:
                    continue
            value = to_moetrain(m, [src.read(s) for s in m.sources], interleaved_rope=spec.interleaved_rope)
            read += len(m.sources)
            if kind == "expert":
                expert_rows[(int(layer), int(e), key)] = value
            else:
                (params if kind == "dense" else buffers)[rest].copy_(value)
        _fill_experts(model, lambda layer, e, key: expert_rows[(layer, e, key)])
        return read
    finally:
        src.close()


def _fill_experts(model: Transformer, get) -> None:
    for layer in model.moe_layers():
        ex = layer.experts
        for key in ("w_gate_SFD", "w_up_SFD", "w_down_SDF"):
            p = getattr(ex, key)
            for slot, e in enumerate(ex.local_experts):
                p[slot].copy_(get(layer.layer_index, int(e), key))


@torch.no_grad()
def model_from_checkpoint(uri: str, store_cfg: StoreConfig | None = None) -> tuple[Transformer, RunConfig, dict]:
    """(one-process model with every expert, the run config, the manifest meta) of a committed
    checkpoint (step or run URI)."""
    from moetrain.hf.export import checkpoint_model

    ref = resolve(uri, store_cfg=store_cfg)
    manifest = read_manifest(ref)
    dense = load_objects(ref, [DENSE], manifest=manifest)[DENSE]
    model_cfg, run_cfg = checkpoint_model(manifest, dense)
    model = Transformer(model_cfg, seed=0)
    params, buffers = dict(model.dense_parameters()), dict(model.named_buffers())
    missing = sorted(set(params) - set(dense["params"]))
    if missing:
        raise HFError(f"{ref.uri}/{DENSE}: tensor {missing[0]} is missing (a different model config?)")
    for name, p in params.items():
        p.copy_(dense["params"][name])
    for name, b in dense.get("buffers", {}).items():
        if name in buffers:
            buffers[name].copy_(b)
    del dense
    for layer in model.moe_layers():
        names = [expert_object_name(layer.layer_index, int(e)) for e in layer.experts.local_experts]
        objs = load_objects(ref, names, manifest=manifest)
        ex = layer.experts
        for key in ("w_gate_SFD", "w_up_SFD", "w_down_SDF"):
            getattr(ex, key).copy_(torch.stack([objs[n][key] for n in names]))
    return model, dataclasses.replace(run_cfg, model=model_cfg), manifest.meta
