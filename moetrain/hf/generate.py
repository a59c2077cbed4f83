"""Greedy generation from a moetrain checkpoint (``moetrain generate``), one process, KV-cached.

Owns: finding the checkpoint's tokenizer (its ``tokenizer/`` objects from an HF import, else
``data.tokenizer=hf:DIR``, else the run's trained BPE from the data cache), the stop tokens
(``eos_token_id`` of the copied ``generation_config.json``, else of the HF config) and the
greedy loop: argmax of the last position's logits; the prompt runs once and each new token is
one position, attending over cached keys and values (``model.attention.KVCache``);
transformers' greedy ``generate`` makes the same choices. A prompt plus new tokens longer than
``model.max_seq_len`` (the context) is refused before anything runs, never cut silently.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

import torch
from tokenizers import Tokenizer

from moetrain.checkpoint import load_objects, read_manifest, resolve
from moetrain.config import RunConfig, StoreConfig
from moetrain.hf.convert import TOKENIZER_PREFIX
from moetrain.hf.errors import HFError
from moetrain.hf.load import hf_dir_of, model_from_checkpoint
from moetrain.hf.safetensors_io import open_dir
from moetrain.model.transformer import Transformer


@dataclass(frozen=True)
class Generation:
    prompt_ids: tuple[int, ...]
    new_ids: tuple[int, ...]
    text: str  # the decoded new tokens


def _ids(value) -> tuple[int, ...]:
    if value is None:
        return ()
    return tuple(int(v) for v in (value if isinstance(value, list) else [value]))


def checkpoint_tokenizer(
    uri: str, run_cfg: RunConfig, meta: dict, tokenizer_dir: str = "", store_cfg: StoreConfig | None = None
) -> tuple[Tokenizer, bool, tuple[int, ...]]:
    """(tokenizer, is an HF tokenizer (adds its special tokens), stop ids)."""
    stop = _ids((meta.get("hf") or {}).get("config", {}).get("eos_token_id"))
    ref = resolve(uri, store_cfg=store_cfg)
    names = [e.name for e in read_manifest(ref).entries if e.name.startswith(TOKENIZER_PREFIX)]
    files = {}
    if names and not tokenizer_dir:
        files = {o["file"]: o["data"].tobytes() for o in load_objects(ref, names).values()}
    else:
        src = tokenizer_dir or hf_dir_of(run_cfg.data.tokenizer)
        if src:
            store = open_dir(src, store_cfg)
            files = {f: store.read_bytes(f) for f in ("tokenizer.json", "generation_config.json") if store.exists(f)}
            if "tokenizer.json" not in files:
                raise HFError(f"{store.uri_of('tokenizer.json')} not found")
    if "generation_config.json" in files:
        stop = _ids(json.loads(files["generation_config.json"]).get("eos_token_id")) or stop
    if "tokenizer.json" in files:
        return Tokenizer.from_str(files["tokenizer.json"].decode("utf-8")), True, stop
    from moetrain.data import build_dataset
    from moetrain.data.tokenizer import eot_id

    tok = build_dataset(run_cfg.data, store_cfg).tokenizer
    return tok, False, (eot_id(tok),)


@torch.no_grad()
def greedy(
    model: Transformer,
    prompt_ids: list[int],
    max_new_tokens: int,
    stop_ids: tuple[int, ...] = (),
    *,
    kv_cache: bool = True,
) -> list[int]:
    """Greedy continuation of ``prompt_ids`` (stops after a stop id, which is included).

    With ``kv_cache`` the prompt is run once and each new token costs one position (keys and
    values of the earlier ones are kept). ``len(prompt_ids) + max_new_tokens`` must fit in
    ``model.max_seq_len`` (an :class:`HFError` otherwise)."""
    if not prompt_ids:
        raise HFError("the prompt encodes to no tokens")
    limit = model.cfg.max_seq_len
    if len(prompt_ids) + max_new_tokens > limit:
        raise HFError(
            f"the prompt ({len(prompt_ids)} tokens) plus --max-new-tokens ({max_new_tokens}) exceeds "
            f"the model's context (model.max_seq_len {limit}): shorten the prompt or ask for fewer tokens"
        )
    model.eval()
    ids = list(prompt_ids)
    caches = model.new_kv_caches() if kv_cache else None
    feed = ids
    for _ in range(max_new_tokens):
        logits_BTV, _ = model(torch.tensor([feed]), caches) if caches is not None else model(torch.tensor([ids]))
        nxt = int(logits_BTV[0, -1].argmax())
        ids.append(nxt)
        if nxt in stop_ids:
            break
        feed = [nxt]
    return ids[len(prompt_ids) :]


def generate(
    uri: str, prompt: str, max_new_tokens: int = 32, *, tokenizer_dir: str = "", store_cfg: StoreConfig | None = None
) -> Generation:
    if max_new_tokens < 0:
        raise HFError(f"--max-new-tokens ({max_new_tokens}) must be >= 0")
    model, run_cfg, meta = model_from_checkpoint(uri, store_cfg)
    tok, is_hf, stop = checkpoint_tokenizer(uri, run_cfg, meta, tokenizer_dir, store_cfg)
    if tok.get_vocab_size() > model.cfg.vocab_size:
        raise HFError(
            f"tokenizer vocabulary ({tok.get_vocab_size()}) is larger than model.vocab_size "
            f"({model.cfg.vocab_size}): not this model's tokenizer"
        )
    prompt_ids = tok.encode(prompt, add_special_tokens=is_hf).ids
    new = greedy(model, prompt_ids, max_new_tokens, stop)
    return Generation(tuple(prompt_ids), tuple(new), tok.decode(new))
