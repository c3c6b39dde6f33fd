"""A smoke run of the quality/speed benchmark on two settings and a handful of samples."""

import dataclasses
import json

import pytest

from tocache_fx.harness import bench
from tocache_fx.policies import FORA


@pytest.mark.parametrize("model", ["dit", "flux"])
def test_bench_smoke(model, monkeypatch, tmp_path):
    grid = [bench.Setting("uncached", steps=4),
            bench.Setting("FORA N=2", FORA(interval=2, num_steps=4), steps=4)]
    tiny = dataclasses.replace(bench.MODELS[model], steps=4, grid=lambda steps, quick: grid)
    monkeypatch.setitem(bench.MODELS, model, tiny)
    rows, images = bench.run_bench(quick=True, per_class=1, repeats=1, progress=False,
                                   compile=False, model=model)
    assert [r["setting"] for r in rows] == ["uncached", "FORA N=2"]
    uncached, fora = rows
    assert uncached["psnr"] == 100.0 and uncached["ssim"] == pytest.approx(1.0)
    assert fora["flops_speedup"] > 1 and fora["psnr"] < 100
    assert 0 <= fora["accuracy"] <= 1 and fora["fd"] >= 0
    assert "FORA N=2" in bench.format_rows(rows)
    paths = bench.save(rows, images, tmp_path)
    assert json.loads((tmp_path / "bench.json").read_text())[1]["setting"] == "FORA N=2"
    assert all(path.stat().st_size > 0 for path in paths)


def test_dominance():
    def row(name, speed, quality, peer=None, policy=None):
        return {"setting": name, "latency_speedup": speed, "psnr": quality, "peer": peer,
                "policy": policy, "steps": 50, "model": "dit"}
    ours = {"policy": "ToCa"}
    rows = [row("ours fast", 3.0, 30.0, policy=ours), row("ours slow", 2.0, 35.0, policy=ours),
            row("peer A", 1.5, 32.0, peer="diffusers PAB"),
            row("peer B", 2.5, 29.0, peer="cache-dit DBCache"),
            row("peer C", 3.5, 20.0, peer="diffusers MagCache")]
    assert bench.dominance(rows) == [("peer A", "ours slow"), ("peer B", "ours fast"),
                                     ("peer C", None)]


def test_dominance_of_an_exact_peer_point_needs_an_exact_faster_point():
    def row(name, speed, quality, peer=None):
        return {"setting": name, "latency_speedup": speed, "psnr": quality, "peer": peer,
                "policy": None if peer else {"policy": "NoCache"}, "steps": 28, "model": "flux"}
    exact_peer = row("peer exact", 0.95, 100.0, peer="cache-dit DBCache")
    assert bench.dominance([row("ours", 5.0, 60.0), exact_peer]) == [("peer exact", None)]
    assert bench.dominance([row("ours", 0.95, 100.0), exact_peer]) == [("peer exact", None)]
    assert bench.dominance([row("ours", 1.0, 100.0), exact_peer]) == [("peer exact", "ours")]
