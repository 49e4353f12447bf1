"""Scale-out: job files, the data-parallel helpers on 2 gloo processes, and both commands under `accelerate launch`.

Three tiers:
- job files and single-process behaviour (milliseconds);
- the helpers of labkit.distributed on 2 spawned gloo processes against the single-process computation on
  the concatenated data: global mean/std, whitening, gradient averaging (equal and unequal shares);
- `accelerate launch --multi_gpu --num_processes 2 -m labkit.scale.cli ...` on the tiny model, on CPU (gloo):
  identical weights on both processes and in the checkpoint, files written once, and a 2-process reward
  model equal to the 1-process one trained on the same batches.
"""

import json
import os
import re
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import torch

from labkit import distributed
from labkit.rl.checkpoint import latest

TINY_TASK = {"response_length": 4, "query_length": 16, "truncation": None}
WORDS = ["table", "window", "river", "stone", "paper", "green", "seven"]


# --------------------------------------------------------------------------------------------------
# job files


def _ppo_job(tmp_path):
    from labkit.rl import PPOConfig
    from labkit.scale.jobs import PPOJob

    return PPOJob(run_dir=str(tmp_path / "run"), n_updates=3, model="tiny", task="sentiment",
                  task_overrides={"response_length": 4, "truncation": {"text": ".", "after": 2}},
                  ppo=PPOConfig(batch_size=4, lr=3e-4, init_beta=None, kl_target=None))


@pytest.mark.parametrize("suffix", [".yaml", ".yml", ".json"])
def test_jobs_round_trip_through_yaml_and_json(tmp_path, suffix):
    from labkit.reward import RewardConfig
    from labkit.scale.jobs import PPOJob, RewardJob
    from labkit.tasks import TruncationRule

    job = _ppo_job(tmp_path)
    path = job.save(tmp_path / f"ppo{suffix}")
    text = path.read_text()
    assert text.lstrip().startswith("{") == (suffix == ".json")
    assert PPOJob.load(path) == job
    task = PPOJob.load(path).task_spec()
    assert task.response_length == 4 and task.truncation == TruncationRule(".", 2) and task.name == "sentiment"

    rjob = RewardJob(labels="labels.db", output_dir="rm", reward=RewardConfig(batch_size=8, lr=1e-4))
    assert RewardJob.load(rjob.save(tmp_path / f"rm{suffix}")) == rjob


def test_job_files_with_unknown_keys_or_for_the_other_command_are_refused(tmp_path):
    import yaml

    from labkit.scale.jobs import PPOJob, RewardJob

    good = yaml.safe_load(_ppo_job(tmp_path).save(tmp_path / "ppo.yaml").read_text())

    def write(data):
        (tmp_path / "bad.yaml").write_text(yaml.safe_dump(data))
        return tmp_path / "bad.yaml"

    with pytest.raises(ValueError, match=r"Unknown .* keys \['n_update'\]; known keys: .*'n_updates'"):
        PPOJob.load(write({**good, "n_update": 3}))
    with pytest.raises(ValueError, match=r"Unknown .*: ppo keys \['batchsize'\]; known keys: .*'batch_size'"):
        PPOJob.load(write({**good, "ppo": {"batchsize": 4}}))
    with pytest.raises(ValueError, match=r"Unknown task_overrides \['respons_length'\]; known task fields: .*'response_length'"):
        PPOJob.load(write({**good, "task_overrides": {"respons_length": 4}}))
    with pytest.raises(ValueError, match=r"lacks the required keys \['run_dir'\]"):
        PPOJob.load(write({k: v for k, v in good.items() if k != "run_dir"}))
    with pytest.raises(ValueError, match="is a job for `labkit ppo`, not `labkit train-reward`"):
        RewardJob.load(tmp_path / "ppo.yaml")
    with pytest.raises(KeyError, match="Unknown task 'sentimnet'"):
        PPOJob.load(write({**good, "task": "sentimnet"}))
    with pytest.raises(FileNotFoundError, match="PPOJob"):
        PPOJob.load(tmp_path / "missing.yaml")


def test_in_one_process_the_helpers_are_the_plain_computations():
    from labkit.rl.advantages import global_whiten, whiten

    assert (distributed.rank(), distributed.world_size(), distributed.is_main()) == (0, 1, True)
    assert distributed.process_seed(7) == 7 and distributed.shard([1, 2, 3]) == [1, 2, 3]
    x = torch.randn(4, 6, generator=torch.Generator().manual_seed(0))
    assert torch.equal(global_whiten(x, shift_mean=False), whiten(x, shift_mean=False))
    mean, std = distributed.global_mean_std(x)
    assert torch.equal(mean, x.mean()) and torch.equal(std, x.std(unbiased=False))
    p = torch.nn.Parameter(torch.ones(3))
    p.grad = torch.full((3,), 2.0)
    distributed.average_gradients([p])
    assert torch.equal(p.grad, torch.full((3,), 2.0))
    assert distributed.mean_over_processes({"a": 1.5}) == {"a": 1.5}
    assert distributed.run_on_main(lambda: 42) == 42


@pytest.mark.parametrize("env, message", [
    ({"ACCELERATE_USE_DEEPSPEED": "true"}, "launched with DeepSpeed, which it does not run.*fsdp.yaml.*fsdp_reshard_after_forward: false"),
    ({"ACCELERATE_USE_FSDP": "true", "FSDP_VERSION": "1"}, "FSDP2 .* only; this launch asks for FSDP version 1. Set `fsdp_version: 2`"),
    ({"ACCELERATE_USE_FSDP": "true", "FSDP_VERSION": "2", "FSDP_OFFLOAD_PARAMS": "true"}, "does not support `fsdp_offload_params: true`"),
])
def test_launch_settings_labkit_cannot_run_are_refused_with_a_clear_message(tmp_path, monkeypatch, env, message):
    from labkit.scale import cli

    job = _ppo_job(tmp_path).save(tmp_path / "ppo.yaml")
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    with pytest.raises(RuntimeError, match=message):
        cli.main(["ppo", str(job)])
    assert not (tmp_path / "run").exists()


def test_a_missing_label_store_is_an_error_not_an_empty_store(tmp_path):
    from labkit.scale.cli import train_reward
    from labkit.scale.jobs import RewardJob

    with pytest.raises(FileNotFoundError, match="Label store .*nope.db does not exist"):
        train_reward(RewardJob(labels=str(tmp_path / "nope.db"), output_dir=str(tmp_path / "rm")), torch.device("cpu"))
    assert not (tmp_path / "nope.db").exists()


# --------------------------------------------------------------------------------------------------
# the helpers on 2 gloo processes vs one process on the concatenated data


def _data():
    g = torch.Generator().manual_seed(0)
    return {
        "x": torch.randn(8, generator=g) * 3 + 1,  # rank 0 gets 3 values, rank 1 five
        "adv": torch.randn(4, 6, generator=g) * 2 - 0.5,  # (ranks x 2, T): 2 rows each
        "features": torch.randn(5, 4, 3, generator=g),  # 5 comparisons, k = 4 responses, 3 features
        "best": torch.tensor([0, 3, 1, 2, 3]),
        "w0": torch.randn(3, generator=g),
    }


def _kway_grad(w0, features, best, batch, world=1):
    """The reward trainer's weighted share of the k-way loss over `batch` (indices), and its gradient."""
    from labkit.reward import kway_loss

    w = torch.nn.Parameter(w0.clone())
    mine = distributed.shard(batch)
    if mine:
        loss, _ = kway_loss(features[mine] @ w, best[mine])
        (loss * (len(mine) * world / len(batch))).backward()
    return w


def _worker(rank, world, init_file, out_dir):
    import torch.distributed as dist

    from labkit.rl.advantages import global_whiten

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    d = _data()
    out = {"seed": distributed.process_seed(5), "shard": distributed.shard(list(range(5)))}
    mine = d["x"][:3] if rank == 0 else d["x"][3:]
    out["mean"], out["std"] = distributed.global_mean_std(mine)
    rows = d["adv"][2 * rank : 2 * rank + 2]
    out["whitened"] = global_whiten(rows)
    out["rescaled"] = global_whiten(rows, shift_mean=False)
    for name, batch in (("grad_all", [0, 1, 2, 3, 4]), ("grad_one", [3])):  # shares 3 + 2; 1 + none
        w = _kway_grad(d["w0"], d["features"], d["best"], batch, world)
        distributed.average_gradients([w])
        out[name] = w.grad
    out["metrics"] = distributed.mean_over_processes({"a": float(rank), "b": 2.0})
    out["max"] = distributed.max_over_processes(3 + 2 * rank)
    p = torch.full((3,), float(rank))
    try:
        distributed.check_same_weights([p])
    except RuntimeError as e:
        out["differ"] = str(e)
    distributed.broadcast_parameters([p])
    out["same_after_broadcast"] = distributed.check_same_weights([p])

    def fail():
        raise ValueError("no labels")

    try:
        distributed.run_on_main(fail)
    except Exception as e:  # noqa: BLE001
        out["error"] = f"{type(e).__name__}: {e}"
    dist.destroy_process_group()
    torch.save(out, Path(out_dir) / f"rank{rank}.pt")


def test_two_gloo_processes_compute_what_one_process_computes_on_all_the_data(tmp_path):
    from labkit.rl.advantages import whiten

    torch.multiprocessing.spawn(_worker, args=(2, str(tmp_path / "init"), str(tmp_path)), nprocs=2, join=True)
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt") for r in (0, 1))
    d = _data()
    assert (r0["seed"], r1["seed"]) == (5, 5 + 100003)
    assert (r0["shard"], r1["shard"]) == ([0, 2, 4], [1, 3])
    # reward normalisation: global mean and POPULATION std over the union of both processes' samples
    for r in (r0, r1):
        torch.testing.assert_close(r["mean"], d["x"].mean(), rtol=0, atol=1e-6)
        torch.testing.assert_close(r["std"], d["x"].std(unbiased=False), rtol=0, atol=1e-6)
    # whitening of rewards / advantages over the whole batch
    torch.testing.assert_close(torch.cat([r0["whitened"], r1["whitened"]]), whiten(d["adv"]), rtol=0, atol=1e-5)
    torch.testing.assert_close(torch.cat([r0["rescaled"], r1["rescaled"]]), whiten(d["adv"], shift_mean=False),
                               rtol=0, atol=1e-5)
    # gradient averaging: 2 processes with unequal shares (and one with none) = 1 process with the whole batch
    for name, batch in (("grad_all", [0, 1, 2, 3, 4]), ("grad_one", [3])):
        single = _kway_grad(d["w0"], d["features"], d["best"], batch).grad
        for r in (r0, r1):
            torch.testing.assert_close(r[name], single, rtol=1e-5, atol=1e-7)
    assert r0["metrics"] == r1["metrics"] == {"a": 0.5, "b": 2.0}
    assert r0["max"] == r1["max"] == 5
    assert "ranks [1] differ from rank 0" in r0["differ"] and r0["differ"] == r1["differ"]
    assert r0["same_after_broadcast"] == r1["same_after_broadcast"]
    assert r0["error"] == "ValueError: no labels"
    assert r1["error"] == "RuntimeError: The main process failed: ValueError: no labels"


# --------------------------------------------------------------------------------------------------
# both commands under `accelerate launch`, 2 CPU processes


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


EXAMPLES = Path(__file__).resolve().parent.parent / "examples" / "accelerate"


def _launch(*args, cwd, config: str | None = None) -> str:
    """`accelerate launch` 2 processes of `python -m labkit.scale.cli ARGS` on CPU; returns stdout.

    config: None = plain data parallel (--multi_gpu), else a file in examples/accelerate (e.g. "fsdp.yaml"),
    launched as the README says, with the process count set to 2.
    """
    how = ["--multi_gpu", "--num_machines", "1", "--mixed_precision", "no"] if config is None else ["--config_file", str(EXAMPLES / config)]
    cmd = [sys.executable, "-m", "accelerate.commands.launch", *how, "--num_processes", "2", "--dynamo_backend", "no",
           "--main_process_port", str(_free_port()), "-m", "labkit.scale.cli", *map(str, args)]
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=400)
    assert proc.returncode == 0, f"{' '.join(cmd)} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"
    return proc.stdout


def _layout(stdout: str, name: str) -> tuple[int, int, str]:
    """(parameters on process 0, parameters in all, how) from the command's layout line."""
    found = re.findall(rf"{name}: ([0-9,]+) of ([0-9,]+) parameters on process 0 \((.*)\)", stdout)
    assert len(found) == 1, stdout
    local, total, how = found[0]
    return int(local.replace(",", "")), int(total.replace(",", "")), how


def _digest(stdout: str) -> str:
    found = re.findall(r"weights identical on 2 process\(es\): sha256 ([0-9a-f]{64})", stdout)
    assert len(found) == 1, stdout  # printed by the main process only
    return found[0]


@pytest.fixture(scope="module")
def workdir():
    from labkit.labeling.store import LabelStore
    from labkit.reward import RewardConfig
    from labkit.rl import PPOConfig
    from labkit.scale.jobs import PPOJob, RewardJob

    with tempfile.TemporaryDirectory(prefix="labkit-dist-") as tmp:
        root = Path(tmp)
        with LabelStore(root / "labels.db") as store:  # 24 comparisons: the best one always says "happy"
            items = []
            for i in range(24):
                responses = [f" the {WORDS[(i + j) % 7]} {WORDS[(i * 3 + j) % 7]}" for j in range(4)]
                responses[i % 4] = " happy happy happy"
                items.append(dict(task="sentiment", query=f"Query {i}.", responses=responses))
            ids = store.add_comparisons(items)
            store.record_labels([dict(comparison_id=c, best=i % 4, labeler="mock") for i, c in enumerate(ids)])
        # batch 5 over 22 training comparisons: shares of 3 + 2 and a last batch of 1 + 1; 2 chunks of 16
        # normalisation samples, one per process
        reward = RewardConfig(lr=1e-3, batch_size=5, eval_every=2, normalize_samples=32)
        for n in (1, 2):
            RewardJob(labels=str(root / "labels.db"), output_dir=str(root / f"rm{n}"), model="tiny",
                      task_overrides=TINY_TASK, reward=reward).save(root / f"rm{n}.yaml")
        RewardJob(labels=str(root / "labels.db"), output_dir=str(root / "rm_fsdp"), model="tiny",
                  task_overrides=TINY_TASK, reward=reward).save(root / "rm_fsdp.yaml")
        for run, n_updates in (("ppo", 2), ("ppo", 3), ("ppo_ddp", 2), ("ppo_fsdp", 2), ("ppo_fsdp", 3),
                               ("lora_ddp", 2), ("lora_fsdp", 2)):
            # ppo_ddp / ppo_fsdp: a separate value model, so that pi, rho, the value model and the reward
            # model are all sharded under FSDP; lora_*: LoRA adapters on a sharded base, rho = adapters off
            value = "separate" if run.startswith("ppo_") else "shared"
            PPOJob(run_dir=str(root / run), n_updates=n_updates, model="tiny", task_overrides=TINY_TASK,
                   reward=str(root / "rm2"), ppo=PPOConfig(batch_size=4, lr=1e-3, ppo_epochs=2, total_updates=10,
                                                           value_model=value, lora_r=4 if "lora" in run else 0)
                   ).save(root / f"{run}{n_updates}.json")
        yield root


@pytest.mark.slow
def test_train_reward_on_two_processes_equals_one_process_on_the_same_batches(workdir):
    from labkit.reward import RewardModel
    from labkit.scale.cli import train_reward
    from labkit.scale.jobs import RewardJob

    stdout = _launch("train-reward", "rm2.yaml", "--check-sync", cwd=workdir)
    local, total, how = _layout(stdout, "reward model")
    assert local == total and how == "a full copy"
    two = json.loads((workdir / "rm2" / "summary.json").read_text())
    saved = RewardModel.load(workdir / "rm2", device="cpu")
    # both processes ended with the same weights, and they are the ones rank 0 saved
    assert two["world_size"] == 2 and _digest(stdout) == two["weights_digest"]
    assert distributed.weights_digest(saved.state_dict().values()) == two["weights_digest"]
    lines = (workdir / "rm2" / "metrics.jsonl").read_text().splitlines()
    assert len(lines) == two["steps"] == 5  # one line per step: written by one process only

    one = train_reward(RewardJob.load(workdir / "rm1.yaml"), torch.device("cpu"))
    # normalisation over both processes' rho samples = one process drawing all of them; gradients averaged
    # over unequal shares = the gradient of the whole batch: same training curve, same model
    _assert_same_reward_model(workdir / "rm2", workdir / "rm1")
    assert one["final"]["rm/loss"] < 0.5 * one["final"]["rm/chance_loss"]  # it learned something


@pytest.mark.slow
def test_ppo_on_two_processes_writes_once_keeps_weights_identical_and_resumes(workdir):
    from safetensors.torch import load_file

    from labkit.widgets.dashboard import Dashboard

    if not (workdir / "rm2" / "reward_model.safetensors").exists():
        _launch("train-reward", "rm2.yaml", cwd=workdir)
    stdout = _launch("ppo", "ppo2.json", "--check-sync", cwd=workdir)
    run = workdir / "ppo"

    def checkpoint_digest():
        tensors = load_file(str(latest(run) / "state.safetensors"))
        return distributed.weights_digest(tensors[f"param.{i}"] for i in range(sum(k.startswith("param.") for k in tensors)))

    assert _digest(stdout) == checkpoint_digest()
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in rows] == [1, 2]  # once per update, not once per process
    assert [m["episodes"] for m in rows] == [8, 16]  # 2 processes x 4 rollouts
    assert rows[0]["objective/kl"] == 0.0 and rows[1]["objective/kl"] != 0.0
    meta = json.loads((latest(run) / "trainer.json").read_text())
    assert meta["world_size"] == 2 and meta["process_numpy_rng"][0] != meta["process_numpy_rng"][1]
    assert len(Dashboard.from_jsonl(run / "metrics.jsonl").history) == 2  # what the notebook plots

    # the same command with a larger n_updates resumes: all processes load the checkpoint, one update more
    stdout = _launch("ppo", "ppo3.json", "--check-sync", cwd=workdir)
    assert "1 of 3 updates to go" in stdout and _digest(stdout) == checkpoint_digest()
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in rows] == [1, 2, 3]
    assert json.loads((latest(run) / "trainer.json").read_text())["step"] == 3


# --------------------------------------------------------------------------------------------------
# sharded (FSDP2) under examples/accelerate/fsdp.yaml, against the data-parallel run of the same job


def _checkpoint(run: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(str(latest(run) / "state.safetensors"))


@pytest.mark.slow
def test_train_reward_sharded_with_fsdp_equals_the_data_parallel_run(workdir):
    from labkit.reward import RewardModel

    if not (workdir / "rm2" / "summary.json").exists():
        _launch("train-reward", "rm2.yaml", cwd=workdir)
    stdout = _launch("train-reward", "rm_fsdp.yaml", "--check-sync", cwd=workdir, config="fsdp.yaml")
    local, total, how = _layout(stdout, "reward model")  # each process holds about half (the head and gains whole)
    assert how == "sharded with FSDP2" and total / 2 <= local < total / 2 + 1000
    fsdp = json.loads((workdir / "rm_fsdp" / "summary.json").read_text())
    assert fsdp["world_size"] == 2
    # the saved file holds the whole model (gathered from both processes' slices), one tied embedding
    saved = RewardModel.load(workdir / "rm_fsdp", device="cpu")
    assert _digest(stdout) == fsdp["weights_digest"] == distributed.weights_digest(saved.state_dict().values())
    _assert_same_reward_model(workdir / "rm_fsdp", workdir / "rm2")


def _assert_same_reward_model(run: Path, reference: Path) -> None:
    """Two `labkit train-reward` folders hold the same run up to float rounding: normalisation statistics,
    every step's metrics, every weight."""
    from labkit.reward import RewardModel

    a, b = (json.loads((d / "summary.json").read_text()) for d in (run, reference))
    for when in ("normalize_before", "normalize_after"):
        for key in ("raw_mean", "raw_std"):
            assert a[when][key] == pytest.approx(b[when][key], abs=1e-5), (when, key)
    lines = [(d / "metrics.jsonl").read_text().splitlines() for d in (run, reference)]
    assert len(lines[0]) == len(lines[1]) == a["steps"] == b["steps"]
    for x, y in zip(*lines):
        x, y = json.loads(x), json.loads(y)
        for key in ("rm/loss", "rm/accuracy", "rm/heldout_loss", "rm/heldout_accuracy"):
            assert (key in x) == (key in y) and x.get(key, 0) == pytest.approx(y.get(key, 0), abs=1e-5), key
    weights = [RewardModel.load(d, device="cpu").state_dict() for d in (run, reference)]
    for (name, p), q in zip(weights[0].items(), weights[1].values()):
        torch.testing.assert_close(p, q, rtol=1e-4, atol=1e-5, msg=name)


@pytest.mark.slow
def test_ppo_sharded_with_fsdp_equals_the_data_parallel_run_and_resumes(workdir):
    if not (workdir / "rm2" / "reward_model.safetensors").exists():
        _launch("train-reward", "rm2.yaml", cwd=workdir)
    _launch("ppo", "ppo_ddp2.json", cwd=workdir)
    stdout = _launch("ppo", "ppo_fsdp2.json", "--check-sync", cwd=workdir, config="fsdp.yaml")
    local, total, how = _layout(stdout, "policy")
    assert how == "sharded with FSDP2" and local == total / 2
    fsdp, ddp = _checkpoint(workdir / "ppo_fsdp"), _checkpoint(workdir / "ppo_ddp")
    n_params = sum(k.startswith("param.") for k in fsdp)
    assert _digest(stdout) == distributed.weights_digest(fsdp[f"param.{i}"] for i in range(n_params))
    # the same tensors (whole, not slices): weights, Adam moments, random states; and the same values
    assert fsdp.keys() == ddp.keys() and all(fsdp[k].shape == ddp[k].shape for k in fsdp)
    start = load_initial_policy_params()
    changed = 0
    for k in fsdp:
        torch.testing.assert_close(fsdp[k], ddp[k], rtol=1e-4, atol=1e-6, msg=k)
    for i, p0 in enumerate(start):
        changed += not torch.equal(fsdp[f"param.{i}"], p0)
    assert changed > len(start) // 2  # PPO moved the sharded policy's weights
    rows = [[json.loads(line) for line in (workdir / run / "metrics.jsonl").read_text().splitlines()]
            for run in ("ppo_fsdp", "ppo_ddp")]
    assert [m["step"] for m in rows[0]] == [1, 2] and [m["episodes"] for m in rows[0]] == [8, 16]
    for a, b in zip(*rows):
        for key in ("objective/kl", "objective/scores", "objective/entropy", "loss/policy_avg", "loss/value_avg"):
            assert a[key] == pytest.approx(b[key], rel=1e-4, abs=1e-6), key

    # resuming a sharded run: every process loads its slices of the whole tensors saved
    stdout = _launch("ppo", "ppo_fsdp3.json", "--check-sync", cwd=workdir, config="fsdp.yaml")
    assert "1 of 3 updates to go" in stdout
    resumed = _checkpoint(workdir / "ppo_fsdp")
    assert json.loads((latest(workdir / "ppo_fsdp") / "trainer.json").read_text())["step"] == 3
    assert _digest(stdout) == distributed.weights_digest(resumed[f"param.{i}"] for i in range(n_params))
    assert any(not torch.equal(resumed[f"param.{i}"], fsdp[f"param.{i}"]) for i in range(n_params))


def load_initial_policy_params() -> list[torch.Tensor]:
    """The tiny policy's trainable weights before any update, in the trainer's order (pi's, then the value model's)."""
    from labkit.models import load_lm

    torch.manual_seed(0)
    policy, _ = load_lm("tiny", device="cpu")
    return [p.detach().clone() for p in policy.parameters() if p.requires_grad]


@pytest.mark.slow
def test_lora_on_a_sharded_base_equals_the_data_parallel_run(workdir):
    if not (workdir / "rm2" / "reward_model.safetensors").exists():
        _launch("train-reward", "rm2.yaml", cwd=workdir)
    _launch("ppo", "lora_ddp2.json", cwd=workdir)
    stdout = _launch("ppo", "lora_fsdp2.json", cwd=workdir, config="fsdp.yaml")
    local, total, how = _layout(stdout, "policy")
    assert how == "sharded with FSDP2" and local == total / 2
    fsdp, ddp = _checkpoint(workdir / "lora_fsdp"), _checkpoint(workdir / "lora_ddp")
    assert fsdp.keys() == ddp.keys()
    for k in fsdp:
        torch.testing.assert_close(fsdp[k], ddp[k], rtol=1e-4, atol=1e-6, msg=k)
    # the adapters' B matrices start at zero: the update moved them
    trained = [k for k in fsdp if k.startswith("param.") and fsdp[k].abs().sum() > 0]
    assert len(trained) == sum(k.startswith("param.") for k in fsdp)


def test_full_state_dict_stores_a_tied_embedding_once():
    from labkit.models import load_lm
    from labkit.reward import RewardModel

    model, tok = load_lm("tiny", device="cpu")
    state = distributed.full_state_dict(RewardModel(model, tok, seed=0))
    assert "lm.model.embed_tokens.weight" in state and "lm.lm_head.weight" not in state
    assert {"head.weight", "head.bias", "gain", "bias"} <= state.keys()
    assert torch.equal(state["lm.model.embed_tokens.weight"], model.model.embed_tokens.weight)
