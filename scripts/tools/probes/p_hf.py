"""Outside probes of the Hugging Face bridge (issue #23 "What to build" item 6: Bad 6 and 7 and the HF "Partial" points).

Each probe builds a tiny random model with transformers (no download; ``tests/hf/conftest.py``'s
``save_random``) and runs the real CLI (``python -m cluster.cli``) in a subprocess, as a user
would: special ids outside the vocabulary, two models sharing a tokenizer.json with different eos
ids, malformed safetensors headers, export dtype and sharding, the context cap, sliding windows.
"""

from __future__ import annotations

import json
import os
import shutil
import struct
import subprocess
import sys
from pathlib import Path

from scripts.helpers import REPO, update_json
from scripts.tools.probes import Probe


def cli(*args: str, timeout: int = 600) -> subprocess.CompletedProcess:
    env = {**os.environ, "RAY_AUTH_MODE": "disabled", "WANDB_MODE": "disabled", "PYTHONPATH": str(REPO)}
    return subprocess.run([sys.executable, "-m", "cluster.cli", *args], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=timeout)


def refused(proc: subprocess.CompletedProcess, *needles: str) -> tuple[bool, str]:
    """Exit 2, exactly one ``moetrain: error:`` line holding every needle, no traceback."""
    lines = [x for x in proc.stderr.splitlines() if x.startswith("moetrain: error:")]
    line = lines[0] if lines else (proc.stderr.strip().splitlines() or ["(no stderr)"])[-1]
    ok = (proc.returncode == 2 and len(lines) == 1 and "Traceback" not in proc.stderr
          and all(n in line for n in needles))
    return ok, f"exit {proc.returncode}: {line[:160]}"


def model(tmp: Path, arch: str = "mixtral", name: str = "m", **kw) -> Path:
    from tests.hf.conftest import save_random

    return save_random(arch, tmp / name, **kw)


def train_args(tmp: Path, d: Path, run: str, *extra: str) -> list[str]:
    corpus = tmp / "corpus.jsonl"
    if not corpus.exists():
        corpus.write_text("".join(json.dumps({"text": f"def f{i}(x): return x + {i}  # the quick brown fox"}) + "\n"
                                  for i in range(200)))
    sets = [f"model.init_from=hf:{d}", f"data.tokenizer=hf:{d}", "data.source=paths", f"data.paths=text={corpus}",
            "data.seq_len=16", "model.max_seq_len=32", "train.steps=1", "train.global_batch_size=2",
            "train.eval_every=0", "train.warmup_steps=1", f"data.cache_dir={tmp / 'cache'}",
            f"checkpoint.uri={tmp / 'ck'}", f"cluster.run_name={run}", f"logging.out_dir={tmp / 'runs'}",
            "cluster.num_workers=1", *extra]
    return ["train"] + [a for s in sets for a in ("--set", s)]


# ---- 23.6: special ids and the data cache key ---------------------------------------------------------


def fine_tune_eos_outside_vocab(tmp: Path) -> tuple[bool, str]:
    d = model(tmp, "olmoe")
    (d / "tokenizer_config.json").unlink()  # the data's end-of-text id then comes from config.json
    update_json(d / "config.json", eos_token_id=5000)
    return refused(cli(*train_args(tmp, d, "eos")), "eos_token_id 5000", "vocab_size 300")


def import_pad_outside_vocab(tmp: Path) -> tuple[bool, str]:
    d = model(tmp)
    update_json(d / "config.json", pad_token_id=-1)
    return refused(cli("hf", "import", str(d), str(tmp / "ck")), "pad_token_id -1", "vocab_size 300")


def same_tokenizer_other_eos(tmp: Path) -> tuple[bool, str]:
    """Two fine-tunes on one data cache: model A ends documents with <|endoftext|> (299), model B
    (the same tokenizer.json byte for byte) with the id of '~'. Each run's prepared rows must use
    its own id (the cache key used to omit it: B reused A's rows)."""
    from tokenizers import Tokenizer

    a = model(tmp, "olmoe", "a")
    b = tmp / "b"
    shutil.copytree(a, b)
    tilde = Tokenizer.from_file(str(a / "tokenizer.json")).token_to_id("~")
    (b / "tokenizer_config.json").unlink()
    update_json(b / "config.json", eos_token_id=tilde)
    seen = []
    for d, run in ((a, "sep-a"), (b, "sep-b")):
        proc = cli(*train_args(tmp, d, run))
        if proc.returncode != 0:
            return False, f"{run}: exit {proc.returncode}: {proc.stderr.strip().splitlines()[-1][:160]}"
    manifests = sorted((tmp / "cache" / "data").glob("prepared-*/manifest.json"))
    seen = sorted(json.loads(m.read_text())["tokenizer"]["eot_id"] for m in manifests)
    ok = seen == sorted([299, tilde])
    return ok, f"{len(manifests)} prepared datasets, end-of-text ids {seen} (want {sorted([299, tilde])})"


# ---- 23.6 (Bad 7): malformed safetensors headers -----------------------------------------------------------


def _header_probe(header: bytes, *needles: str):
    def run(tmp: Path) -> tuple[bool, str]:
        d = model(tmp)
        (d / "model.safetensors").write_bytes(struct.pack("<Q", len(header)) + header + b"\0" * 64)
        return refused(cli("hf", "import", str(d), str(tmp / "ck")), "model.safetensors", *needles)
    return run


def header_lies_about_a_length(tmp: Path) -> tuple[bool, str]:
    """The real header of a complete model, with model.norm.weight's data_offsets 4 bytes short."""
    d = model(tmp)
    raw = (d / "model.safetensors").read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8:8 + n])
    header["model.norm.weight"]["data_offsets"][1] -= 4
    body = json.dumps(header).encode()
    (d / "model.safetensors").write_bytes(struct.pack("<Q", len(body)) + body + raw[8 + n:])
    return refused(cli("hf", "import", str(d), str(tmp / "ck")), "model.safetensors", "model.norm.weight",
                   "needs 128 bytes")


_PAST = json.dumps({"model.norm.weight": {"dtype": "F32", "shape": [64], "data_offsets": [0, 256]}}).encode()


# ---- HF partial: export dtype and shards, context, sliding window -------------------------------------


def _dtypes_and_shards(d: Path) -> tuple[set[str], int]:
    dtypes = set()
    shards = sorted(d.glob("model*.safetensors"))
    for p in shards:
        with open(p, "rb") as f:
            (n,) = struct.unpack("<Q", f.read(8))
            header = json.loads(f.read(n))
        dtypes |= {v["dtype"] for k, v in header.items() if k != "__metadata__"}
    return dtypes, len(shards)


def fine_tuned_bf16_exports_bf16(tmp: Path) -> tuple[bool, str]:
    import torch

    d = model(tmp, "olmoe", dtype=torch.bfloat16, max_shard_size="40KB")
    src = _dtypes_and_shards(d)
    proc = cli(*train_args(tmp, d, "bf16"))
    if proc.returncode != 0:
        return False, f"train: exit {proc.returncode}: {proc.stderr.strip().splitlines()[-1][:160]}"
    proc = cli("hf", "export", str(tmp / "ck" / "bf16"), str(tmp / "out"))
    got = _dtypes_and_shards(tmp / "out")
    ok = proc.returncode == 0 and got == src and (tmp / "out" / "model.safetensors.index.json").is_file()
    return ok, f"source {sorted(src[0])} in {src[1]} shards; export {sorted(got[0])} in {got[1]} shards"


def export_dtype_fp32(tmp: Path) -> tuple[bool, str]:
    import torch

    d = model(tmp, dtype=torch.bfloat16)
    cli("hf", "import", str(d), str(tmp / "ck"))
    proc = cli("hf", "export", str(tmp / "ck" / "hf"), str(tmp / "out"), "--dtype", "fp32", "--max-shard-size", "50KB")
    got = _dtypes_and_shards(tmp / "out")
    return proc.returncode == 0 and got[0] == {"F32"} and got[1] > 1, f"exit {proc.returncode}: {got}"


def mixtral_context(tmp: Path) -> tuple[bool, str]:
    d = model(tmp)
    update_json(d / "config.json", max_position_embeddings=32768, sliding_window=32768)  # Mixtral 8x7B's own values
    proc = cli("hf", "import", str(d), str(tmp / "ck"))
    line = [x for x in proc.stdout.splitlines() if "context:" in x]
    ok = proc.returncode == 0 and bool(line) and "model.max_seq_len 32768" in line[0]
    return ok, f"exit {proc.returncode}: {(line or [proc.stderr.strip()[-160:]])[0][-120:]}"


def plan_states_context(tmp: Path) -> tuple[bool, str]:
    d = model(tmp)
    proc = cli("plan", "--set", f"model.init_from=hf:{d}", "--set", "model.max_seq_len=64", "--set", "data.seq_len=16",
               "--memory-gb", "64")
    line = [x for x in proc.stdout.splitlines() if x.startswith("context:")]
    ok = proc.returncode == 0 and bool(line) and "max_position_embeddings 64" in line[0]
    return ok, f"exit {proc.returncode}: {(line or ['no context line'])[0][-120:]}"


def generate_past_context(tmp: Path) -> tuple[bool, str]:
    d = model(tmp)
    cli("hf", "import", str(d), str(tmp / "ck"))  # the tiny model's context: 64 positions
    proc = cli("generate", str(tmp / "ck" / "hf"), "--prompt", "the quick brown fox", "--max-new-tokens", "100")
    return refused(proc, "exceeds the model's context", "64")


def sliding_window_shorter(tmp: Path) -> tuple[bool, str]:
    d = model(tmp)
    update_json(d / "config.json", sliding_window=16)
    return refused(cli("hf", "import", str(d), str(tmp / "ck")), "sliding_window=16")


PROBES = [
    Probe("fine-tune from an HF model whose eos_token_id is outside the vocabulary", "23.6", fine_tune_eos_outside_vocab),
    Probe("hf import of a config with pad_token_id -1", "23.6", import_pad_outside_vocab),
    Probe("two models, one tokenizer.json, other eos ids, one data cache", "23.6", same_tokenizer_other_eos),
    Probe("safetensors header not UTF-8", "23.6", _header_probe(b'{"a": "\xff\xfe"}', "not valid UTF-8")),
    Probe("safetensors header not JSON", "23.6", _header_probe(b'{"model.norm.weight": {', "not valid JSON")),
    Probe("safetensors header lies about a length", "23.6", header_lies_about_a_length),
    Probe("safetensors header points past the file", "23.6", _header_probe(_PAST, "past the end of the file")),
    Probe("fine-tuned bf16 model exported (dtype, shards)", "23.6", fine_tuned_bf16_exports_bf16),
    Probe("hf export --dtype fp32 --max-shard-size 50KB", "23.6", export_dtype_fp32),
    Probe("import Mixtral's 32768-token context and window", "23.6", mixtral_context),
    Probe("moetrain plan of an HF fine-tune states the context cap", "23.6", plan_states_context),
    Probe("generate past the context", "23.6", generate_past_context),
    Probe("sliding_window shorter than the context", "23.6", sliding_window_shorter),
]
