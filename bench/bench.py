"""kdnb benchmarks: speed and memory of the distillation step, the data pipeline and the linear probe.

Run by hand, not in CI (minutes on a laptop CPU):

    .venv/bin/python bench/bench.py                 # everything, writes results/bench/
    .venv/bin/python bench/bench.py --quick         # small sizes only (about a minute)
    .venv/bin/python bench/bench.py --only step     # sections: peak, step, pair, profile, scaling, data, loader, probe, fkd
    python bench/bench.py --only peak step profile loader --jpeg-src <ImageFolder>   # on a GPU machine

Every ratio is measured in one run on one machine: "ours" and "plain" alternate in the same process.
Each configuration runs in a fresh subprocess so that its peak memory (max RSS on CPU,
torch.cuda.max_memory_allocated on CUDA) is its own.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "results" / "bench"
# --check: the first GPU call's plan (the step at batch 256: timm's peer, kdnb eager, kdnb compiled; no finetuning
# rows); --tiny: every section at a size a CPU runs in seconds (`bash bench/gpu_session.sh dry-run`, in the test suite)
PLAN = {"check": False, "tiny": False}
FULL = dict(depth_t=12, depth_s=6, width=768, heads=12, patch=16)  # BEiTv2-B teacher, 6-block Data2Vec2 student
TINY = dict(depth_t=2, depth_s=1, width=64, heads=2, patch=16)


def dims() -> dict:
    return TINY if PLAN["tiny"] else FULL


# ----------------------------------------------------------------------------- models and steps
def make_models(img: int, depth_t: int = 12, depth_s: int = 6, width: int = 768, heads: int = 12, patch: int = 16):
    "A BEiTv2-shaped timm teacher (shared relative position bias, layer scale) and a Data2Vec2 student."
    from kdnb.models import Data2Vec2Encoder, FrozenTeacher
    beit = beit_model(img, depth_t, width, heads, patch)
    student = Data2Vec2Encoder(img, patch, width, depth_s, heads)
    return FrozenTeacher(beit), student  # kdnb's wrapper gives the shared bias the rank fused attention takes


def beit_model(img: int, depth: int = 12, width: int = 768, heads: int = 12, patch: int = 16):
    "timm's BEiTv2 ViT-B/16 as unilm pretrained it (one relative position bias shared by the blocks), seed 0."
    import timm
    torch.manual_seed(0)
    return timm.create_model("beitv2_base_patch16_224", num_classes=0, global_pool="token", img_size=img,
                             patch_size=patch, embed_dim=width, depth=depth, num_heads=heads,
                             use_shared_rel_pos_bias=True, use_rel_pos_bias=False)


def plain_target(layers, eps=1e-5):
    "The straightforward target: every layer stacked, instance norm and layer norm written out, fp32."
    h = torch.stack([l.float() for l in layers])                      # [L, B, T, D]
    h = (h - h.mean(2, keepdim=True)) / torch.sqrt(h.var(2, unbiased=False, keepdim=True) + eps)
    y = h.mean(0)                                                     # [B, T, D]
    return (y - y.mean(-1, keepdim=True)) / torch.sqrt(y.var(-1, unbiased=False, keepdim=True) + eps)


def set_fused(teacher, student, on: bool):
    for m in teacher.model.modules():
        if hasattr(m, "fused_attn"): m.fused_attn = on
    student.set_fused_attn(on)


def timm_pair(img: int, depth_t: int = 12, depth_s: int = 6, width: int = 768, heads: int = 12, patch: int = 16):
    "The peer's models: the same timm BEiTv2 teacher (same seed) and a timm ViT student of the same width and depth."
    import timm
    teacher = beit_model(img, depth_t, width, heads, patch)  # timm's as shipped: its rank-3 bias takes the math path
    torch.manual_seed(1)
    student = timm.create_model("vit_base_patch16_224", num_classes=0, img_size=img, patch_size=patch,
                                embed_dim=width, depth=depth_s, num_heads=heads)
    return teacher.eval().requires_grad_(False), student


def make_step(kind: str, teacher, student, opt, device):
    """One distillation step: teacher forward, student forward/backward, loss, optimizer step.
    kinds: `plain` (fp32, unfused attention, every layer stacked), `ours_fp32`, `ours_bf16` (kdnb's DistillTask:
    fused attention, streamed target, bf16 teacher weights), `ours_compile` (the same; `one_config` compiles every
    block after counting the FLOPs); `ours_step` (the task's whole step compiled, as compile="step", fused AdamW);
    `timm_bf16` is the peer: what a timm user writes (timm models, forward hooks, bf16 autocast); `finetune_bf16` / `finetune_compile`: the seeds' finetuning step of the student (no teacher)."""
    from kdnb.distill import DistillTask
    if kind == "plain":
        set_fused(teacher, student, False)
        def step(x):
            with torch.no_grad():
                t = [l.clone() for l in teacher(x)]
            loss = F.mse_loss(plain_target(student(x, layers="ffn")), plain_target(t))
            loss.backward(); opt.step(); opt.zero_grad(set_to_none=True)
            return loss
        return step
    if kind == "timm_bf16":  # teacher, student: timm models (timm_pair)
        feats_t, feats_s = [], []
        for b in teacher.blocks: b.register_forward_hook(lambda m, i, o: feats_t.append(o))
        for b in student.blocks: b.register_forward_hook(lambda m, i, o: feats_s.append(o))
        def step(x):
            feats_t.clear(); feats_s.clear()
            with torch.autocast(device.type, dtype=torch.bfloat16):
                with torch.no_grad(): teacher.forward_features(x)
                student.forward_features(x)
                loss = F.mse_loss(plain_target(feats_s), plain_target(feats_t))
            loss.backward(); opt.step(); opt.zero_grad(set_to_none=True)
            return loss
        return step
    if kind.startswith("finetune"):  # the seeds' finetuning step of the student: mean-pooled head, cross-entropy
        labels = {}
        def step(x):
            y = labels.setdefault(len(x), torch.randint(0, 1000, (len(x),), device=x.device))
            with torch.autocast(device.type, dtype=torch.bfloat16):
                loss = F.cross_entropy(student(x), y)
            loss.backward(); opt.step(); opt.zero_grad(set_to_none=True)
            return loss
        return step
    set_fused(teacher, student, True)
    task = DistillTask(student, teacher, "ffn")
    amp = torch.bfloat16 if kind in ("ours_bf16", "ours_compile", "ours_step") else None
    if amp is not None: teacher.cast(amp)  # as kdnb.distill.distill does under autocast
    def step(x):
        with torch.autocast(device.type, dtype=amp, enabled=amp is not None):
            loss = task((x, None))["loss"]
        loss.backward(); opt.step(); opt.zero_grad(set_to_none=True)
        return loss
    step.task = task  # ours_step compiles it whole after the FLOPs are counted (compile="step")
    return step


def peak_mem_mb(device) -> float:
    if device.type == "cuda": return torch.cuda.max_memory_allocated() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def count_flops(fn, *args) -> int:
    from torch.utils.flop_counter import FlopCounterMode
    with FlopCounterMode(display=False) as fc:
        fn(*args)
    return fc.get_total_flops()


def one_config(kind, img, batch, depth_t, depth_s, width, heads, patch, steps, device) -> dict:
    "Measure one (kind, size) in this process: images/s, peak memory, counted FLOPs (MFU in print_tables)."
    from kdnb.engine import compile_task
    from kdnb.models import compile_blocks
    device = torch.device(device)
    fused = {"fused": True} if device.type == "cuda" else {}
    if kind == "timm_bf16":
        import timm.optim
        teacher, student = timm_pair(img, depth_t, depth_s, width, heads, patch)
        teacher.to(device); student.to(device)
        opt = timm.optim.create_optimizer_v2(student, "adamw", lr=1e-4, weight_decay=0.05)
    elif kind.startswith("finetune"):
        from kdnb.models import Classifier, Data2Vec2Encoder
        torch.manual_seed(0)
        teacher, student = None, Classifier(Data2Vec2Encoder(img, patch, width, depth_s, heads), 1000).to(device)
        opt = torch.optim.AdamW(student.parameters(), lr=1e-4, **fused)
    else:
        teacher, student = make_models(img, depth_t, depth_s, width, heads, patch)
        teacher.to(device); student.to(device)
        if kind in ("ours_bf16", "ours_compile", "ours_step"): fused = {"fused": True}  # as the Trainer's in bf16
        opt = torch.optim.AdamW(student.parameters(), lr=1e-4, **fused)  # or with compile="step", on any device
    step = make_step(kind, teacher, student, opt, device)
    x = torch.randn(batch, 3, img, img, device=device)
    step(x)  # warm-up (allocations, kernels)
    flops = count_flops(step, x)  # eager: FlopCounterMode counts aten ops, which compiled kernels hide
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    t0 = time.perf_counter()
    if kind.endswith("compile"):
        for m in (student, teacher):
            if m is not None: compile_blocks(m)
    if kind == "ours_step": compile_task(step.task, "step")
    compiled = kind.endswith("compile") or kind == "ours_step"
    for _ in range(3 if device.type == "cuda" or compiled else 0): step(x)  # compiles, autotunes
    sync(); warm_s = time.perf_counter() - t0
    if device.type == "cuda": torch.cuda.reset_peak_memory_stats()
    # the peak of this step's matmul dtype, measured in this process just before and after the timed steps (the
    # higher of the two): a machine whose speed drifts during a run gets a ratio of two numbers taken together
    dtype = torch.float32 if kind in ("plain", "ours_fp32") else torch.bfloat16
    peak = matmul_peak(device, dtype)
    t0 = time.perf_counter()
    for _ in range(steps): loss = step(x)
    loss.item()  # one sync at the end
    sync()
    dt = (time.perf_counter() - t0) / steps
    peak = max(peak, matmul_peak(device, dtype))
    return dict(kind=kind, img=img, tokens=(img // patch) ** 2 + 1, batch=batch, depth_t=depth_t, depth_s=depth_s,
                width=width, step_s=round(dt, 4), images_per_s=round(batch / dt, 2), gflop_per_step=round(flops / 1e9, 2),
                achieved_gflop_s=round(flops / dt / 1e9, 1), peak_gflop_s=round(peak, 1),
                peak_mem_mb=round(peak_mem_mb(device), 1),
                warmup_s=round(warm_s, 1), device=str(device), gpu=_gpu_name(device))


def _gpu_name(device) -> str | None:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else None


def run_sub(fn: str = "one_config", env: dict | None = None, **kw) -> dict:
    """A measuring function of this file (one_config, pair_step) in a fresh process (its own peak memory); None when it
    fails (e.g. out of memory). `env`: variables set for that process (None as a value removes one)."""
    code = (f"import json,sys; sys.path.insert(0, {str(ROOT / 'bench')!r}); import kdnb; from bench import {fn}; "
            f"print('RESULT', json.dumps({fn}(**{kw!r})))")  # kdnb first: its OpenMP setting precedes torch
    penv = {k: v for k, v in {**os.environ, **(env or {})}.items() if v is not None}
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=penv)
    line = next((l for l in r.stdout.splitlines() if l.startswith("RESULT ")), None)
    if line is None:
        print(f"  failed {kw}: {r.stderr.strip().splitlines()[-1] if r.stderr.strip() else r.returncode}", flush=True)
        return None
    return json.loads(line[7:])


def pair_step(pair: str, img: int, batch: int, steps: int, device) -> dict:
    """One kdnb distillation step (DistillTask, as the runner builds it) for a teacher/student pair: `thesis` (the
    BEiTv2-shaped ViT-B/16, 12 blocks, into 6 Data2Vec2 blocks, both 768 wide) or `mismatch` (DINOv2 ViT-B/14 with
    4 registers, 12 blocks, 768 wide, into the first 6 blocks of timm's ViT-S/16, 384 wide: the width map, the teacher
    resized to the student's grid, registers left out). Random weights; fp32 on CPU, bf16 autocast on CUDA."""
    import timm
    from kdnb.distill import DistillTask, MappedStudent, check_pair
    from kdnb.models import FrozenTeacher, TimmEncoder
    device = torch.device(device)
    torch.manual_seed(0)
    if pair == "thesis":
        teacher, student = make_models(img)
    else:
        teacher = FrozenTeacher(timm.create_model("vit_base_patch14_reg4_dinov2", num_classes=0, img_size=img))
        student = TimmEncoder("vit_small_patch16_224", depth=6, img_size=img)
    d_t, d_s, skip = check_pair(student, teacher, img)
    if d_t != d_s: student = MappedStudent(student, d_t)
    teacher.to(device); student.to(device)
    amp = torch.bfloat16 if device.type == "cuda" else None
    if amp is not None: teacher.cast(amp)
    task = DistillTask(student, teacher, "auto", skip=skip)
    opt = torch.optim.AdamW(student.parameters(), lr=1e-4)
    x = torch.randn(batch, 3, img, img, device=device)
    def step():
        with torch.autocast(device.type, dtype=amp, enabled=amp is not None):
            loss = task((x, None))["loss"]
        loss.backward(); opt.step(); opt.zero_grad(set_to_none=True)
        return loss
    step(); flops = count_flops(step)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    sync(); t0 = time.perf_counter()
    for _ in range(steps): loss = step()
    loss.item(); sync()
    dt = (time.perf_counter() - t0) / steps
    return dict(pair=pair, img=img, batch=batch, teacher_input=list(teacher.input_size or (img, img)),
                width_map=f"{d_s} -> {d_t}" if d_t != d_s else None,
                student_params_m=round(sum(p.numel() for p in student.parameters()) / 1e6, 1),
                step_s=round(dt, 4), images_per_s=round(batch / dt, 2), gflop_per_step=round(flops / 1e9, 2),
                peak_mem_mb=round(peak_mem_mb(device), 1), device=str(device), gpu=_gpu_name(device))


def section_pair(device, quick):
    "The thesis pair beside a mismatched one (width, patch size, register tokens), each in a fresh process."
    img, batch, steps = (224, 64, 15) if device.type == "cuda" else ((64, 8, 3) if quick else (224, 8, 2))
    if PLAN["tiny"]: img, batch, steps = 32, 2, 1
    rows = []
    for pair in ("thesis", "mismatch"):
        r = run_sub("pair_step", pair=pair, img=img, batch=batch, steps=steps, device=str(device))
        if r is None: continue
        rows.append(r)
        print(f"  {pair:9s} img {img} batch {batch}: {rows[-1]['images_per_s']} img/s, "
              f"{rows[-1]['gflop_per_step']} GFLOP/step, teacher input {rows[-1]['teacher_input']}", flush=True)
    return rows


# ----------------------------------------------------------------------------- sections
def matmul_peak(device, dtype=torch.float32, n=None, reps=10) -> float:
    "Measured matrix-multiply peak in GFLOP/s (a large square matmul of random numbers, after warm-up)."
    n = n or (256 if PLAN["tiny"] else 8192 if device.type == "cuda" else 4096)
    a, b = torch.randn(n, n, device=device, dtype=dtype), torch.randn(n, n, device=device, dtype=dtype)
    for _ in range(3): a @ b
    if device.type == "cuda": torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(reps): a @ b
    if device.type == "cuda": torch.cuda.synchronize()
    return 2 * n ** 3 * reps / (time.perf_counter() - t0) / 1e9


def section_step(device, quick):
    """The distillation step, ViT-B/16 teacher (BEiTv2-shaped) and 6-block Data2Vec2 student. CPU: ours (fp32, bf16)
    against the plain baseline. CUDA: ours (eager bf16, compiled) against the timm peer, and the finetuning step."""
    rows = []
    if PLAN["check"]:  # the first GPU call's plan (any device): batch 256 at 224 px, the peer and both of kdnb's steps
        size = (32, 4) if PLAN["tiny"] else (224, 256) if device.type == "cuda" else (224, 8)
        sizes, kinds = [size], ("timm_bf16", "ours_bf16", "ours_compile", "ours_step")
    elif device.type == "cuda":
        sizes, kinds = [(224, 64), (224, 256)], ("timm_bf16", "ours_bf16", "ours_compile")
        if quick: sizes = [(224, 64)]
    else:
        sizes, kinds = ([(64, 8), (64, 32)] if quick else [(224, 8), (224, 32), (64, 32), (64, 128)]), \
            ("plain", "ours_fp32", "ours_bf16")
    jobs = [(k, img, b) for img, b in sizes for k in kinds]
    if device.type == "cuda" and not PLAN["check"]:
        jobs += [(k, 224, sizes[-1][1]) for k in ("finetune_bf16", "finetune_compile")]
    for kind, img, batch in jobs:
        steps = 1 if PLAN["tiny"] else (15 if device.type == "cuda" else 6 if PLAN["check"] else 2 if img == 224 else 5)
        r = run_sub(kind=kind, img=img, batch=batch, **dims(), steps=steps, device=str(device))
        if r:
            rows.append(r)
            print(f"  {kind:16s} img {img} batch {batch}: {r['images_per_s']} img/s, {r['peak_mem_mb']} MB, "
                  f"{r['achieved_gflop_s'] / 1e3:.0f} TFLOP/s (warm-up {r['warmup_s']} s)", flush=True)
    return rows


def section_profile(device, quick, out: Path):
    "Where the time of the fastest distillation step goes: torch.profiler over a few steps, kernels by category."
    from torch.profiler import ProfilerActivity, profile
    from kdnb.models import compile_blocks
    img, batch = (224, 64) if quick or device.type == "cpu" else (224, 256)
    if device.type == "cpu": img, batch = 64, 8
    if PLAN["tiny"]: img, batch = 32, 4
    teacher, student = make_models(img, **dims())
    teacher.to(device); student.to(device)
    opt = torch.optim.AdamW(student.parameters(), lr=1e-4, **({"fused": True} if device.type == "cuda" else {}))
    kind = "ours_compile" if device.type == "cuda" or PLAN["check"] else "ours_fp32"
    step = make_step(kind, teacher, student, opt, device)
    if kind == "ours_compile": compile_blocks(student); compile_blocks(teacher)
    x = torch.randn(batch, 3, img, img, device=device)
    for _ in range(1 if PLAN["tiny"] else 3): step(x)
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=acts) as prof:
        for _ in range(1 if PLAN["tiny"] else 5): step(x)
        if device.type == "cuda": torch.cuda.synchronize()
    by = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
    table = prof.key_averages().table(sort_by=by, row_limit=25, max_name_column_width=70)
    (out / f"profile_{device.type}.txt").write_text(f"{kind}, img {img}, batch {batch}, 5 steps\n{table}\n")
    print(table)
    # first match wins: attention and convolution kernels (cuDNN's SDPA, implicit-GEMM convolutions) also carry
    # "sm90" or "gemm" in their names, so they are asked for before the matmuls
    cats = {"attention (flash, cuDNN, efficient)": ("flash", "fmha", "attention", "sdpa", "attn"),
            "convolution (patch embedding)": ("conv", "fprop", "dgrad", "wgrad", "implicit"),
            "matmul (GEMM)": ("gemm", "cutlass", "sm90", "matmul", "aten::mm", "aten::addmm", "aten::bmm", "nvjet",
                              "cublas"),
            "optimizer (fused AdamW)": ("adam",), "fused elementwise/norm (Triton)": ("triton",)}
    total, parts = 0.0, {k: 0.0 for k in (*cats, "other")}
    for e in prof.key_averages():
        t = getattr(e, "self_device_time_total", None) if device.type == "cuda" else e.self_cpu_time_total
        if not t or (device.type == "cuda" and getattr(e, "device_type", None) is not None
                     and "CUDA" not in str(e.device_type)):
            continue
        total += t
        name = e.key.lower()
        parts[next((c for c, keys in cats.items() if any(k in name for k in keys)), "other")] += t
    rows = [dict(category=c, share_pct=round(100 * v / total, 1), ms_per_step=round(v / 5 / 1e3, 2))
            for c, v in parts.items()] if total else []
    for r in rows: print(f"  {r['category']:36s} {r['share_pct']:5.1f} %  {r['ms_per_step']} ms/step")
    return rows


# OpenMP's wait at the end of a parallel region, set before torch loads libgomp (kdnb/__init__.py sets kdnb's: passive
# unless the user set one). A spin of 10k iterations was tried too (5.54 img/s alone, 2.43x beside a busy process at
# 224 px; 4.6x at 32 px): only the passive wait keeps both sizes in proportion.
WAIT_POLICIES = {"libgomp default (spin 300k)": {"OMP_WAIT_POLICY": None, "GOMP_SPINCOUNT": "300000"},
                 "passive": {"OMP_WAIT_POLICY": "PASSIVE", "GOMP_SPINCOUNT": None},
                 "kdnb (default)": {"OMP_WAIT_POLICY": None, "GOMP_SPINCOUNT": None}}


def section_shared_cores(device, quick):
    """Shared cores: the 224-px bf16 step (ViT-B/16 teacher, 6-block student, batch 8) and the evidence pipeline's small
    fp32 step (32 px, width 128, batch 64), alone and beside one busy single-threaded process, under each wait policy.
    Losing one core of two should cost 2x; threads that spin at their barriers while the other job holds a core cost
    far more."""
    if device.type != "cpu": return []
    sizes = {"224 px bf16": dict(kind="ours_bf16", img=64 if quick else 224, batch=8, depth_t=12, depth_s=6, width=768,
                                 heads=12, patch=16, steps=2 if quick else 3),
             "32 px fp32 (pipeline)": dict(kind="ours_fp32", img=32, batch=64, depth_t=6, depth_s=3, width=128,
                                           heads=4, patch=8, steps=10 if quick else 40)}
    rows = []
    for size, kw in sizes.items():
        for policy, env in WAIT_POLICIES.items():
            r = {}
            for beside in (False, True):
                busy = subprocess.Popen([sys.executable, "-c", "while True: pass"]) if beside else None
                try: res = run_sub(env=env, **kw, device="cpu")
                finally:
                    if busy: busy.kill(); busy.wait()
                r["busy" if beside else "alone"] = res["images_per_s"] if res else None
            slow = round(r["alone"] / r["busy"], 2) if r["alone"] and r["busy"] else None
            rows.append(dict(size=size, policy=policy, alone_images_per_s=r["alone"], busy_images_per_s=r["busy"],
                             slowdown=slow))
            print(f"  {size:22s} {policy:28s} alone {r['alone']} img/s, beside a busy process {r['busy']} img/s: "
                  f"{slow}x slower", flush=True)
    return rows


def section_scaling(device, quick):
    "How images/s and memory grow with batch size, image size (tokens) and depth (ours, bf16)."
    rows, kind = [], "ours_bf16"
    base = dict(img=64, batch=32, depth_t=12, depth_s=6, width=768, heads=12, patch=16, steps=3, device=str(device))
    grid = ([("batch", b) for b in (8, 32)] if quick else
            [("batch", b) for b in (8, 16, 32, 64, 128)] + [("img", s) for s in (32, 64, 96, 128, 160)] +
            [("depth_t", d) for d in (4, 8, 12)])
    for key, v in grid:
        kw = {**base, key: v}
        if key == "depth_t": kw["depth_s"] = v // 2
        r = run_sub(kind=kind, **kw)
        if r: r["varied"] = key; rows.append(r); print(f"  {key}={v}: {r['images_per_s']} img/s, {r['peak_mem_mb']} MB", flush=True)
    return rows


def section_data(quick):
    "Decoded + augmented images/s of the loader (real CIFAR-10 JPEGs) with the presets' transforms."
    from kdnb.config import get_config
    from kdnb.data import build_data, make_loader
    root = ROOT.parent / "shared" / "data" / "cifar10"
    if not (root / "train").is_dir(): print("  ../shared/data/cifar10 missing: data section skipped"); return []
    rows = []
    for preset, kind in (("distill", "distill"), ("finetune", "finetune")):
        for workers in ((0, 1) if quick else (0, 1, 2)):
            cfg = get_config(preset, dataset="cifar10", data_root=str(root), train_subset=2000, val_size=0.1, num_workers=workers)
            d = build_data(cfg, kind)
            dl = make_loader(d.train, 64, True, num_workers=workers)
            n, t0 = 0, time.perf_counter()
            for x, _ in dl:
                n += len(x)
                if n >= (512 if quick else 1536): break
            rate = n / (time.perf_counter() - t0)
            rows.append(dict(transform=preset, img=cfg.img_size, workers=workers, images_per_s=round(rate, 1)))
            print(f"  {preset} transform at {cfg.img_size}px, {workers} workers: {rate:.0f} img/s", flush=True)
    return rows


JPEG_SRC = ROOT.parent / "shared" / "data" / "cifar10" / "train"  # --jpeg-src: any ImageFolder of JPEGs


def _make_jpegs(args):
    files, root, ks, size = args
    from PIL import Image
    for k in ks:
        d = root / f"class{k % 10}"
        if files: img = Image.open(files[k % len(files)]).convert("RGB").resize(size, Image.BICUBIC)
        else: img = Image.effect_noise(size, 40).convert("RGB")
        img.save(d / f"{k}.jpg", quality=90)


def imagenet_like_jpegs(root: Path, n: int, size=(500, 375), src: Path = JPEG_SRC) -> Path:
    "An ImageFolder of `n` JPEGs at ImageNet's typical size, upscaled from real CIFAR-10 images (quality 90)."
    from multiprocessing import Pool
    files = sorted(Path(src).glob("*/*.jpg"))[: n] if Path(src).is_dir() else []
    if not files: print(f"  no JPEGs under {src}: noise images instead", flush=True)
    for c in range(10): (root / f"class{c}").mkdir(parents=True, exist_ok=True)
    procs = min(16, os.cpu_count() or 1)
    with Pool(procs) as pool:
        pool.map(_make_jpegs, [(files, root, range(i, n, procs), size) for i in range(procs)])
    return root


def section_loader(device, quick, src: Path = JPEG_SRC):
    """The distillation loader at 224 px on ImageNet-sized JPEGs: crops finished in the workers (`loader`) against
    workers that only decode and cut the box, with the resize, flip and normalisation on `device` (`device`).
    The rate is taken after the first batch (worker start-up excluded), over two passes of the images."""
    import tempfile
    import kdnb.runs  # noqa: F401  registers every run kind's presets
    from kdnb.config import get_config
    from kdnb.data import build_data, make_loader
    cuda = device.type == "cuda"
    n = 40 if PLAN["tiny"] else 256 if quick else (2048 if cuda else 768)
    root = imagenet_like_jpegs(Path(tempfile.mkdtemp()) / "train", n, src=src)
    cores = len(os.sched_getaffinity(0))
    plan = ([("loader", w) for w in (8, cores)] + [("device", w) for w in (8, cores)]) if cuda else \
        [(where, w) for where in ("loader", "device") for w in ((0, 2) if quick else (0, 1, 2))]
    if PLAN["tiny"]: plan = [("loader", 0), ("device", 0)]
    rows = []
    for where, workers in plan:
        cfg = get_config("distill", dataset="imagenet", data_root=str(root.parent), augment_on=where,
                         val_size=10 if PLAN["tiny"] else 0.05,
                         num_workers=workers, device=str(device))
        d = build_data(cfg, "distill")
        dl = make_loader(d.train, 4 if PLAN["tiny"] else 64, True, num_workers=workers, device=device)
        seen, t_load, t_finish, first = 0, 0.0, 0.0, True
        for epoch in range(2):
            dl.sampler.set_epoch(epoch)
            t0 = time.perf_counter()
            for x, _ in dl:
                t1 = time.perf_counter()
                if where == "device":
                    x = x.to_device(device, non_blocking=cuda)
                    if cuda: torch.cuda.synchronize()
                t2 = time.perf_counter()
                if not first: t_load += t1 - t0; t_finish += t2 - t1; seen += len(x)
                first, t0 = False, time.perf_counter()
        rows.append(dict(augment_on=where, workers=workers, img=224, images=seen,
                         loader_images_per_s=round(seen / t_load, 1),
                         finish_images_per_s=round(seen / t_finish, 1) if where == "device" else None,
                         finish_device=str(device) if where == "device" else None))
        print(f"  {where}, {workers} workers: loader {seen / t_load:.0f} img/s"
              + (f", finishing on {device}: {seen / t_finish:.0f} img/s" if where == "device" else ""), flush=True)
    return rows


def section_fit(device, quick, src: Path = JPEG_SRC):
    """`Trainer.fit` end to end as `kdnb distill` runs it (loader, crops finished on the device, the compiled step, bf16,
    checkpoints, evaluation) for ~150 steps at 224 px on ImageNet-sized JPEGs: the BEiTv2-shaped teacher and the
    6-block student, random weights (offline). The run's own images/s beside the loader's rate on the same files."""
    import tempfile
    import kdnb.runs  # noqa: F401  registers every run kind's presets
    from kdnb.distill import distill
    from kdnb.config import get_config
    tmp = Path(tempfile.mkdtemp())
    cuda = device.type == "cuda"
    root = imagenet_like_jpegs(tmp / "train", 40 if PLAN["tiny"] else 2048 if cuda else 256, src=src)
    d = dims()
    size = dict(img_size=32, batch_size=4, max_steps=2, compile=False, num_workers=0) if PLAN["tiny"] else \
        dict(img_size=224, batch_size=256 if cuda else 8, max_steps=150 if cuda else 4, compile=cuda)
    teacher = dict(teacher="tiny", teacher_pretrained=False, teacher_embed_dim=d["width"]) if PLAN["tiny"] else \
        dict(teacher="timm:beitv2_base_patch16_224", teacher_pretrained=False)
    cfg = get_config("distill", dataset="imagenet", data_root=str(root.parent), augment_on="device",
                     val_size=10 if PLAN["tiny"] else 0.05,
                     **teacher, model="data2vec2", pretrained=False, depth=d["depth_s"], embed_dim=d["width"],
                     num_heads=d["heads"], mlp_dim=4 * d["width"], patch_size=d["patch"], device=str(device),
                     precision="bf16", epochs=1000, eval_every=1000, tensorboard=False, out_dir=str(tmp / "run"),
                     **size)
    t0 = time.perf_counter()
    s = distill(cfg)
    row = dict(steps=s["steps"], finished=s["finished"], img=cfg.img_size, batch=cfg.batch_size,
               compile=cfg.compile, fit_images_per_s=s["images_per_s"], train_time_s=s["train_time_s"],
               wall_s=round(time.perf_counter() - t0, 1), device=s["device"], gpu=_gpu_name(device))
    print(f"  Trainer.fit: {row['steps']} steps, {row['fit_images_per_s']} img/s over the run, "
          f"{row['wall_s']} s in all (compile and evaluation included)", flush=True)
    return [row]


def section_probe(quick):
    "Linear probe: cached features (backbone once) against recomputing the frozen backbone every epoch."
    import tempfile
    from kdnb.config import get_config
    from kdnb.finetune import finetune
    rows = []
    epochs = 2 if quick else 5
    for cached in (False, True):
        cfg = get_config("linear_probe_cpu", epochs=epochs, img_size=32, patch_size=4, embed_dim=192, num_heads=3, depth=6,
                         cache_features=cached, out_dir=tempfile.mkdtemp(), tensorboard=False, device="cpu")
        t0 = time.perf_counter(); s = finetune(cfg); dt = time.perf_counter() - t0
        rows.append(dict(cached=cached, epochs=epochs, total_s=round(dt, 2), acc1=round(s["metrics"]["acc1"], 2)))
        print(f"  cached={cached}: {dt:.1f} s for {epochs} epochs, top-1 {s['metrics']['acc1']:.1f}", flush=True)
    return rows


def section_fkd(device, quick):
    """FKD: a training step on stored soft labels (replay) against the same step with the teacher labelling the
    crops online; the label-generation pass's throughput; the store's size per image at FKD's settings."""
    import copy, tempfile
    import timm
    from kdnb.config import get_config
    from kdnb.data import build_data, make_loader
    from kdnb.models import Classifier
    from kdnb.fkd import ClassifierTeacher, FKDTask, ReplayCrops, generate_soft_labels
    from kdnb.models import Data2Vec2Encoder
    root = ROOT.parent / "shared" / "data" / "cifar10"
    src = dict(dataset="cifar10", data_root=str(root), val_size=0.1) if (root / "train").is_dir() else {}
    img, batch, steps = (64, 8, 3) if quick else (224, 8, 4)  # batch: images per step, 4 crops each
    tmp = Path(tempfile.mkdtemp())
    cfg = get_config("ferkd_cpu", **src, img_size=img, patch_size=16, train_subset=batch * (steps + 1), label_crops=8,
                     label_shard_images=batch * (steps + 1), device=str(device), out_dir=str(tmp / "run"))
    data = build_data(cfg, "distill"); data.train.transform = None
    torch.manual_seed(0)
    teacher = ClassifierTeacher(timm.create_model("vit_base_patch16_224", num_classes=data.num_classes, img_size=img), img)
    student0 = Classifier(Data2Vec2Encoder(img, 16, 768, 6, 12), data.num_classes)
    t0 = time.perf_counter()
    store = generate_soft_labels(cfg, teacher, data.train, data.num_classes)
    gen_s = time.perf_counter() - t0
    rows = []
    for mode in ("online", "replay"):
        ds = ReplayCrops(data.train, store if mode == "replay" else None, 4, img, data.num_classes)
        task = FKDTask(copy.deepcopy(student0), None, 0, teacher if mode == "online" else None).to(device)
        opt = torch.optim.AdamW(task.model.parameters(), lr=1e-4)
        it = iter(make_loader(ds, batch, True, num_workers=0))
        def step():
            x, soft, y = next(it)
            loss = task((x.to(device), soft.to(device), y))["loss"]
            loss.backward(); opt.step(); opt.zero_grad(set_to_none=True)
            if device.type == "cuda": torch.cuda.synchronize()
        step()  # warm-up
        t0 = time.perf_counter()
        for _ in range(steps): step()
        dt = (time.perf_counter() - t0) / steps
        rows.append(dict(mode=mode, img=img, images_per_step=batch, crops_per_step=4 * batch, s_per_step=round(dt, 3),
                         crops_per_s=round(4 * batch / dt, 2)))
        print(f"  {mode}: {dt:.2f} s/step ({4 * batch / dt:.1f} crops/s)", flush=True)
    rows[1]["speedup_vs_online"] = round(rows[0]["s_per_step"] / rows[1]["s_per_step"], 2)
    print(f"  replay / online speed-up: {rows[1]['speedup_vs_online']}x", flush=True)
    # the store at FKD's settings (500 crops, top-5): bytes per image, and what generating it costs with this teacher
    big = cfg.replace(label_crops=500, label_top_k=5, train_subset=10, label_shard_images=10, img_size=32, patch_size=8,
                      out_dir=str(tmp / "size"))
    d2 = build_data(big, "distill"); d2.train.transform = None
    tiny = ClassifierTeacher(Classifier(Data2Vec2Encoder(32, 8, 64, 2, 4), d2.num_classes), 32)
    s2 = generate_soft_labels(big, tiny, d2.train, d2.num_classes)
    per_image = s2.nbytes() / s2.num_images
    gen_crops_s = cfg.label_crops * store.num_images / gen_s
    rows.append(dict(mode="store", crops_per_image=500, top_k=5, bytes_per_image=round(per_image),
                     imagenet_gb=round(per_image * 1281167 / 1e9, 1), label_gen_crops_per_s=round(gen_crops_s, 2),
                     label_gen_s_per_image_500=round(500 / gen_crops_s, 1)))
    print(f"  store: {per_image:.0f} bytes/image at 500 crops, top-5 ({per_image * 1281167 / 1e9:.1f} GB for ImageNet-1K); "
          f"label generation {gen_crops_s:.1f} crops/s with the {img}px ViT-B teacher", flush=True)
    return rows


SECTIONS = ["peak", "step", "pair", "profile", "scaling", "shared_cores", "data", "loader", "fit", "probe", "fkd",
            "students"]


def section_students(device, quick):
    """Several students from one teacher pass (kdnb.distill.FamilyDistillTask) against the same students trained one
    after another (DistillTask each, the teacher run once per student): images/s per student and in total for 1, 2
    and 3 students, the speed-up, and the speed-up the counted FLOPs predict (teacher forward + students' forward
    and backward). Same process, the two ways alternating step by step, fp32 eager; kdnb's real tasks and AdamW."""
    from kdnb.config import get_config
    from kdnb.distill import build_student, d2v_task, family_task
    size = TINY if PLAN["tiny"] else FULL
    img, batch, steps = (16, 4, 2) if PLAN["tiny"] else ((32, 8, 3) if quick else (64, 16, 5))
    base = get_config("distill_cpu", teacher="tiny", model="tiny", pretrained=False, img_size=img,
                      patch_size=size["patch"] if img >= 32 else 4, embed_dim=size["width"], num_heads=size["heads"],
                      mlp_dim=4 * size["width"], depth=size["depth_s"], teacher_depth=size["depth_t"], device=str(device))
    cuts = [size["depth_s"], max(1, 2 * size["depth_s"] // 3), max(1, size["depth_s"] // 2)]  # 6, 4, 3 (the preset)
    x = torch.randn(batch, 3, img, img, device=device)
    rows = []
    for k in (1, 2, 3):
        cfg = base.replace(students=",".join(f"s{i}=:depth={d}" for i, d in enumerate(cuts[:k])))
        torch.manual_seed(0)
        fam = family_task(cfg, cfg.student_configs()).to(device).train()
        solos = [d2v_task(c, build_student(c), fam.teacher).to(device).train() for c in cfg.student_configs().values()]
        opts = [torch.optim.AdamW(t.param_groups(cfg)) for t in [fam, *solos]]
        def step(task, opt):
            loss = task((x, None))["loss"]
            loss.backward(); opt.step(); opt.zero_grad(set_to_none=True)
        flops = [count_flops(lambda t=t: t((x, None))["loss"].backward()) for t in [fam, *solos]]
        times = [[] for _ in opts]
        for i in range(steps + 1):  # the first step of each warms up; the two ways alternate
            for j, (t, o) in enumerate(zip([fam, *solos], opts)):
                if device.type == "cuda": torch.cuda.synchronize()
                t0 = time.perf_counter(); step(t, o)
                if device.type == "cuda": torch.cuda.synchronize()
                if i: times[j].append(time.perf_counter() - t0)
        t_fam, t_seq = sorted(times[0])[len(times[0]) // 2], sum(sorted(ts)[len(ts) // 2] for ts in times[1:])
        t_flops = count_flops(lambda: fam.teacher(x))
        rows.append(dict(students=k, depths="/".join(map(str, cuts[:k])), img=img, batch=batch,
                         family_images_per_s=round(batch / t_fam, 2),  # each image trains all k students
                         one_after_another_images_per_s=round(batch / t_seq, 2),
                         student_images_per_s=round(k * batch / t_fam, 2),  # summed over the students
                         speedup=round(t_seq / t_fam, 3), flop_predicted_speedup=round(sum(flops[1:]) / flops[0], 3),
                         teacher_share_of_a_solo_step=round(t_flops / flops[1], 3)))
        print(rows[-1], flush=True)
    return rows


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--only", nargs="*", default=None, choices=SECTIONS)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--out", default=str(OUT))
    ap.add_argument("--jpeg-src", default=str(JPEG_SRC), help="ImageFolder of JPEGs the loader section upscales")
    ap.add_argument("--show", action="store_true", help="only print the tables of the saved results")
    ap.add_argument("--check", action="store_true", help="the first GPU call's plan: the step at batch 256 only")
    ap.add_argument("--tiny", action="store_true", help="every section at a tiny size (the CPU dry-run of the plan)")
    a = ap.parse_args(argv)
    PLAN.update(check=a.check, tiny=a.tiny)
    if a.show:
        tag = "".join(f"_{k}" for k in ("check", "tiny") if getattr(a, k))
        path = Path(a.out) / f"bench_{torch.device(a.device).type}{tag}.json"
        return print_tables(json.loads(path.read_text()))
    device, out = torch.device(a.device), Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    want = lambda s: a.only is None or s in a.only
    res = {"device": str(device), "gpu": _gpu_name(device), "cpu": _cpu_name(), "cores": len(os.sched_getaffinity(0)),
           "threads": torch.get_num_threads(), "torch": torch.__version__, "quick": a.quick, "commit": _commit(),
           "date": time.strftime("%Y-%m-%d %H:%M")}
    if want("peak"):
        res["matmul_peak_gflop_s"] = {str(dt).split(".")[-1]: round(matmul_peak(device, dt), 1)
                                      for dt in (torch.float32, torch.bfloat16)}
        print("matmul peak GFLOP/s:", res["matmul_peak_gflop_s"], flush=True)
    tag = "".join(f"_{k}" for k in ("quick", "check", "tiny") if getattr(a, k))
    path = out / f"bench_{device.type}{tag}.json"
    old = json.loads(path.read_text()) if path.exists() and a.only else {}
    save = lambda: path.write_text(json.dumps({**old, **res}, indent=1))
    save()
    for name, fn in (("step", lambda: section_step(device, a.quick)),
                     ("pair", lambda: section_pair(device, a.quick)),
                     ("profile", lambda: section_profile(device, a.quick, out)),
                     ("scaling", lambda: section_scaling(device, a.quick)),
                     ("shared_cores", lambda: section_shared_cores(device, a.quick)),
                     ("data", lambda: section_data(a.quick)),
                     ("loader", lambda: section_loader(device, a.quick, Path(a.jpeg_src))),
                     ("fit", lambda: section_fit(device, a.quick, Path(a.jpeg_src))),
                     ("probe", lambda: section_probe(a.quick)),
                     ("fkd", lambda: section_fkd(device, a.quick)),
                     ("students", lambda: section_students(device, a.quick))):
        if want(name):
            print(f"[{name}]", flush=True)
            res[name] = fn()
            save()  # after every section: a failure later loses nothing measured
    print(f"wrote {path}")
    print_tables({**old, **res})


IMAGENET_TRAIN = 1_281_167
THESIS = dict(gpu="RTX 4090", distill_hours=6.9, epochs=10)  # seed 000: the 10-epoch ImageNet distillation


def step_table(res: dict):
    """The step rows with MFU (counted FLOPs / time / the bf16 or fp32 matmul peak measured beside the step, in its
    process; rows saved before that field: the run's peak, measured once at its start) and ratios."""
    import pandas as pd
    d = pd.DataFrame(res["step"])
    peak = res.get("matmul_peak_gflop_s", {})
    fp32 = d.kind.isin(["plain", "ours_fp32"])
    own = d.peak_gflop_s if "peak_gflop_s" in d else [float("nan")] * len(d)
    d["MFU_%"] = [round(100 * g / (p if p == p else peak.get("float32" if f else "bfloat16", float("nan"))), 1)
                  for g, f, p in zip(d.achieved_gflop_s, fp32, own)]
    ref = "timm_bf16" if (d.kind == "timm_bf16").any() else "plain"
    base = d[d.kind == ref].set_index(["img", "batch"])
    distill = ~d.kind.str.startswith("finetune")
    def ratio(r, col):
        return round(r[col] / base.loc[(r.img, r.batch), col], 2) if (r.img, r.batch) in base.index and r.distill \
            else None
    d["distill"] = distill
    d[f"x_{ref}_speed"] = [ratio(r, "images_per_s") for _, r in d.iterrows()]
    d[f"x_{ref}_mem"] = [ratio(r, "peak_mem_mb") for _, r in d.iterrows()]
    return d.drop(columns="distill"), ref


def projection(res: dict) -> list[dict]:
    "The seeds' ImageNet runs at the measured rates: 10-epoch distillation (000 Table 1), 15-epoch finetune (Table 2)."
    import pandas as pd
    d = pd.DataFrame(res["step"])
    d = d[(d.img == 224) & d.kind.isin(["ours_bf16", "ours_compile", "timm_bf16", "finetune_bf16", "finetune_compile"])]
    loader = max((r["loader_images_per_s"] for r in res.get("loader", [])), default=None)
    rows = []
    for what, kinds, epochs in (("distillation, 10 epochs", ("ours_bf16", "ours_compile"), 10),
                                ("distillation, 10 epochs (timm peer)", ("timm_bf16",), 10),
                                ("finetune, 15 epochs", ("finetune_bf16", "finetune_compile"), 15)):
        sel = d[d.kind.isin(kinds)]
        if sel.empty: continue
        best = sel.loc[sel.images_per_s.idxmax()]
        rate = min(best.images_per_s, loader) if loader else best.images_per_s
        rows.append(dict(run=what, step=f"{best.kind}, batch {best.batch}", step_images_per_s=best.images_per_s,
                         loader_images_per_s=loader, hours=round(epochs * IMAGENET_TRAIN / rate / 3600, 2),
                         hours_if_loader_kept_up=round(epochs * IMAGENET_TRAIN / best.images_per_s / 3600, 2),
                         thesis_hours=THESIS["distill_hours"] if epochs == THESIS["epochs"] else None))
    return rows


def print_tables(res: dict):
    "The results as tables: the step with MFU and ratios, the seeds' runs projected, then each other section."
    import pandas as pd
    pd.set_option("display.width", 200)
    if res.get("step"):
        d, ref = step_table(res)
        print(f"\ndistillation step on {res.get('gpu') or res['device']} "
              f"(matmul peak GFLOP/s: {res.get('matmul_peak_gflop_s')})")
        cols = ["kind", "img", "batch", "images_per_s", f"x_{ref}_speed", "peak_mem_mb", f"x_{ref}_mem",
                "achieved_gflop_s", "MFU_%"]
        print(d[cols].to_string(index=False))
        if res["device"].startswith("cuda"):
            print(f"\nthe seeds' ImageNet-1K runs projected at these rates (thesis: {THESIS['distill_hours']} h for "
                  f"the 10-epoch distillation on one {THESIS['gpu']})")
            print(pd.DataFrame(projection(res)).to_string(index=False))
    for name in ("pair", "profile", "scaling", "shared_cores", "data", "loader", "fit", "probe", "fkd", "students"):
        if res.get(name): print(f"\n{name}"); print(pd.DataFrame(res[name]).to_string(index=False))


def _commit():
    "The code measured: git's HEAD, '-dirty' with uncommitted changes to tracked files (None outside git)."
    from kdnb.files import git_commit
    return git_commit(ROOT)


def _cpu_name():
    try: return next(l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name"))
    except (OSError, StopIteration): return "unknown"


if __name__ == "__main__":
    main()
