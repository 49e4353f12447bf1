"""Checkpoints under crashes: every write, fsync, rename and delete of the save protocol fails in turn, and a
training process is killed with SIGKILL at random times. After each, a new trainer on the run folder must
resume from a complete checkpoint (the previous one or the new one, bit for bit), never from step 0 while
weights exist, and the next save must leave no orphaned folders."""

import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import labkit.rl.checkpoint as ckpt
from labkit.models import load_lm
from labkit.rl import PPOConfig, PPOTrainer
from labkit.tasks import SENTIMENT

PROMPTS = ["It was late. The rain stopped and she waited.", "One. Two words here. And more."]
TASK = SENTIMENT.with_(response_length=6, truncation=None)


def make(run_dir, save_every=1):
    model, tok = load_lm("tiny", device="cpu")
    # total_updates: the killed run below trains 24 updates, every one of them at a learning rate above 0
    cfg = PPOConfig(batch_size=4, minibatch_size=2, ppo_epochs=1, lr=1e-3, total_updates=30, kl_target=1.0,
                    init_beta=0.2, kl_horizon=100, save_every=save_every)
    return PPOTrainer(model, tok, TASK, lambda q, r: [s.count(".") + 0.1 * len(s) for s in r], PROMPTS, cfg,
                      run_dir=run_dir, verbose=False)


def params(t):
    return [p.detach().clone() for p in t.params]


@pytest.fixture(scope="module")
def run_after(tmp_path_factory):
    """A run folder checkpointed after update 1 (not yet after 2), and the weights after updates 1 and 2."""
    run = tmp_path_factory.mktemp("crash") / "run"
    t = make(run)
    t.step()
    one = params(t)
    t.config.save_every = 0
    t.step()
    return run, one, params(t)


class Crash(Exception):
    pass


OPS = [(os, "replace"), (os, "fsync"), (ckpt, "_write_tensors"), (ckpt, "_write_file"), (ckpt, "_fsync_dir"),
       (shutil, "rmtree")]


def _count_calls(monkeypatch, action) -> dict:
    counts = {name: 0 for _, name in OPS}
    for module, name in OPS:
        real = getattr(module, name)

        def counting(*a, _real=real, _name=name, **kw):
            counts[_name] += 1
            return _real(*a, **kw)

        monkeypatch.setattr(module, name, counting)
    action()
    return counts


def _save_with_crash(monkeypatch, t, name, k):
    module = {n: m for m, n in OPS}[name]
    real, calls = getattr(module, name), []

    def failing(*a, **kw):
        calls.append(1)
        if len(calls) == k:
            raise Crash(f"{name} call {k}")
        return real(*a, **kw)

    with monkeypatch.context() as m:
        m.setattr(module, name, failing)
        with pytest.raises(Crash):
            t.save()


@pytest.mark.parametrize("again", [False, True], ids=["new step", "step saved again"])
def test_a_crash_at_any_call_of_the_save_protocol_leaves_a_complete_checkpoint(run_after, tmp_path, monkeypatch, again):
    """For each operation of the protocol and each of its calls k in one save (counted on a clean save), make
    the k-th call fail (no cleanup code runs after it, so this is what a kill there leaves), then resume."""
    src, after_one, after_two = run_after

    def prepared(where):
        shutil.copytree(src, where)
        t = make(where, save_every=0)
        t.step()  # update 2, not saved yet
        if again:  # the step saved twice: the second save replaces a complete folder
            t.save()
        return t

    with monkeypatch.context() as m:
        counts = _count_calls(m, prepared(tmp_path / "count").save)
    assert counts["replace"] == (2 if again else 1) and counts["_write_tensors"] == 1 and counts["_write_file"] == 2
    assert counts["fsync"] == 5 and counts["_fsync_dir"] == 2  # 3 files, the folder, its parent
    for name, n in counts.items():
        for k in range(1, n + 1):
            run = tmp_path / f"{name}-{k}"
            _save_with_crash(monkeypatch, prepared(run), name, k)
            resumed = make(run)
            assert resumed.step_count == 2 if again else resumed.step_count in (1, 2), (name, k)
            expected = after_one if resumed.step_count == 1 else after_two  # the old checkpoint or the new, whole
            assert all(torch.equal(a, b) for a, b in zip(params(resumed), expected)), (name, k)
            resumed.train(2, progress=False)  # two more saves: what the crash left is cleaned up by then
            assert sorted(p.name for p in (run / "checkpoints").iterdir()) == [
                f"step-{resumed.step_count - 1:06d}", f"step-{resumed.step_count:06d}"], (name, k)
            assert all(ckpt.is_complete(p) is not None for p in (run / "checkpoints").iterdir())


# --------------------------------------------------------------------------------------------------
# SIGKILL at random times, then the run started again until it is done: equal to a run never killed

TRAIN = """
import sys
sys.path.insert(0, {tests!r})
from test_checkpoint_crashes import make
t = make({run!r})
while t.step_count < {n}:
    t.step()
    print("update", t.step_count, flush=True)
"""


def _train(run: Path, n: int) -> subprocess.Popen:
    code = TRAIN.format(tests=str(Path(__file__).parent), run=str(run), n=n)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)


@pytest.mark.slow
def test_sigkill_at_random_times_then_resume_equals_the_run_never_killed(tmp_path):
    n = 24
    straight = _train(tmp_path / "straight", n)
    rng = random.Random(0)
    kills = 0
    for _ in range(3):
        p = _train(tmp_path / "killed", n)
        # wait for this process's first update, then kill it somewhere inside a later update or its save
        first = p.stdout.readline()
        if not first:  # the run was already done
            assert p.wait() == 0, p.stderr.read().decode()[-2000:]
            break
        time.sleep(rng.uniform(0.0, 1.0))
        p.send_signal(signal.SIGKILL)
        p.wait()
        kills += 1
    assert kills >= 2
    p = _train(tmp_path / "killed", n)
    assert p.wait(timeout=300) == 0, p.stderr.read().decode()[-2000:]
    assert straight.wait(timeout=300) == 0, straight.stderr.read().decode()[-2000:]

    from safetensors.torch import load_file

    a = load_file(str(ckpt.latest(tmp_path / "straight") / "state.safetensors"))
    b = load_file(str(ckpt.latest(tmp_path / "killed") / "state.safetensors"))
    # torch's global generator starts from a random seed in each process and no update draws from it (sampling
    # uses the trainer's own generator): it is saved for user code, and differs between the two runs
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a if k != "rng.torch_cpu")
    steps = [json.loads(line)["step"] for line in (tmp_path / "killed" / "metrics.jsonl").read_text().splitlines()]
    assert steps == list(range(1, n + 1))  # no update twice, none missing
    assert [p.name for p in (tmp_path / "killed" / "checkpoints").iterdir()] != []
    assert not [p for p in (tmp_path / "killed" / "checkpoints").iterdir() if not p.name.startswith("step-")]
