"""The evidence pipeline's distillation stages of one seed, at its CPU size, as three stages (one_teacher_pass=False)
and as one stage of three students (one_teacher_pass=True): their train times, and whether each student's weights
are bit for bit its own stage's. The teacher and the other donor are 2-step pretrainings: a distillation step's time
does not depend on the teacher's weights. Run alone, on a pinned commit (about 4 minutes on 2 cores):

    python bench/students_pipeline.py runs/evid     # writes runs/evid/timing.json

results/bench/students_evidence_cpu.json is its output at 5a8ac26 (with the commit and machine added), which the
benchmarks page reads.
"""
import json, sys, time, torch
from pathlib import Path
import kdnb.runs, kdnb.pipeline
from kdnb.config import get_config
from kdnb.runs import run
from kdnb.pipeline import stage_configs, ARMS
from safetensors.torch import load_file
out = Path(sys.argv[1])
p = get_config("evidence_cifar10", out_dir=str(out), seeds=1, resume=False)  # data: ../shared/data/cifar10
new, old = stage_configs(p), stage_configs(p.replace(one_teacher_pass=False))
for name in ("pretrain_teacher", "pretrain_donor"):
    if not (out / name / "summary.json").exists(): run(new[name].replace(max_steps=2, tensorboard=False))
res = {}
for label, names, st in (("three stages", ["distill", "distill_other", "distill_random"], old), ("one stage", ["distill"], new)):
    t0 = time.perf_counter()
    for n in names:
        cfg = st[n].replace(out_dir=str(out / label.replace(" ", "_") / n), tensorboard=False)
        s = run(cfg)
        res.setdefault(label, []).append(dict(stage=n, train_time_s=s["train_time_s"], wall_time_s=s["wall_time_s"], steps=s["steps"]))
    res[label + " total wall s"] = round(time.perf_counter() - t0, 1)
    print(label, res[label], res[label + " total wall s"], flush=True)
same = {}
for sx, name in ARMS.items():
    a = load_file(str(out / "three_stages" / f"distill{sx}" / "checkpoints" / "last" / "model.safetensors"))
    b = load_file(str(out / "one_stage" / "distill" / "students" / name / "checkpoints" / "last" / "model.safetensors"))
    same[name] = all(torch.equal(a[k], b[k]) for k in a)
res["bitwise_equal"] = same
res["threads"] = torch.get_num_threads()
print(json.dumps(res, indent=1))
(out / "timing.json").write_text(json.dumps(res, indent=1))
