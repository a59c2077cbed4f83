"""``moetrain prepare`` on a real local Ray (Ray Data), from local files and from an S3 server.

Inputs: stdlib sources as plain-text files (domain from the ``name=`` prefix, read through a
glob), pydoc topics as JSONL, and a Parquet file whose ``source`` column names each row's domain.
Expectations are computed independently with the stored tokenizer: tokens per domain (one
end-of-document token per document), rows per shard = its tokens // (seq_len + 1).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from cluster.prepare import PrepareOptions, prepare
from moetrain.config import DataConfig, StoreConfig
from moetrain.data import DataError
from moetrain.data.shards import MANIFEST, TOKENIZER
from moetrain.data.tokenizer import load_tokenizer
from moetrain.data.training import open_training_data

SEQ = 32
CODE_FILES = ("decoder.py", "encoder.py", "scanner.py", "tool.py")


def _topics() -> list[str]:
    from pydoc_data.topics import topics

    return [topics[k] for k in sorted(topics)]


@pytest.fixture(scope="module")
def inputs(tmp_path_factory) -> Path:
    import json as json_mod

    root = tmp_path_factory.mktemp("inputs")
    (root / "code").mkdir()
    src = Path(json_mod.__file__).parent
    for name in CODE_FILES:
        (root / "code" / name).write_text((src / name).read_text())
    (root / "code" / "README.txt").write_text("not matched by the glob")
    topics = _topics()
    with open(root / "english.jsonl", "w") as f:
        for t in topics[:30]:
            f.write(json.dumps({"text": t}) + "\n")
    rest = topics[30:]
    pq.write_table(pa.table({"text": rest, "source": ["manual" if i % 3 else "faq" for i in range(len(rest))]}),
                   root / "mixed.parquet")
    return root


def entries(root) -> tuple[str, ...]:
    return (f"code={root}/code/*.py", f"english={root}/english.jsonl", f"{root}/mixed.parquet")


def expected_docs(root) -> dict[str, list[str]]:
    topics = _topics()
    return {"code": [(root / "code" / n).read_text() for n in sorted(CODE_FILES)], "english": topics[:30],
            "faq": [t for i, t in enumerate(topics[30:]) if i % 3 == 0],
            "manual": [t for i, t in enumerate(topics[30:]) if i % 3]}


@pytest.fixture(scope="module")
def prepared(ray_local, inputs, tmp_path_factory):
    out = tmp_path_factory.mktemp("prepared")
    opts = PrepareOptions(inputs=entries(inputs), out=str(out), domain_column="source", vocab_size=300,
                          seq_len=SEQ, batch_docs=16, progress=False)
    return opts, prepare(opts)


@pytest.mark.ray
@pytest.mark.slow
def test_prepare_counts_tokens_and_rows_per_domain(prepared, inputs):
    opts, result = prepared
    m = result.manifest
    assert m.domains == ("code", "english", "faq", "manual")
    tok = load_tokenizer(Path(opts.out) / TOKENIZER)
    for domain, docs in expected_docs(inputs).items():
        want = sum(len(tok.encode(d, add_special_tokens=False).ids) + 1 for d in docs)
        assert m.domain_totals("tokens")[domain] == want
        assert m.domain_totals("docs")[domain] == len(docs)
    for s in m.shards:
        assert s.rows == s.tokens // (SEQ + 1)
        assert pq.ParquetFile(Path(opts.out) / s.key).metadata.num_rows == s.rows
    batches = -(-(len(_topics()) - 30) // 16)  # Parquet rows in batches of 16: one shard per batch and domain
    assert len([s for s in m.shards if s.domain == "manual"]) >= batches - 1 >= 2
    on_disk = json.loads((Path(opts.out) / MANIFEST).read_text())
    assert on_disk["tokenizer"]["sha256"] == m.tokenizer_sha256 and on_disk["domains"]["code"]["rows"] > 0


@pytest.mark.ray
@pytest.mark.slow
def test_rerun_skips_finished_shards(prepared):
    opts, first = prepared
    out = Path(opts.out)
    mtimes = {s.key: (out / s.key).stat().st_mtime_ns for s in first.manifest.shards}
    again = prepare(opts)
    assert (again.shards_written, again.shards_skipped) == (0, len(mtimes))
    assert again.manifest == first.manifest
    assert {k: (out / k).stat().st_mtime_ns for k in mtimes} == mtimes
    gone = first.manifest.shards[1].key
    (out / gone).unlink()
    third = prepare(opts)
    assert (third.shards_written, third.shards_skipped) == (1, len(mtimes) - 1) and (out / gone).is_file()


@pytest.mark.ray
@pytest.mark.slow
@pytest.mark.s3
def test_prepare_from_and_to_s3_then_stream(prepared, inputs, s3_server):
    opts, local = prepared
    client = s3_server.client()
    for p in sorted(inputs.rglob("*")):
        if p.is_file():
            client.upload_file(str(p), s3_server.bucket, f"in/{p.relative_to(inputs)}")
    store = StoreConfig(s3_endpoint=s3_server.endpoint)
    remote = prepare(PrepareOptions(
        inputs=(f"code={s3_server.uri('in/code/*.py')}", f"english={s3_server.uri('in/english.jsonl')}",
                s3_server.uri("in/mixed.parquet")),
        out=s3_server.uri("prepared"), domain_column="source", vocab_size=300, seq_len=SEQ, batch_docs=16,
        store=store, progress=False))
    assert remote.manifest.tokenizer_sha256 == local.manifest.tokenizer_sha256
    for field in ("rows", "tokens", "docs"):
        assert remote.manifest.domain_totals(field) == local.manifest.domain_totals(field)
    views = [open_training_data(DataConfig(source="prepared", prepared_uri=uri, seq_len=SEQ), 8, store_cfg)
             for uri, store_cfg in ((s3_server.uri("prepared"), store), (opts.out, StoreConfig()))]
    for _ in range(3):
        a, b = (v.next_micro_batches(2, 2, 1) for v in views)
        assert all(np.array_equal(x, y) for x, y in zip(a, b))


@pytest.mark.ray
@pytest.mark.slow
def test_bad_inputs_name_the_path_or_row(ray_local, inputs, tmp_path):
    def run(*entries_, **kw):
        with pytest.raises(DataError) as info:
            prepare(PrepareOptions(inputs=entries_, out=str(tmp_path / "out"), vocab_size=300, seq_len=SEQ,
                                   progress=False, **kw))
        msg = str(info.value)
        assert "\n" not in msg
        return msg

    bad = tmp_path / "bad.txt"
    bad.write_bytes(b"fine\nline two \xff\xfe\n")
    assert run(f"x={bad}") == f"{bad} line 2: not UTF-8 text (invalid start byte at byte 14)"
    rows = tmp_path / "rows.jsonl"
    rows.write_text(json.dumps({"text": "a", "src": "ok"}) + "\n" + json.dumps({"text": "b", "src": ""}) + "\n")
    assert run(str(rows), domain_column="src").startswith(f"{rows} line 2: domain field 'src' is empty")
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    assert run(f"code={inputs}/code/*.py", f"blank={empty}").startswith("domain 'blank' is empty")
    garbage = tmp_path / "broken.parquet"
    garbage.write_bytes(b"PAR1 not really")
    assert run(f"x={garbage}").startswith(f"{garbage}: unreadable Parquet shard")
    assert run(f"x={inputs}/mixed.parquet", text_column="body").startswith(
        f"{inputs}/mixed.parquet: no text column (--text-column) 'body'")
    assert run(f"{inputs}/english.jsonl").startswith(f"{inputs}/english.jsonl: no domain")
    assert run(f"x={tmp_path}/nothing-*.txt") == f"input {str(tmp_path / 'nothing-*.txt')!r} matches no file"


def test_cli_exits_2_with_one_line(inputs, tmp_path):
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2]), "RAY_AUTH_MODE": "disabled"}
    proc = subprocess.run([sys.executable, "-m", "cluster.cli", "prepare", f"x={inputs}/mixed.parquet",
                           "--text-column", "body", "--out", str(tmp_path / "o")],
                          capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        f"moetrain: error: {inputs}/mixed.parquet: no text column (--text-column) 'body'; columns: ['text', 'source']"]


@pytest.mark.ray
@pytest.mark.slow
def test_cli_bounds_ray_datas_footer_reader_pool(ray_local, inputs, tmp_path):
    """Ray Data reads Parquet footers on a pool of FooterReader actors (32 processes of ~190 MB by
    default): ``moetrain prepare`` gives its job ``FOOTER_READERS``. Run the CLI as a job on this
    test's Ray, then count the FooterReader actors that job created."""
    from ray._private import state  # the GCS actor table (the state API needs the dashboard)

    from cluster.prepare import FOOTER_ENV, FOOTER_READERS

    def footer_actors() -> set[str]:
        return {k for k, a in state.actors().items() if a.get("ActorClassName", "").endswith("FooterReader")}

    before = footer_actors()
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2]), "RAY_AUTH_MODE": "disabled",
           "RAY_ADDRESS": ray_local.get_runtime_context().gcs_address}
    env.pop(FOOTER_ENV, None)
    proc = subprocess.run([sys.executable, "-m", "cluster.cli", "prepare", *entries(inputs), "--domain-column",
                           "source", "--vocab-size", "300", "--seq-len", str(SEQ), "--out", str(tmp_path / "o"),
                           "--json", "--no-progress"], capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    new = footer_actors() - before
    assert 1 <= len(new) <= FOOTER_READERS
