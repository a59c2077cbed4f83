"""Import and export from and to S3 URIs (a real S3-protocol server, moto, on 127.0.0.1):
HF dir -> s3 checkpoint -> s3 HF dir -> s3 checkpoint again, bit-exact, and model.init_from
reading its weights from the s3 HF dir."""

from __future__ import annotations

import pytest
import torch


@pytest.mark.s3
def test_import_export_through_s3_is_bit_exact(hf_models, s3_server, tmp_path):
    from safetensors.torch import load_file

    from moetrain.config import StoreConfig
    from moetrain.hf import export_hf, import_hf, load_hf_weights, model_from_checkpoint
    from moetrain.model import Transformer

    cfg = StoreConfig(s3_endpoint=s3_server.endpoint)
    first = import_hf(str(hf_models["qwen2_moe"]), s3_server.uri("hf-ckpt"), "qwen", store_cfg=cfg)
    assert first.uri == s3_server.uri("hf-ckpt/qwen/step-0")
    export_hf(first.uri, s3_server.uri("hf-out"), max_shard_bytes=30_000, store_cfg=cfg)
    keys = [o["Key"] for o in s3_server.client().list_objects_v2(Bucket=s3_server.bucket, Prefix="hf-out/")["Contents"]]
    assert "hf-out/model.safetensors.index.json" in keys and "hf-out/tokenizer.json" in keys
    second = import_hf(s3_server.uri("hf-out"), s3_server.uri("hf-ckpt"), "again", store_cfg=cfg)
    export_hf(second.uri, str(tmp_path / "local"), store_cfg=cfg)
    original = load_file(str(hf_models["qwen2_moe"] / "model.safetensors"))
    back = {}
    for shard in (tmp_path / "local").glob("model-*.safetensors"):
        back.update(load_file(str(shard)))
    assert sorted(back) == sorted(original)
    assert all(torch.equal(back[k], original[k]) for k in original)
    model, _, _ = model_from_checkpoint(second.uri, cfg)
    direct = Transformer(model.cfg, seed=1)
    load_hf_weights(direct, s3_server.uri("hf-out"), cfg)  # the init_from reader on an s3 HF dir
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), direct.state_dict().values()))
