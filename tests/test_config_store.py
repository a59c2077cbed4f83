"""Config input hardening of issue #23 (item 7): a YAML key given twice is an error naming it,
and credentials inside an endpoint or URI field are refused at validation, before anything is
contacted, without the secret in the message."""

from __future__ import annotations

import time

import pytest

from moetrain.config import ConfigError, load_config


def test_duplicate_yaml_keys_are_named_with_their_lines(tmp_path):
    top = tmp_path / "top.yaml"
    top.write_text("train: {steps: 3}\ndata:\n  seq_len: 32\ntrain:\n  steps: 5\n")
    with pytest.raises(ConfigError, match=r"key 'train' is given twice \(lines 1 and 4\)"):
        load_config(str(top))
    nested = tmp_path / "nested.yaml"
    nested.write_text("data:\n  seq_len: 64\n  vocab_size: 300\n  seq_len: 32\n")
    with pytest.raises(ConfigError, match=r"nested.yaml'?: key 'data.seq_len' is given twice \(lines 2 and 4\)"):
        load_config(str(nested))
    same_name_elsewhere = tmp_path / "ok.yaml"  # one key in two mappings is fine
    same_name_elsewhere.write_text("data: {seed: 1}\ntrain: {seed: 2}\n")
    cfg = load_config(str(same_name_elsewhere))
    assert (cfg.data.seed, cfg.train.seed) == (1, 2)


@pytest.mark.parametrize("override", [
    "storage.s3_endpoint=http://AKIAKEYID:TOPSECRET@10.255.255.1:9000",
    "storage.gcs_endpoint=https://AKIAKEYID:TOP/SECRET@10.255.255.1",
    "storage.s3_endpoint=AKIAKEYID:TOPSECRET@10.255.255.1",  # no scheme: pyarrow would take it as https
    "storage.gcs_endpoint=http://AKIAKEYID@10.255.255.1:4443",
    "checkpoint.uri=s3://AKIAKEYID:TOPSECRET@bucket/ckpt",
    "data.tokenizer=hf:s3://AKIAKEYID:TOPSECRET@bucket/tok",
])
def test_credentials_in_an_endpoint_are_refused_without_echo(override):
    field = override.split("=", 1)[0]
    t0 = time.perf_counter()
    with pytest.raises(ConfigError) as err:
        load_config(None, [override])
    assert time.perf_counter() - t0 < 2.0  # nothing was contacted (10.255.255.1 would hang)
    msg = str(err.value)
    assert msg.startswith(f"{field} holds credentials") and ("***@10.255.255.1" in msg or "***@bucket/" in msg)
    assert "AKIAKEYID" not in msg and "TOPSECRET" not in msg and "TOP/" not in msg and "\n" not in msg


def test_endpoints_and_uris_without_credentials_pass():
    cfg = load_config(None, ["storage.s3_endpoint=http://127.0.0.1:9000", "checkpoint.uri=s3://b/p@v1",
                             "storage.gcs_endpoint=http://127.0.0.1:4443"])
    assert cfg.checkpoint.uri == "s3://b/p@v1"  # an '@' in a key path is not user info
    assert (cfg.storage.s3_endpoint, cfg.storage.gcs_endpoint) == ("http://127.0.0.1:9000", "http://127.0.0.1:4443")


@pytest.mark.parametrize("section", ["data", "checkpoint"])
@pytest.mark.parametrize("key", ["s3_endpoint", "s3_region", "gcs_endpoint"])
def test_the_old_endpoint_keys_name_their_new_place(tmp_path, section, key):
    """data.* and checkpoint.* endpoints moved to the one `storage` section: the old key, from
    --set or from a YAML file, is refused in one line naming the new key."""
    with pytest.raises(ConfigError) as err:
        load_config(None, [f"{section}.{key}=http://127.0.0.1:9000"])
    assert str(err.value) == f"config key '{section}.{key}' was renamed 'storage.{key}'"
    old = tmp_path / "old.yaml"
    old.write_text(f"{section}:\n  {key}: us-east-1\n")
    with pytest.raises(ConfigError, match=rf"^config key '{section}\.{key}' was renamed 'storage\.{key}'$"):
        load_config(str(old))


def test_a_credential_endpoint_from_the_environment_is_refused(monkeypatch):
    from moetrain.checkpoint import InvalidNameError, open_store

    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://AKIAKEYID:TOPSECRET@10.255.255.1:9000")
    with pytest.raises(InvalidNameError) as err:
        open_store("s3://bucket/ckpt", probe=False)
    assert "AKIAKEYID" not in str(err.value) and "TOPSECRET" not in str(err.value)


def test_lease_ttl_has_a_range():
    with pytest.raises(ConfigError, match=r"checkpoint.lease_ttl_s \(0.5\) must be in \[1, 86400\]"):
        load_config(None, ["checkpoint.lease_ttl_s=0.5"])
