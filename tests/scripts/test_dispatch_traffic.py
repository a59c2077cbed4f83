"""scripts/bench/dispatch_traffic.py on a tiny layer: one row per (placement, node map), the counted
bytes of both modes, and fewer bytes between nodes for hierarchical dispatch (3 of 8 experts per
token over 2 remote ranks: flat sends some tokens to both)."""

from scripts.bench.dispatch_traffic import main


def test_dispatch_traffic_table_and_json(capsys):
    res = main(["--experts", "8", "--top-k", "3", "--dim", "8", "--tokens", "16", "--ranks", "4"])
    out = capsys.readouterr().out
    assert {(r["placement"], r["nodes"]) for r in res["rows"]} == {
        (p, n) for p in ("contiguous", "random") for n in ("2x2", "1+3")}
    for r in res["rows"]:
        assert r["flat_inter"] > 0 and r["hier_inter"] > 0
        assert r["inter_hier_vs_flat"] < 1, r
    assert out.strip().splitlines()[-1].startswith('{"experts": 8')
    assert "cpu" in res and "amx_bf16" in res
