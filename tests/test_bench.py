"""A smoke run of the quality/speed benchmark on two settings and a handful of samples."""

import json

import pytest
import torch

from tocache_fx import bench
from tocache_fx.policies import FORA


@pytest.fixture
def tiny_grid(monkeypatch):
    grid = [bench.Setting("uncached"), bench.Setting("FORA N=2", FORA(interval=2, num_steps=4),
                                                      steps=4)]
    monkeypatch.setattr(bench, "settings", lambda quick: grid)
    monkeypatch.setattr(bench, "STEPS", 4)


def test_bench_smoke(tiny_grid, tmp_path):
    rows, images = bench.run_bench(quick=True, per_class=1, repeats=1, progress=False,
                                   compile=False)
    assert [r["setting"] for r in rows] == ["uncached", "FORA N=2"]
    uncached, fora = rows
    assert uncached["psnr"] == 100.0 and uncached["ssim"] == pytest.approx(1.0)
    assert fora["flops_speedup"] > 1 and fora["psnr"] < 100
    assert 0 <= fora["accuracy"] <= 1 and fora["fd"] >= 0
    assert "FORA N=2" in bench.format_rows(rows)
    paths = bench.save(rows, images, tmp_path)
    assert json.loads((tmp_path / "bench.json").read_text())[1]["setting"] == "FORA N=2"
    assert all(path.stat().st_size > 0 for path in paths)
