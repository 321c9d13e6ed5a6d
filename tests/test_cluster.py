"""Training that survives a cluster: preemption (SIGTERM/SIGUSR1), elastic restarts (`resume=auto` under
`torchrun --max-restarts`), a full disk at every write, and a failing rank. Each test failed before its fix."""
import errno
import json
import os
import pathlib
import signal
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import load_file

import kdnb.runs  # noqa: F401  registers every objective
import kdnb.config
import kdnb.engine
from kdnb.config import ConfigError, get_config
from kdnb.distill import distill
from kdnb.engine import Callback, Checkpointer
from kdnb.files import Preempted, PREEMPTED_EXIT

TINY = dict(device="cpu", train_subset=256, batch_size=32, log_every=1, tensorboard=False, epochs=2)
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


def cfg_of(out, **kw):
    return get_config("distill_cpu", out_dir=str(out), **{**TINY, **kw})


def weights(run):
    return load_file(str(pathlib.Path(run) / "checkpoints" / "last" / "model.safetensors"))


def same(a, b):
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


class SignalAt(Callback):
    "Send this process `signals` after step `step` (order 0: before the Preemption callback reads them)."
    def __init__(self, step, *signals): self.step, self.signals = step, signals or (signal.SIGTERM,)
    def after_step(self, t):
        if t.step == self.step:
            for s in self.signals: os.kill(os.getpid(), s)


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGUSR1])
def test_preemption_checkpoints_the_step_and_resumes_exactly(tmp_path, sig):
    full = distill(cfg_of(tmp_path / "full"))
    with pytest.raises(Preempted, match=f"{sig.name} at step 5"):
        distill(cfg_of(tmp_path / "p"), callbacks=[SignalAt(5, sig)])
    s = json.loads((tmp_path / "p" / "summary.json").read_text())
    assert (s["finished"], s["preempted"], s["steps"]) == (False, sig.name, 5) and "error" not in s
    state = torch.load(tmp_path / "p" / "checkpoints" / "last" / "state.pt", weights_only=True)
    assert state["step"] == 5  # mid-epoch, without ckpt_every: the preemption's own checkpoint
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # the handlers are given back after the run
    done = distill(cfg_of(tmp_path / "p", resume="auto"))
    assert done["finished"] and done["steps"] == full["steps"] and "preempted" not in done
    assert same(weights(tmp_path / "full"), weights(tmp_path / "p"))


DRIVER = """
import os, signal, sys
import kdnb.engine as E
from kdnb.cli import main
STEP, SIGNALS, RANK = int(sys.argv[1]), sys.argv[2], sys.argv[3]
class Act(E.Callback):
    def after_step(self, t):
        first = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") == "0"
        if t.step == STEP and first and RANK in ("any", str(t.dist.rank)):
            for s in SIGNALS.split(","):
                if s == "raise": raise RuntimeError("rank %d failed on purpose" % t.dist.rank)
                os.kill(os.getpid(), getattr(signal, s))
base = E.default_callbacks
E.default_callbacks = lambda *a, **k: base(*a, **k) + [Act()]
sys.exit(main(sys.argv[4:]))
"""


def driver(tmp_path, step, signals, rank="any"):
    "A script (torchrun needs a file) that runs `kdnb` and acts at `step` on its first start: signals, or raise."
    (tmp_path / "driver.py").write_text(DRIVER)
    return [str(tmp_path / "driver.py"), str(step), signals, rank]


def distill_args(out, *extra):
    return ["distill", "--preset", "distill_cpu", "--device", "cpu", "--train_subset", "256", "--batch_size", "32",
            "--log_every", "1", "--tensorboard", "false", "--epochs", "2", "--out_dir", str(out), *extra]


def test_cli_preemption_says_how_to_resume_and_exits_143(tmp_path):
    r = subprocess.run([sys.executable, *driver(tmp_path, 4, "SIGTERM"), *distill_args(tmp_path / "p")], env=ENV,
                       capture_output=True, text=True)
    assert r.returncode == PREEMPTED_EXIT, r.stderr[-2000:]
    last = r.stderr.strip().splitlines()[-1]
    assert "preempted (SIGTERM at step 4), checkpoint saved" in last and "--resume true" in last, last
    assert "Traceback" not in r.stderr


def test_a_second_signal_ends_the_run_at_once(tmp_path):
    r = subprocess.run([sys.executable, *driver(tmp_path, 4, "SIGTERM,SIGTERM"), *distill_args(tmp_path / "p")], env=ENV,
                       capture_output=True, text=True)
    assert r.returncode == -signal.SIGTERM, (r.returncode, r.stderr[-2000:])
    assert not (tmp_path / "p" / "summary.json").exists()  # ended at once: no step finished, no summary written


def test_resume_auto_starts_continues_or_refuses(tmp_path):
    out = tmp_path / "run"
    assert distill(cfg_of(out, resume="auto", max_steps=3))["steps"] == 3  # an empty folder: it starts
    assert distill(cfg_of(out, resume="auto", max_steps=6))["steps"] == 6  # a checkpoint of this run: it continues
    with pytest.raises(ConfigError, match="lr: 0.001 -> 0.002"):  # another run's checkpoint: refused
        distill(cfg_of(out, resume="auto", max_steps=6, lr=2e-3))
    with pytest.raises(ConfigError, match="resume='yes'"):
        cfg_of(out, resume="yes")
    stale = tmp_path / "stale"  # an earlier start died before its first checkpoint: started again, old metrics kept
    stale.mkdir()
    (stale / "metrics.jsonl").write_text('{"kind": "step", "step": 1}\n')
    assert distill(cfg_of(stale, resume="auto", max_steps=2))["finished"]
    assert len(list(stale.glob("metrics.before-restart-*.jsonl"))) == 1


def torchrun(*args, restarts=0, port=29531):
    # c10d rendezvous: a restarted round meets afresh (the static one's store keeps the first round's addresses)
    return [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--max-restarts", str(restarts),
            "--rdzv-backend", "c10d", "--rdzv-endpoint", f"127.0.0.1:{port}", *args]


def test_elastic_restart_after_a_killed_worker_matches_an_uninterrupted_run(tmp_path):
    "One worker of two is SIGKILLed mid-run; torchrun restarts both with the same command line (resume=auto)."
    extra = ("--ckpt_every", "3", "--resume", "auto")
    r = subprocess.run(torchrun("-m", "kdnb.cli", *distill_args(tmp_path / "full", *extra), port=29532), env=ENV,
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-3000:]
    r = subprocess.run(torchrun(*driver(tmp_path, 7, "SIGKILL", "1"), *distill_args(tmp_path / "el", *extra), restarts=1,
                                port=29533), env=ENV, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "restart" in r.stderr.lower() or "Restarting" in r.stderr, r.stderr[-3000:]
    s = json.loads((tmp_path / "el" / "summary.json").read_text())
    assert s["finished"] and s["steps"] == 16 and s["world_size"] == 2
    assert same(weights(tmp_path / "full"), weights(tmp_path / "el"))


def test_a_failing_rank_stops_the_run_soon_and_is_named(tmp_path):
    t0 = time.time()
    r = subprocess.run(torchrun(*driver(tmp_path, 5, "raise", "1"), *distill_args(tmp_path / "f", "--ckpt_every", "2"),
                                port=29534), env=ENV, capture_output=True, text=True, timeout=600)
    secs = time.time() - t0
    assert r.returncode != 0
    assert "kdnb distill (rank 1 of 2): rank 1 failed on purpose" in r.stderr, r.stderr[-3000:]
    assert secs < 120, f"the run took {secs:.0f} s to stop"
    last = Checkpointer.find(tmp_path / "f" / "checkpoints")
    assert torch.load(last / "state.pt", weights_only=True)["step"] == 4 and load_file(str(last / "model.safetensors"))


# --- a full disk at each write: the write fails, the previous checkpoint stays whole, nothing is half-written
def enospc(*a, **k):
    raise OSError(errno.ENOSPC, "No space left on device")


class FullDiskAfter(Callback):
    "From step `step` on, the write `target` fails with ENOSPC."
    def __init__(self, monkeypatch, step, target): self.mp, self.step, self.target = monkeypatch, step, target
    def after_step(self, t):
        if t.step != self.step: return
        real_open, real_write = open, pathlib.Path.write_bytes
        if self.target == "weights": self.mp.setattr(kdnb.engine, "save_weights", enospc)
        if self.target == "state": self.mp.setattr(torch, "save", enospc)
        if self.target == "metrics":
            self.mp.setattr(kdnb.engine, "open", lambda p, *a, **k: FailingFile(real_open(p, *a, **k)), raising=False)
        if self.target in ("config", "summary"):
            name = {"config": ".config.yaml.tmp", "summary": ".summary.json.tmp"}[self.target]
            def write(path, data):
                if path.name == name:
                    real_write(path, data[: len(data) // 2])  # half of it reaches the disk, then it is full
                    enospc()
                return real_write(path, data)
            self.mp.setattr(pathlib.Path, "write_bytes", write)


class FailingFile:
    "A file whose writes put half the text on disk, then fail with ENOSPC."
    def __init__(self, f): self.f = f
    def __enter__(self): return self
    def __exit__(self, *a): self.f.close()
    def write(self, text):
        self.f.write(text[: len(text) // 2])
        self.f.flush()
        enospc()
    def flush(self): self.f.flush()


@pytest.mark.parametrize("target", ["weights", "state", "config", "metrics", "summary"])
def test_a_full_disk_at_each_write_loses_nothing(tmp_path, monkeypatch, target):
    full = tmp_path / "full"
    distill(cfg_of(full, ckpt_every=3))
    out = tmp_path / "run"
    step = 15 if target == "summary" else 4  # the summary is written at the end
    with pytest.raises(OSError, match=f"cannot write .* to .*{tmp_path.name}.*disk is full"):
        distill(cfg_of(out, ckpt_every=3), callbacks=[FullDiskAfter(monkeypatch, step, target)])
    monkeypatch.undo()
    ck = out / "checkpoints"
    last = Checkpointer.find(ck)
    kept = 16 if target == "summary" else 3  # the previous checkpoint (the summary comes after the final one), whole
    assert torch.load(last / "state.pt", weights_only=True)["step"] == kept
    assert load_file(str(last / "model.safetensors"))
    assert not list(ck.glob(".*.tmp")) and not list(out.glob(".*.tmp"))  # no half-written file left
    for line in (out / "metrics.jsonl").read_text().splitlines(): json.loads(line)  # every record whole
    if (out / "summary.json").exists(): json.loads((out / "summary.json").read_text())
    distill(cfg_of(out, ckpt_every=3, resume=True))
    assert same(weights(full), weights(out))


def test_sigterm_to_the_whole_process_group_with_loader_workers(tmp_path):
    "SLURM signals every process of the job, loader workers included: the run still stops with a whole checkpoint."
    args = distill_args(tmp_path / "g", "--num_workers", "2", "--epochs", "30")
    p = subprocess.Popen([sys.executable, "-m", "kdnb.cli", *args], env=ENV, start_new_session=True,
                         stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    metrics = tmp_path / "g" / "metrics.jsonl"
    deadline = time.time() + 120
    while time.time() < deadline and p.poll() is None:
        if metrics.exists() and len(metrics.read_text().splitlines()) >= 5: break
        time.sleep(0.05)
    os.killpg(p.pid, signal.SIGTERM)
    err = p.communicate(timeout=120)[1]
    assert p.returncode == PREEMPTED_EXIT, err[-2000:]
    s = json.loads((tmp_path / "g" / "summary.json").read_text())
    assert s["preempted"] == "SIGTERM" and not s["finished"] and s["steps"] < 240
    state = torch.load(tmp_path / "g" / "checkpoints" / "last" / "state.pt", weights_only=True)
    assert state["step"] == s["steps"]
    r = subprocess.run([sys.executable, "-m", "kdnb.cli", *args, "--resume", "auto", "--max_steps", str(s["steps"] + 3)],
                       env=ENV, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-2000:]


def test_preemption_under_torchrun_stops_every_rank_at_one_step(tmp_path):
    "SIGTERM to one rank of two: both stop after the same step, one checkpoint; the restart ends as an uninterrupted run."
    extra = ("--resume", "auto")
    r = subprocess.run(torchrun("-m", "kdnb.cli", *distill_args(tmp_path / "full", *extra), port=29535), env=ENV,
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    r = subprocess.run(torchrun(*driver(tmp_path, 4, "SIGTERM", "1"), *distill_args(tmp_path / "p", *extra),
                                port=29536), env=ENV, capture_output=True, text=True, timeout=600)
    assert r.returncode != 0
    assert "kdnb distill (rank 1 of 2): preempted (SIGTERM at step 4)" in r.stderr, r.stderr[-3000:]
    assert "kdnb distill (rank 0 of 2): preempted (a signal to another rank at step 4)" in r.stderr, r.stderr[-3000:]
    assert torch.load(tmp_path / "p" / "checkpoints" / "last" / "state.pt", weights_only=True)["step"] == 4
    assert json.loads((tmp_path / "p" / "summary.json").read_text())["finished"] is False
    r = subprocess.run(torchrun("-m", "kdnb.cli", *distill_args(tmp_path / "p", *extra), port=29537), env=ENV,
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    assert same(weights(tmp_path / "full"), weights(tmp_path / "p"))
