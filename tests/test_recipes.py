"""The four recipes carry the released launch.py's settings, make checked configs, and fill in what job files leave
out. No model is loaded here."""

import dataclasses

import pytest

from labkit.recipes import RECIPES, Recipe, recipe_for
from labkit.reward import RewardConfig
from labkit.rl.config import PPOConfig
from labkit.scale.jobs import PPOJob, RewardJob
from labkit.tasks import SENTIMENT, TASKS

STYLE, SUMMARY = ("sentiment", "descriptiveness"), ("tldr", "cnndm")


def test_every_paper_task_has_a_recipe():
    assert set(RECIPES) == set(TASKS)
    assert all(name == recipe.task for name, recipe in RECIPES.items())


@pytest.mark.parametrize("name", STYLE + SUMMARY)
def test_recipes_carry_launch_py_values(name):
    r, style = RECIPES[name], name in STYLE
    # launch.py get_experiments
    assert r.ppo_lr == (1e-5 if style else 2e-6)
    assert r.released_ppo_batch_size == (512 if style else 32)
    assert r.released_total_episodes == 1_000_000
    assert r.released_total_updates == (1954 if style else 31_250)  # train_policy.py nupdates: a ceil
    assert r.whiten_rewards is style  # summaries: `rewards.whiten` False, the intent (labkit.recipes)
    # launch.py get_train_reward_experiments; train_reward.py: one pass over the labels
    assert r.reward_lr == (5e-5 if style else 2.5e-5)
    assert r.reward_batch_size == (32 if style else 16)
    assert r.reward_epochs == 1
    # normalize_samples 256, drawn in whole rollout batches of 512 / 128
    assert r.normalize_samples == (512 if style else 256)
    # CPU sizes, below the released ones
    assert r.ppo_batch_size == (64 if style else 16) <= r.released_ppo_batch_size


@pytest.mark.parametrize("name, beta, target", [("sentiment", 0.15, 6.0), ("descriptiveness", 0.15, 6.0),
                                                ("tldr", 0.03, None), ("cnndm", 0.01, None)])
def test_the_kl_penalty_comes_from_the_task(name, beta, target):
    task, ppo = TASKS[name], recipe_for(name).ppo_config()
    assert (task.init_beta, task.kl_target) == (beta, target)
    assert (ppo.init_beta, ppo.kl_target) == (None, -1.0)  # PPOConfig's "the task's"


def test_ppo_config_is_the_recipe_with_overrides_checked():
    cfg = recipe_for("tldr").ppo_config()
    assert isinstance(cfg, PPOConfig)
    assert (cfg.lr, cfg.batch_size, cfg.total_updates, cfg.whiten_rewards) == (2e-6, 16, 100, False)
    assert cfg.ppo_epochs == PPOConfig().ppo_epochs == 4  # the rest: PPOConfig's defaults (the released code's)
    cfg = recipe_for("tldr").ppo_config(lr=1e-4, lora_r=16, batch_size=8)
    assert (cfg.lr, cfg.lora_r, cfg.batch_size, cfg.whiten_rewards) == (1e-4, 16, 8, False)
    r = recipe_for("sentiment")
    big = r.ppo_config(batch_size=r.released_ppo_batch_size, total_updates=r.released_total_updates)
    assert (big.batch_size, big.total_updates, big.lr, big.whiten_rewards) == (512, 1954, 1e-5, True)


def test_reward_config_is_the_recipe_with_overrides_checked():
    cfg = recipe_for("cnndm").reward_config()
    assert isinstance(cfg, RewardConfig)
    assert (cfg.lr, cfg.batch_size, cfg.epochs, cfg.normalize_samples) == (2.5e-5, 16, 1, 256)
    cfg = recipe_for("sentiment").reward_config(batch_size=8, normalize_samples=8)
    assert (cfg.lr, cfg.batch_size, cfg.normalize_samples) == (5e-5, 8, 8)


def test_bad_overrides_are_refused_with_a_clear_message():
    with pytest.raises(ValueError, match=r"Unknown PPOConfig fields \['lrr'\] in an override of the 'tldr' recipe; "
                       r"known fields: \[.*'lr'"):
        recipe_for("tldr").ppo_config(lrr=1e-5)
    with pytest.raises(ValueError, match=r"Unknown RewardConfig fields \['epoch'\] .*known fields: \[.*'epochs'"):
        recipe_for("sentiment").reward_config(epoch=2)
    with pytest.raises(ValueError, match=r"PPOConfig\.lr = 0\.0: must be a finite number > 0"):
        recipe_for("sentiment").ppo_config(lr=0)
    with pytest.raises(ValueError, match=r"PPOConfig\.whiten_rewards = 'false' \(str\): must be true or false"):
        recipe_for("tldr").ppo_config(whiten_rewards="false")
    with pytest.raises(ValueError, match=r"RewardConfig\.batch_size = 0: must be a whole number >= 1"):
        recipe_for("cnndm").reward_config(batch_size=0)


def test_a_bad_recipe_is_refused_when_built():
    with pytest.raises(ValueError, match=r"Recipe\.ppo_lr = '1e-5' \(str\): must be a number"):
        dataclasses.replace(RECIPES["sentiment"], ppo_lr="1e-5")
    with pytest.raises(ValueError, match=r"PPOConfig\.lr = -1\.0: must be a finite number > 0"):
        dataclasses.replace(RECIPES["sentiment"], ppo_lr=-1.0)
    with pytest.raises(ValueError, match=r"Recipe\.task = '': must be a non-empty string"):
        dataclasses.replace(RECIPES["sentiment"], task="")


def test_recipe_for_a_task_object_and_an_unknown_task():
    assert recipe_for(SENTIMENT.with_(response_length=8)) is RECIPES["sentiment"]  # a paper task, changed: its name
    mine = SENTIMENT.with_(name="mine")
    with pytest.raises(KeyError, match=r"No recipe for the task 'mine'; recipes exist for sentiment, descriptiveness, "
                       r"tldr, cnndm\. .*PPOConfig\(\.\.\.\) and RewardConfig\(\.\.\.\) explicitly, or build a Recipe"):
        recipe_for(mine)
    own = Recipe(**{**dataclasses.asdict(RECIPES["sentiment"]), "task": "mine", "ppo_lr": 3e-6})
    assert own.ppo_config().lr == 3e-6 and own.reward_config().lr == 5e-5


# --------------------------------------------------------------------------------------------------
# job files take what they leave out from the recipe


def test_a_partial_ppo_section_takes_the_rest_from_the_recipe(tmp_path):
    path = tmp_path / "ppo.yaml"
    path.write_text("job: ppo\nrun_dir: run\nn_updates: 3\ntask: tldr\nppo: {batch_size: 8, lora_r: 16}\n")
    job = PPOJob.load(path)
    assert (job.ppo.batch_size, job.ppo.lora_r) == (8, 16)  # as written
    assert (job.ppo.lr, job.ppo.whiten_rewards) == (2e-6, False)  # tldr's recipe
    assert job.ppo.total_updates == 3  # the learning rate decays over the job's updates, not the recipe's 100
    assert job.ppo == recipe_for("tldr").ppo_config(batch_size=8, lora_r=16, total_updates=3)
    saved = job.save(tmp_path / "saved.yaml")
    assert "whiten_rewards: false" in saved.read_text() and PPOJob.load(saved) == job  # saved whole


def test_a_job_without_a_section_takes_the_whole_recipe(tmp_path):
    path = tmp_path / "ppo.json"
    path.write_text('{"job": "ppo", "run_dir": "run", "n_updates": 3, "task": "cnndm"}')
    assert PPOJob.load(path).ppo == recipe_for("cnndm").ppo_config(total_updates=3)
    path.write_text('{"job": "ppo", "run_dir": "run", "n_updates": 3, "ppo": null}')  # null: the recipe too
    assert PPOJob.load(path).ppo == recipe_for("sentiment").ppo_config(total_updates=3)  # the default task
    assert PPOJob(run_dir="run", n_updates=1, task="tldr").ppo == recipe_for("tldr").ppo_config(total_updates=1)
    path.write_text('{"job": "ppo", "run_dir": "run", "n_updates": 3, "ppo": {"total_updates": 50}}')
    assert PPOJob.load(path).ppo.total_updates == 50  # written: kept
    assert PPOJob(run_dir="run", n_updates=1, ppo=PPOConfig()).ppo == PPOConfig()  # given: kept as it is


def test_a_reward_job_takes_what_it_leaves_out_from_the_recipe(tmp_path):
    path = tmp_path / "rm.yaml"
    path.write_text("job: train-reward\nlabels: labels.db\noutput_dir: rm\ntask: cnndm\nreward: {lr: 1e-5}\n")
    job = RewardJob.load(path)
    assert (job.reward.lr, job.reward.batch_size, job.reward.normalize_samples) == (1e-5, 16, 256)
    assert RewardJob(labels="labels.db", output_dir="rm").reward == recipe_for("sentiment").reward_config()


def test_job_files_still_refuse_bad_sections_and_tasks(tmp_path):
    path = tmp_path / "ppo.yaml"
    path.write_text("job: ppo\nrun_dir: run\nn_updates: 3\ntask: tldr\nppo: {lrr: 1e-5}\n")
    with pytest.raises(ValueError, match=r"Unknown .*ppo\.yaml: ppo keys \['lrr'\]; known keys"):
        PPOJob.load(path)
    path.write_text("job: ppo\nrun_dir: run\nn_updates: 3\ntask: tldr\nppo: {whiten_rewards: 'no'}\n")
    with pytest.raises(ValueError, match=r"ppo\.yaml: PPOConfig\.whiten_rewards = 'no' \(str\)"):
        PPOJob.load(path)
    path.write_text("job: ppo\nrun_dir: run\nn_updates: 3\ntask: tldrr\nppo: {lr: 1e-5}\n")
    with pytest.raises(KeyError, match=r"ppo\.yaml: Unknown task 'tldrr'"):  # the task's error, not a recipe's
        PPOJob.load(path)
    with pytest.raises(KeyError, match=r"Unknown task 'tldrr'"):
        PPOJob(run_dir="run", n_updates=1, task="tldrr")


def test_a_partial_job_resumes_against_the_job_yaml_it_wrote(tmp_path):
    from labkit.scale import cli

    path = tmp_path / "ppo.yaml"
    path.write_text(f"job: ppo\nrun_dir: {tmp_path / 'run'}\nn_updates: 3\ntask: tldr\nppo: {{batch_size: 8}}\n")
    PPOJob.load(path).save(tmp_path / "run" / "job.yaml")  # what `labkit ppo` writes: every field
    cli.check_resume(PPOJob.load(path))  # the same partial file, filled from the same recipe: the same job
    path.write_text(path.read_text().replace("batch_size: 8", "batch_size: 8, seed: 3"))
    with pytest.raises(ValueError, match=r"differs in: ppo\.seed: 0 -> 3"):
        cli.check_resume(PPOJob.load(path))


# --------------------------------------------------------------------------------------------------
# a trainer or an online loop given no settings takes the task's recipe


def test_a_trainer_without_a_config_takes_its_tasks_recipe(tiny):
    import copy

    from labkit.rl import PPOTrainer

    model, tok = tiny
    trainer = PPOTrainer(copy.deepcopy(model), tok, "tldr", lambda q, r: [0.0] * len(r), ["A post."], verbose=False)
    assert trainer.config == recipe_for("tldr").ppo_config() and trainer.config.whiten_rewards is False
    mine = PPOTrainer(copy.deepcopy(model), tok, SENTIMENT.with_(name="mine"), lambda q, r: [0.0] * len(r), ["A."],
                      verbose=False)
    assert mine.config == PPOConfig()  # no recipe: the dataclass's defaults


def test_an_online_loop_without_a_reward_config_takes_its_tasks_recipe():
    from labkit.labeling.online import OnlineConfig, _recipe_reward_config
    from labkit.tasks import TLDR

    assert OnlineConfig().reward_config is None
    assert _recipe_reward_config(TLDR) == recipe_for("tldr").reward_config()
    assert _recipe_reward_config(TLDR.with_(name="mine")) == RewardConfig()
