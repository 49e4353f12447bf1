"""Bad input and failures around a PPO update and its checkpoints, on the tiny model.

Each case asserts two things: the error names the problem, and nothing changed: the trainer's weights,
optimiser, schedule, KL controller, random streams and step count (`state`), or the files of a run folder.
A refused update retried without the fault must give exactly the update an uninterrupted trainer gives.
"""

import json
import math
import shutil

import numpy as np
import pytest
import torch

import labkit.rl.trainer as ppo
from labkit.models import load_lm, tiny_config
from labkit.reward import RewardModel, reward_model_from_lm
from labkit.rl import PPOConfig, PPOTrainer
from labkit.rl import checkpoint as ckpt
from labkit.tasks import SENTIMENT

PROMPTS = ["It was late. The rain stopped and she waited.", "One. Two words here. And more."]
TASK = SENTIMENT.with_(response_length=6, truncation=None)


def dots(q, r):
    return [s.count(".") + 0.1 * len(s) for s in r]


def config(**kw):
    return PPOConfig(**{**dict(batch_size=4, minibatch_size=2, ppo_epochs=2, lr=1e-3, total_updates=10,
                               kl_target=1.0, init_beta=0.2, kl_horizon=100), **kw})


def make(reward=dots, run_dir=None, seed=0, task=TASK, dtype=None, **kw):
    model, tok = load_lm("tiny", device="cpu", seed=seed, dtype=dtype)
    return PPOTrainer(model, tok, task, reward, PROMPTS, config(**kw), run_dir=run_dir, verbose=False)


def state(t: PPOTrainer) -> dict:
    """Everything an update changes, copied."""
    return {
        "params": [p.detach().clone() for p in t.params],
        "opt": {i: {k: v.clone() if torch.is_tensor(v) else v for k, v in st.items()}
                for i, st in enumerate(t.optimizer.state[p] for p in t.params if p in t.optimizer.state)},
        "lr": [g["lr"] for g in t.optimizer.param_groups],
        "sched": t.scheduler.state_dict()["last_epoch"],
        "kl": t.kl_ctl.state_dict(),
        "numpy": json.dumps(t.rng.bit_generator.state, default=int),
        "generator": t.generator.get_state().clone(),
        "torch": torch.get_rng_state().clone(),
        "step": t.step_count,
        "history": len(t.history),
    }


def assert_same(a: dict, b: dict) -> None:
    assert a["step"] == b["step"] and a["history"] == b["history"] and a["kl"] == b["kl"]
    assert a["lr"] == b["lr"] and a["sched"] == b["sched"] and a["numpy"] == b["numpy"]
    assert torch.equal(a["generator"], b["generator"]) and torch.equal(a["torch"], b["torch"])
    for x, y in zip(a["params"], b["params"]):
        torch.testing.assert_close(x, y, rtol=0, atol=0, equal_nan=True)  # bit for bit, NaN where NaN
    assert a["opt"].keys() == b["opt"].keys()
    for i in a["opt"]:
        for k, v in a["opt"][i].items():
            assert torch.equal(v, b["opt"][i][k]) if torch.is_tensor(v) else v == b["opt"][i][k], (i, k)


def files(folder) -> dict:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


# --------------------------------------------------------------------------------------------------
# a reward function's return: one finite real number per response, or a clear error before any change

def returning(value):
    return lambda q, r: value(len(r)) if callable(value) else value


BAD_REWARDS = [
    ("one nan", lambda n: [0.0] * 3 + [float("nan")] + [0.0] * (n - 4), FloatingPointError, "returned nan for rollout 3"),
    ("inf", lambda n: [float("inf")] * n, FloatingPointError, "returned inf for rollout 0"),
    ("minus inf", lambda n: [0.0] + [float("-inf")] * (n - 1), FloatingPointError, "returned -inf for rollout 1"),
    ("numpy nan", lambda n: np.array([0.5] * (n - 1) + [np.nan]), FloatingPointError, "returned nan for rollout 3"),
    ("tensor nan", lambda n: torch.tensor([float("nan")] * n), FloatingPointError, "returned nan for rollout 0"),
    ("strings", lambda n: ["good"] * n, TypeError, "returned 'good' \\(str\\) for rollout 0"),
    ("None items", lambda n: [1.0, None] + [1.0] * (n - 2), TypeError, "returned None \\(NoneType\\) for rollout 1"),
    ("bools", lambda n: [True] * n, TypeError, "returned True \\(bool\\) for rollout 0"),
    ("None", lambda n: None, TypeError, "returned a NoneType"),
    ("a dict", lambda n: {"score": 1.0}, TypeError, "returned a dict"),
    ("a float", lambda n: 1.0, TypeError, "returned a float"),
    ("too few", lambda n: [1.0] * (n - 1), ValueError, "returned 3 scores for 4 responses"),
    ("2-d tensor", lambda n: torch.ones(n, 2), ValueError, "returned shape \\(4, 2\\)"),
]


@pytest.mark.parametrize("name,value,error,message", BAD_REWARDS, ids=[b[0] for b in BAD_REWARDS])
def test_a_bad_reward_return_is_refused_before_anything_changes(name, value, error, message):
    good = make()
    good.step()
    before = state(good)
    good.reward = returning(value)
    with pytest.raises(error, match=message):
        good.step()
    assert_same(before, state(good))


def test_a_reward_that_raises_changes_nothing_and_the_retry_equals_the_uninterrupted_update():
    straight, t = make(), make()
    straight.train(2, progress=False)
    t.step()
    before = state(t)

    def broken(q, r):
        raise RuntimeError("scorer offline")

    t.reward = broken
    with pytest.raises(RuntimeError, match="scorer offline"):
        t.step()
    assert_same(before, state(t))
    t.reward = dots
    t.step()
    assert_same(state(straight), state(t))


def test_numpy_and_tensor_scores_are_accepted():
    assert make(reward=lambda q, r: np.ones(len(r), dtype=np.float32)).step()["objective/scores"] == pytest.approx(1.0)
    assert make(reward=lambda q, r: torch.full((len(r),), 2, dtype=torch.int64)).step()["objective/scores"] == 2.0


# --------------------------------------------------------------------------------------------------
# a failure at any stage of an update undoes it whole (weights, optimiser, schedule, KL, random streams)

def _fail_on_call(monkeypatch, target, name, k):
    real, calls = getattr(target, name), []

    def wrapper(*a, **kw):
        calls.append(1)
        if len(calls) == k:
            raise RuntimeError(f"injected failure in {name}")
        return real(*a, **kw)

    monkeypatch.setattr(target, name, wrapper)


STAGES = [
    ("1 rollout", ppo, "sample", 1),
    ("2 score", PPOTrainer, "_score", 1),
    ("3 rho", PPOTrainer, "_rho_logprobs", 1),
    ("3 old logprobs", PPOTrainer, "_old_logprobs_and_values", 1),
    ("4 rewards", ppo, "kl_penalty_rewards", 1),
    ("5 gae", ppo, "compute_gae", 1),
    ("6 first minibatch", ppo, "policy_loss", 1),
    ("6 epoch 2", ppo, "policy_loss", 3),
    ("6 last minibatch", ppo, "policy_loss", 4),
    ("6 end of update", PPOTrainer, "_end_update", 1),
    ("7 metrics", PPOTrainer, "_metrics", 1),
]


@pytest.mark.parametrize("undo", ["copy in memory", "checkpoint read back"])
@pytest.mark.parametrize("stage,target,name,k", STAGES, ids=[s[0] for s in STAGES])
def test_a_failure_at_any_stage_of_an_update_undoes_all_of_it(monkeypatch, tmp_path, stage, target, name, k, undo):
    """Without a run folder the update is undone from a copy; with one that saved the state the update
    started from, from that checkpoint (nothing copied)."""
    straight = make()
    t = make(run_dir=tmp_path / "run" if undo == "checkpoint read back" else None)
    straight.train(2, progress=False)
    t.step()
    before = state(t)
    with monkeypatch.context() as m:
        _fail_on_call(m, target, name, k)
        if undo == "checkpoint read back":  # the undo must not copy anything
            m.setattr(ppo, "_host_copy", lambda x: pytest.fail("the weights were copied"))
        with pytest.raises(RuntimeError, match=f"injected failure in {name}"):
            t.step()
    assert_same(before, state(t))
    if undo == "checkpoint read back":
        assert t._checkpointed[0] == 1 and (tmp_path / "run" / "checkpoints" / "step-000001").is_dir()
    t.step()  # retried without the fault: exactly the update the uninterrupted trainer made
    assert_same(state(straight), state(t))


def test_a_failure_in_the_adaptive_controller_undoes_the_optimiser_steps(monkeypatch):
    t = make()
    t.step()
    before = state(t)
    monkeypatch.setattr(t.kl_ctl, "update", lambda *a: 1 / 0)
    with pytest.raises(ZeroDivisionError):
        t.step()
    assert_same(before, state(t))


def test_a_keyboard_interrupt_inside_the_ppo_epochs_undoes_the_update(monkeypatch):
    t = make()
    t.step()
    before = state(t)
    calls = []

    def interrupt_on_third(*a, **kw):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real(*a, **kw)

    real = t.optimizer.step
    monkeypatch.setattr(t.optimizer, "step", interrupt_on_third)
    with pytest.raises(KeyboardInterrupt):
        t.step()
    assert_same(before, state(t))


def test_non_finite_weights_in_pi_are_named_and_nothing_changes():
    t = make()
    t.step()
    with torch.no_grad():
        t.policy.get_input_embeddings().weight[:, 0] = float("nan")
    before = state(t)
    with pytest.raises(FloatingPointError, match="pi's log-probs.*load the last good checkpoint"):
        t.step()
    assert_same(before, state(t))


def test_a_learning_rate_that_blows_the_weights_up_is_refused_whole():
    t = make(lr=1e39)  # finite as a Python float, inf in float32: the first optimiser step makes weights inf
    before = state(t)
    with pytest.raises(FloatingPointError, match="not applied"):
        t.step()
    assert_same(before, state(t))


def test_a_reward_model_with_nan_gain_is_named():
    model, tok = load_lm("tiny", device="cpu")
    rm = reward_model_from_lm(model, tok, seed=0)
    rm.gain.fill_(float("nan"))
    t = PPOTrainer(model, tok, TASK, rm, PROMPTS, config(), verbose=False)
    before = state(t)
    with pytest.raises(FloatingPointError, match="reward model's scores.*gain or bias"):
        t.step()
    assert_same(before, state(t))


# --------------------------------------------------------------------------------------------------
# a reward model must fit the run: its task, its tokenizer, its vocabulary

def _normalised_rm(model, tok, task):
    rm = reward_model_from_lm(model, tok, seed=0)
    rm.normalize(model, task, PROMPTS, n_samples=4, batch_size=4)
    return rm


def test_a_reward_model_of_another_task_is_refused_with_both_names():
    model, tok = load_lm("tiny", device="cpu")
    rm = _normalised_rm(model, tok, SENTIMENT.with_(name="descriptiveness", response_length=6, truncation=None))
    with pytest.raises(ValueError, match="trained for the task 'descriptiveness', and this run is 'sentiment'"):
        PPOTrainer(model, tok, TASK, rm, PROMPTS, config(), verbose=False)


def test_a_saved_reward_model_keeps_its_task_and_is_refused_for_another(tmp_path):
    model, tok = load_lm("tiny", device="cpu")
    _normalised_rm(model, tok, TASK).save(tmp_path / "rm")
    rm = RewardModel.load(tmp_path / "rm", device="cpu")
    assert rm.task_name == "sentiment"
    PPOTrainer(model, tok, TASK, rm, PROMPTS, config(), verbose=False)  # fits
    with pytest.raises(ValueError, match="trained for the task 'sentiment'"):
        PPOTrainer(model, tok, TASK.with_(name="tldr"), rm, PROMPTS, config(), verbose=False)


def _swapped_tokenizer(tok, tmp_path):
    """The same tokenizer with two tokens' ids exchanged: same vocabulary size, other ids."""
    from transformers import AutoTokenizer

    tok.save_pretrained(tmp_path / "tok")
    data = json.loads((tmp_path / "tok" / "tokenizer.json").read_text())
    vocab = data["model"]["vocab"]
    vocab["hello"], vocab["world"] = vocab["world"], vocab["hello"]
    (tmp_path / "tok" / "tokenizer.json").write_text(json.dumps(data))
    other = AutoTokenizer.from_pretrained(tmp_path / "tok")
    other.padding_side = "left"
    assert len(other) == len(tok) and other.encode("hello") != tok.encode("hello")
    return other


def test_a_reward_model_with_another_tokenizer_of_the_same_size_is_refused(tmp_path):
    model, tok = load_lm("tiny", device="cpu")
    rm = reward_model_from_lm(model, _swapped_tokenizer(tok, tmp_path), seed=0)
    with pytest.raises(ValueError, match="tokenizer is not the policy's"):
        PPOTrainer(model, tok, TASK, rm, PROMPTS, config(), verbose=False)


def test_a_saved_reward_model_whose_tokenizer_was_replaced_is_refused_on_load(tmp_path):
    model, tok = load_lm("tiny", device="cpu")
    _normalised_rm(model, tok, TASK).save(tmp_path / "rm")
    shutil.rmtree(tmp_path / "rm" / "tokenizer")
    _swapped_tokenizer(tok, tmp_path).save_pretrained(tmp_path / "rm" / "tokenizer")
    with pytest.raises(ValueError, match="not the tokenizer this reward model was trained with"):
        RewardModel.load(tmp_path / "rm", device="cpu")


def test_a_reward_model_with_a_smaller_vocabulary_is_refused():
    from transformers import AutoModelForCausalLM

    model, tok = load_lm("tiny", device="cpu")
    small = AutoModelForCausalLM.from_config(tiny_config(len(tok) - 10))
    with pytest.raises(ValueError, match=f"sample token ids up to {len(tok) - 1}.*only {len(tok) - 10} rows"):
        PPOTrainer(model, tok, TASK, RewardModel(small, tok, seed=0), PROMPTS, config(), verbose=False)


# --------------------------------------------------------------------------------------------------
# resuming: a checkpoint must be of this run; changed settings are applied and reported, or refused

@pytest.fixture(scope="module")
def saved_run(tmp_path_factory):
    """A run folder after 2 updates (checkpoints of both kept), and the state after update 2."""
    run = tmp_path_factory.mktemp("saved") / "run"
    t = make(run_dir=run)
    t.train(2, progress=False)
    return run, state(t)


def resume_copy(saved_run, tmp_path):
    run, _ = saved_run
    shutil.copytree(run, tmp_path / "run")
    return tmp_path / "run"


REFUSED_RESUMES = [
    ("another task", dict(task=TASK.with_(response_length=7)), "another task \\(response_length: 6 -> 7\\)"),
    ("another model of the same shapes", dict(seed=1), "another model than this trainer's policy \\(weights:"),
    ("another dtype", dict(dtype=torch.float64), "dtype: 'float32' -> 'float64'"),
    ("LoRA added", dict(lora_r=4), "lora_r: 0 -> 4"),
    ("a separate value model", dict(value_model="separate"), "value_model: 'shared' -> 'separate'"),
    ("another seed", dict(seed_cfg=5), "seed: 0 -> 5"),
    ("another init_beta", dict(init_beta=0.5), "init_beta: 0.2 -> 0.5"),
    ("another optimiser", dict(optimizer="adam"), "optimizer: 'tf_adam' -> 'adam'"),
    ("fixed instead of adaptive beta", dict(kl_target=None), "switches between a fixed and an adaptive beta"),
]


@pytest.mark.parametrize("name,kw,message", REFUSED_RESUMES, ids=[r[0] for r in REFUSED_RESUMES])
def test_resuming_into_a_different_run_is_refused_and_the_folder_is_untouched(saved_run, tmp_path, name, kw, message):
    run = resume_copy(saved_run, tmp_path)
    before = files(run)
    kw = dict(kw)
    if "seed_cfg" in kw:
        kw["seed"] = 0
        cfg_seed = kw.pop("seed_cfg")
        model, tok = load_lm("tiny", device="cpu")
        with pytest.raises(ckpt.CheckpointError, match=message):
            PPOTrainer(model, tok, TASK, dots, PROMPTS, config(seed=cfg_seed), run_dir=run, verbose=False)
    else:
        with pytest.raises(ckpt.CheckpointError, match=message):
            make(run_dir=run, **kw)
    assert files(run) == before


def test_a_changed_learning_rate_on_resume_is_applied_and_reported(saved_run, tmp_path, capsys):
    run = resume_copy(saved_run, tmp_path)
    model, tok = load_lm("tiny", device="cpu")
    t = PPOTrainer(model, tok, TASK, dots, PROMPTS, config(lr=5e-4, total_updates=20), run_dir=run)
    out = capsys.readouterr().out
    assert "lr: 0.001 -> 0.0005" in out and "total_updates: 10 -> 20" in out
    assert t.optimizer.param_groups[0]["lr"] == pytest.approx(5e-4 * (1 - 2 / 20))
    assert t.step()["lr"] == pytest.approx(5e-4 * (1 - 2 / 20))
    saved = json.loads((ckpt.latest(run) / "trainer.json").read_text())
    assert saved["config"]["lr"] == 5e-4 and saved["step"] == 3


def test_a_changed_kl_target_on_resume_is_applied(saved_run, tmp_path):
    t = make(run_dir=resume_copy(saved_run, tmp_path), kl_target=3.0)
    assert t.kl_ctl.target == 3.0 and t.kl_ctl.beta == saved_run[1]["kl"]["beta"]
    assert any(c.startswith("kl_target: 1.0 -> 3.0") for c in t.resume_changes)


def test_a_checkpoint_from_a_newer_labkit_is_refused(saved_run, tmp_path):
    run = resume_copy(saved_run, tmp_path)
    meta_path = ckpt.latest(run) / "trainer.json"
    meta = json.loads(meta_path.read_text())
    meta["version"] = ckpt.VERSION + 1
    text = json.dumps(meta)
    meta_path.write_text(text)
    done = json.loads((meta_path.parent / "COMPLETE").read_text())
    done["sizes"]["trainer.json"] = len(text.encode())
    (meta_path.parent / "COMPLETE").write_text(json.dumps(done))
    with pytest.raises(ckpt.CheckpointError, match="newer labkit.*upgrade labkit"):
        make(run_dir=run)


def test_a_damaged_newest_checkpoint_falls_back_to_the_previous_one(saved_run, tmp_path, capsys):
    run = resume_copy(saved_run, tmp_path)
    (run / "checkpoints" / "step-000002" / "trainer.json").unlink()
    model, tok = load_lm("tiny", device="cpu")
    t = PPOTrainer(model, tok, TASK, dots, PROMPTS, config(), run_dir=run)
    assert t.step_count == 1
    assert "step-000002 is damaged" in capsys.readouterr().out
    assert [json.loads(x)["step"] for x in (run / "metrics.jsonl").read_text().splitlines()] == [1]


def test_a_run_folder_whose_only_checkpoints_are_damaged_is_refused_not_restarted(saved_run, tmp_path):
    run = resume_copy(saved_run, tmp_path)
    for folder in (run / "checkpoints").glob("step-*"):
        (folder / "trainer.json").unlink()
    before = files(run)
    with pytest.raises(ckpt.CheckpointError, match="none is complete.*Nothing was changed"):
        make(run_dir=run)
    assert files(run) == before  # the weights that are left are not deleted by a fresh start


def test_a_checkpoint_cut_short_is_not_loaded(saved_run, tmp_path):
    run = resume_copy(saved_run, tmp_path)
    weights = run / "checkpoints" / "step-000002" / "state.safetensors"
    weights.write_bytes(weights.read_bytes()[:-100])
    assert make(run_dir=run).step_count == 1


def test_metrics_of_updates_after_the_checkpoint_are_cut_on_resume(saved_run, tmp_path):
    run = resume_copy(saved_run, tmp_path)
    with open(run / "metrics.jsonl", "a") as f:
        f.write(json.dumps({"step": 3, "objective/kl": 0.1}) + "\n" + '{"step": 4, "objective/k')  # a kill mid-line
    t = make(run_dir=run)
    t.step()
    assert [json.loads(x)["step"] for x in (run / "metrics.jsonl").read_text().splitlines()] == [1, 2, 3]


def test_a_version_1_checkpoint_folder_still_resumes(saved_run, tmp_path):
    """Version 1 kept one `checkpoint/` folder, and a kill between its two renames left the only copy in a
    hidden `.checkpoint.old-PID` folder: both are found."""
    run = resume_copy(saved_run, tmp_path)
    newest = run / "checkpoints" / "step-000002"
    (newest / "COMPLETE").unlink()
    shutil.move(newest, run / ".checkpoint.old-4242")
    shutil.rmtree(run / "checkpoints")
    t = make(run_dir=run)
    assert t.step_count == 2
    assert_same(saved_run[1], state(t))
    t.train(2, progress=False)  # the old folder is pruned like any checkpoint beyond the newest 2
    assert not (run / ".checkpoint.old-4242").exists() and ckpt.latest(run).name == "step-000004"


def test_keep_checkpoints_keeps_the_newest_and_never_fewer_than_one(tmp_path):
    t = make(run_dir=tmp_path / "run", keep_checkpoints=1)
    t.train(3, progress=False)
    assert sorted(p.name for p in (tmp_path / "run" / "checkpoints").iterdir()) == ["step-000003"]
    t2 = make(run_dir=tmp_path / "run2")
    t2.train(3, progress=False)
    assert sorted(p.name for p in (tmp_path / "run2" / "checkpoints").iterdir()) == ["step-000002", "step-000003"]
    assert math.isfinite(t2.history[-1]["objective/kl"])


# --------------------------------------------------------------------------------------------------
# prompts handed to the trainer

@pytest.mark.parametrize("prompts,error,message", [
    ([], ValueError, "at least one prompt"),
    (["fine. text.", ""], ValueError, "Prompt 1 is '': every prompt must be a non-empty text"),
    (["fine. text.", "   \n"], ValueError, "Prompt 1 is '   \\\\n'"),
    (["fine. text.", None], ValueError, "Prompt 1 is None"),
    ("one. string.", TypeError, "not one string"),
], ids=["none", "empty", "blank", "None", "a string"])
def test_bad_prompts_are_refused_with_their_index(prompts, error, message):
    model, tok = load_lm("tiny", device="cpu")
    with pytest.raises(error, match=message):
        PPOTrainer(model, tok, TASK, dots, prompts, config(), verbose=False)


def test_an_explicit_save_interrupted_while_replacing_names_the_complete_copies(tmp_path, monkeypatch):
    t = make()
    t.step()
    t.save(tmp_path / "mine")
    t.step()
    real, calls = ckpt.os.replace, []

    def second_fails(*a):
        calls.append(1)
        if len(calls) == 2:
            raise OSError("killed")
        return real(*a)

    monkeypatch.setattr(ckpt.os, "replace", second_fails)
    with pytest.raises(OSError):
        t.save(tmp_path / "mine")  # the old folder is aside, the new one complete but not yet in place
    monkeypatch.undo()
    with pytest.raises(ckpt.CheckpointError, match="interrupted; complete copies: .*\\.old-mine-.*\\.tmp-mine-|"
                                                   "interrupted; complete copies: .*\\.tmp-mine-.*\\.old-mine-"):
        make().load(tmp_path / "mine")


def test_a_model_of_another_configuration_with_the_same_weights_is_refused(saved_run, tmp_path):
    run = resume_copy(saved_run, tmp_path)
    model, tok = load_lm("tiny", device="cpu")
    model.config.rope_theta = 500.0  # the same weights, computing something else
    with pytest.raises(ckpt.CheckpointError, match="config: '"):
        PPOTrainer(model, tok, TASK, dots, PROMPTS, config(), run_dir=run, verbose=False)


def test_the_same_model_from_another_folder_resumes(saved_run, tmp_path):
    run = resume_copy(saved_run, tmp_path)
    model, tok = load_lm("tiny", device="cpu")
    model.config._name_or_path = "/elsewhere/tiny"
    assert PPOTrainer(model, tok, TASK, dots, PROMPTS, config(), run_dir=run, verbose=False).step_count == 2
