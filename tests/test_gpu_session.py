"""The GPU calls, dry-run on the CPU: `bash bench/gpu_session.sh dry-run` runs every command that `check` and
`evidence` run on a lent GPU (the gpu tests collected, the step bench, both pairs, the profile, Trainer.fit with crops
finished on the device, the loader, the evidence_gpu pipeline and its export), at tiny sizes. A function or flag renamed
since the script was written fails here, in CI, instead of in the 15 minutes a GPU is lent for."""
import json
import os
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
CIFAR = ROOT.parent / "shared" / "data" / "cifar10" / "train"


@pytest.mark.skipif(not CIFAR.is_dir(), reason="../shared/data/cifar10 is not here")
def test_gpu_session_dry_run(tmp_path):
    env = {**os.environ, "OUT": str(tmp_path), "PYTHON": sys.executable}
    r = subprocess.run(["bash", "bench/gpu_session.sh", "dry-run"], cwd=ROOT, env=env, capture_output=True, text=True,
                       timeout=900)
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-4000:]
    for step in ("gpu tests", "bench", "fit and loader", "bench tables", "evidence", "export"):
        assert f"{step} exit 0" in r.stdout, (step, r.stdout[-3000:])
    assert "tests collected" in (tmp_path / "gpu_tests.log").read_text()
    res = json.loads((tmp_path / "bench" / "bench_cpu_check_tiny.json").read_text())
    kinds = {"timm_bf16", "ours_bf16", "ours_compile", "ours_step"}  # the check's four steps
    assert {row["kind"] for row in res["step"]} == kinds
    assert {row["pair"] for row in res["pair"]} == {"thesis", "mismatch"}
    assert res["matmul_peak_gflop_s"]["bfloat16"] > 0 and res["profile"]
    assert res["fit"][0]["finished"] and {row["augment_on"] for row in res["loader"]} == {"loader", "device"}
    with tarfile.open(tmp_path / "evidence_gpu.tgz") as tar:
        names = tar.getnames()
    assert "evidence_gpu/results.json" in names and "evidence_gpu/pipeline.yaml" in names
    assert not any("checkpoints" in n for n in names)


def test_gpu_session_refuses_an_unknown_call(tmp_path):
    r = subprocess.run(["bash", "bench/gpu_session.sh", "chek"], cwd=ROOT, env={**os.environ, "OUT": str(tmp_path),
                       "PYTHON": sys.executable}, capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and "usage: bash bench/gpu_session.sh check|evidence|dry-run" in r.stderr
