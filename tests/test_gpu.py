"""What only a GPU can check (marked `gpu`: skipped where torch sees no CUDA device, as in CI).

On the device machine: `python -m pytest -q -m gpu tests/test_gpu.py`. Tolerances are stated where they are
used; bf16 keeps 8 bits of mantissa, so a loss through a dozen bf16 matmuls lands within about 1e-2 of fp32.
"""
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from test_runs import DIE_IN_CHECKPOINT_WRITE

from kdnb.config import get_config
from kdnb.data import CropBatch, DeviceCrop, loader_settings
from kdnb.distill import DistillTask
from kdnb.models import compile_blocks
from kdnb.models import Classifier, Data2Vec2Encoder, FrozenTeacher

pytestmark = pytest.mark.gpu
ROOT = Path(__file__).resolve().parent.parent
KDNB = [sys.executable, "-m", "kdnb.cli"]
ENV = {**os.environ, "PYTHONUNBUFFERED": "1"}
CUDA = torch.device("cuda")


def _pair(seed=0, img=32, patch=8, width=128, heads=4):
    "A 4-block teacher and a 2-block student (Data2Vec2 encoders) on CUDA."
    torch.manual_seed(seed)
    teacher = FrozenTeacher(Data2Vec2Encoder(img, patch, width, 4, heads), kind="block").to(CUDA)
    student = Data2Vec2Encoder(img, patch, width, 2, heads).to(CUDA)
    return teacher, student


def _loss_and_grad(task, x, amp):
    task.student.zero_grad(set_to_none=True)
    with torch.autocast("cuda", dtype=torch.bfloat16, enabled=amp):
        loss = task((x, None))["loss"]
    loss.backward()
    return loss.item(), torch.cat([p.grad.flatten().float() for p in task.student.parameters() if p.grad is not None])


def test_bf16_distillation_loss_and_gradient_match_fp32():
    "bf16 autocast with bf16 teacher weights (the fast path) against fp32: loss within 2 %, gradient cosine > 0.99."
    teacher, student = _pair()
    x = torch.randn(16, 3, 32, 32, device=CUDA)
    task = DistillTask(student, teacher, "ffn")
    l32, g32 = _loss_and_grad(task, x, amp=False)
    teacher.cast(torch.bfloat16)
    l16, g16 = _loss_and_grad(task, x, amp=True)
    assert abs(l16 - l32) / l32 < 2e-2, (l16, l32)
    assert F.cosine_similarity(g16, g32, dim=0) > 0.99


def test_bf16_classifier_loss_matches_fp32():
    "The finetuning forward (mean-pooled patch tokens -> LayerNorm -> Linear) in bf16 against fp32: within 1 %."
    torch.manual_seed(0)
    model = Classifier(Data2Vec2Encoder(32, 8, 128, 2, 4), 10).to(CUDA)
    x, y = torch.randn(32, 3, 32, 32, device=CUDA), torch.randint(0, 10, (32,), device=CUDA)
    l32 = F.cross_entropy(model(x), y).item()
    with torch.autocast("cuda", dtype=torch.bfloat16):
        l16 = F.cross_entropy(model(x), y).item()
    assert abs(l16 - l32) / l32 < 1e-2, (l16, l32)


def test_compiled_blocks_match_eager_on_cuda():
    "compile_blocks (inductor) computes the eager loss and gradient: fp32, within 1e-3 (fused reductions reorder sums)."
    from torch._dynamo.utils import counters
    teacher, student = _pair(seed=1)
    x = torch.randn(8, 3, 32, 32, device=CUDA)
    task = DistillTask(student, teacher, "ffn")
    eager, g_eager = _loss_and_grad(task, x, amp=False)
    torch._dynamo.reset(); counters.clear()
    assert compile_blocks(task) == 6
    compiled, g_comp = _loss_and_grad(task, x, amp=False)
    cos = F.cosine_similarity(g_comp, g_eager, dim=0).item()
    print(f"eager {eager:.6g}, compiled {compiled:.6g}, gradient cosine {cos:.6f}, {dict(counters['stats'])}")
    assert abs(compiled - eager) / eager < 1e-3, (compiled, eager)
    assert cos > 0.999


def test_device_crop_on_cuda_matches_the_cpu_finish():
    "The same boxes finished on CUDA and on the CPU: pixels within one level on average, flips identical."
    from PIL import Image
    import numpy as np
    rng = np.random.default_rng(0)
    img = Image.fromarray(rng.integers(0, 256, (120, 160, 3), dtype=np.uint8))
    crop = DeviceCrop(64)
    torch.manual_seed(3)
    batch, _ = crop.collate([(crop(img), 0) for _ in range(8)])
    on_gpu, on_cpu = batch.to_device(CUDA).cpu(), batch.to_device("cpu")
    std = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1) * 255
    diff = ((on_gpu - on_cpu) * std).abs()
    assert diff.mean() < 1.0 and diff.max() <= 2.0 + 1e-3, (diff.mean(), diff.max())


def test_cuda_runs_use_the_fast_paths(tmp_path):
    "A distillation on CUDA: bf16 autocast by default, fused AdamW, pinned memory, a finished summary."
    from kdnb.engine import Trainer
    seen = {}

    class Spy:
        order = 0
        def before_fit(self, t):
            seen.update(fused=t.opt.defaults.get("fused"), amp=t.amp_dtype, pin=t.train_dl.pin_memory)
    from kdnb.distill import distill
    cfg = get_config("distill_cpu", device="cuda", precision="auto", epochs=1, max_steps=4, tensorboard=False,
                     out_dir=str(tmp_path / "run"))
    s = distill(cfg, callbacks=[Spy()])
    assert seen == dict(fused=True, amp=torch.bfloat16, pin=True), seen
    assert s["finished"] and s["device"].startswith("cuda") and s["precision"] == "bf16"
    assert loader_settings("cuda", list(range(10)))["pin_memory"]


def _args(out, *extra):
    return ["distill", "--preset", "distill_cpu", "--device", "cuda", "--precision", "bf16", "--train_subset", "256",
            "--batch_size", "32", "--log_every", "1", "--tensorboard", "false", "--epochs", "2", "--ckpt_every", "3",
            "--out_dir", str(out), *extra]


def _weights(run):
    return load_file(str(run / "checkpoints" / "last" / "model.safetensors"))


def test_sigkill_then_resume_on_cuda(tmp_path):
    """Killed with SIGKILL inside a checkpoint write on CUDA and resumed (the CUDA random states read back from the
    checkpoint): the weights of an uninterrupted run, bitwise where two uninterrupted CUDA runs agree bitwise (as on
    the CPU); else no further from it than they are apart. The second uninterrupted run starts only when needed."""
    a, b, killed = tmp_path / "a", tmp_path / "b", tmp_path / "killed"
    subprocess.run(KDNB + _args(a), check=True, env=ENV, capture_output=True)
    # the CPU test's kill inside a checkpoint write, on CUDA
    r = subprocess.run([sys.executable, "-c", DIE_IN_CHECKPOINT_WRITE] + _args(killed), env=ENV, capture_output=True,
                       text=True)
    assert r.returncode == -signal.SIGKILL, r.stderr[-2000:]
    assert torch.load(killed / "checkpoints" / "last" / "state.pt", weights_only=True)["step"] < 16
    r = subprocess.run(KDNB + _args(killed, "--resume", "true"), env=ENV, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-3000:]
    wa, wk = _weights(a), _weights(killed)
    resumed = max((wa[k] - wk[k]).abs().max().item() for k in wa)
    run_to_run = 0.0
    if resumed:  # not bitwise: how far apart are two uninterrupted runs?
        subprocess.run(KDNB + _args(b), check=True, env=ENV, capture_output=True)
        wb = _weights(b)
        run_to_run = max((wa[k] - wb[k]).abs().max().item() for k in wa)
    print(f"max |a - b| = {run_to_run:.3g}, max |a - resumed| = {resumed:.3g}")
    if run_to_run == 0: assert resumed == 0
    else: assert resumed <= 4 * run_to_run
    assert json.loads((killed / "summary.json").read_text())["steps"] == 16


def _papermill(tmp_path, nb, *params):
    args = [sys.executable, "-m", "papermill", str(ROOT / "nbs" / nb), str(tmp_path / "out.ipynb"), "--cwd", str(tmp_path)]
    for k, v in zip(params[::2], params[1::2]): args += ["-p", k, str(v)]
    return subprocess.run(args, env={**ENV, "IN_TEST": "1"}, capture_output=True, text=True)


@pytest.mark.parametrize("nb,params,stage", [
    ("run_distill.ipynb", ("preset", "distill_cpu", "dataset", "digits", "epochs", 1), None),
    ("run_finetune.ipynb", ("preset", "finetune_cpu", "dataset", "digits", "epochs", 1), None),
    ("run_pipeline.ipynb", (), "distill"),
])
def test_run_notebooks_on_cuda(tmp_path, nb, params, stage):
    """The three run notebooks through papermill on CUDA at their test sizes (IN_TEST, as the notebook tests run them:
    the pipeline's miniature): each writes a finished run on the GPU."""
    out = tmp_path / "run"
    r = _papermill(tmp_path, nb, *params, "device", "cuda", "out_dir", str(out))
    assert r.returncode == 0, r.stderr[-3000:]
    s = json.loads(((out / stage) if stage else out).joinpath("summary.json").read_text())
    assert s["finished"] and s["device"].startswith("cuda"), s


def test_ddp_on_cuda_syncs_batchnorm_across_ranks(monkeypatch):
    """Under DDP on CUDA the trained module's BatchNorm layers become SyncBatchNorm (segmentation's decoder: statistics
    over every rank's batch), with the same parameters. One NCCL rank stands in for torchrun's group."""
    from types import SimpleNamespace
    import torch.distributed as dist
    import torch.nn as nn
    from kdnb.engine import Task, Trainer
    for k, v in dict(MASTER_ADDR="127.0.0.1", MASTER_PORT="29533", RANK="0", WORLD_SIZE="1").items():
        monkeypatch.setenv(k, v)
    dist.init_process_group("nccl", rank=0, world_size=1)
    try:
        task = Task()
        task.model = nn.Sequential(nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4)).to(CUDA)
        weight = task.model[1].weight
        Trainer.wrap_ddp(SimpleNamespace(task=task, dist=SimpleNamespace(enabled=True), device=CUDA))
        bn = task.model.module[1]
        assert isinstance(bn, nn.SyncBatchNorm) and bn.weight is weight
        task.model(torch.randn(2, 3, 8, 8, device=CUDA)).sum().backward()
    finally:
        dist.destroy_process_group()


def test_pretraining_step_makes_no_host_sync_on_cuda():
    "The data2vec 2.0 loss and its backward run with CUDA's sync debug mode set to error: no host sync."
    from kdnb.models import Data2Vec2Encoder
    from kdnb.pretrain import Data2Vec2Pretrainer, PretrainTask
    torch.manual_seed(0)
    cfg = get_config("pretrain_cpu", depth=2, average_top_k_layers=2, clone_batch=2)
    task = PretrainTask(Data2Vec2Pretrainer(Data2Vec2Encoder(16, 4, 64, 2, 4), 64, 16, 3, 2), cfg).to(CUDA)
    x = torch.randn(4, 3, 16, 16, device=CUDA)
    task((x, None))["loss"].backward()  # warm-up: allocations, cuBLAS handles
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try: task((x, None))["loss"].backward()
    finally: torch.cuda.set_sync_debug_mode("default")
