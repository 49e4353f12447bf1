"""benchmarks/reward_features.py runs end to end on the tiny model and a small label store (so that it cannot rot),
and its hidden-state features are the ones the reward model reads."""

import math
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))
import reward_features  # noqa: E402


def test_last_final_feature_is_what_the_reward_model_reads(tiny):
    from labkit.reward import reward_model_from_lm
    from labkit.sampling import unwrap

    model, tok = tiny
    query, response = tok.encode("The lake was calm", add_special_tokens=False), tok.encode(" and warm.", add_special_tokens=False)
    n = model.config.num_hidden_layers
    feats = reward_features.hidden_features(unwrap(model), query, response, [n])
    rm = reward_model_from_lm(model, tok, seed=0)
    with torch.no_grad():
        h = rm.hidden_features(*rm.pad([query], [response]))[0]
    torch.testing.assert_close(feats[f"last@{n}"], h.float(), rtol=1e-4, atol=1e-5)
    for layer in range(n + 1):  # and the other features are the ones the reward model reads when told to
        feats = reward_features.hidden_features(unwrap(model), query, response, [layer])
        for pool in ("last", "mean"):
            rm = reward_model_from_lm(model, tok, seed=0, pool=pool, layer=layer)
            with torch.no_grad():
                h = rm.hidden_features(*rm.pad([query], [response]))[0]
            torch.testing.assert_close(feats[f"{pool}@{layer}"], h.float(), rtol=1e-4, atol=1e-5)
    # the mean runs over the response's tokens only
    hidden = unwrap(model)(input_ids=torch.tensor([query + response]), output_hidden_states=True).hidden_states[n][0]
    torch.testing.assert_close(feats[f"mean@{n}"], hidden[len(query):].mean(0).detach(), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("task_name, labeler, judge", [
    ("sentiment", "VaderLabeler", "VADER"), ("descriptiveness", "DescriptivenessLabeler", "descriptiveness")])
def test_runs_on_a_small_label_store(tmp_path, tiny, task_name, labeler, judge):
    from labkit.data import load_prompts
    from labkit.labeling import labelers
    from labkit.labeling.comparisons import make_comparisons
    from labkit.labeling.store import LabelStore
    from labkit.tasks import get_task

    model, tok = tiny
    task = get_task(task_name)
    db = tmp_path / "labels.db"
    with LabelStore(db) as store:
        make_comparisons(store, model, tok, task, load_prompts(task, "train")[:12], k=4,
                         generator=torch.Generator().manual_seed(0), require_truncation=False, progress=False)
        assert labelers.label_pending(store, getattr(labelers, labeler)(seed=0), task=task_name) == 12
    out = reward_features.main([str(db), "--model", "tiny", "--task", task_name, "--probe-samples", "8", "--l2", "1"])
    n = model.config.num_hidden_layers
    assert out["n_labels"] == 12 and out["reads_now"] == f"last@{n}"
    assert out["task"] == task_name and out["judge"] == judge
    names = {r["features"] for r in out["results"]}
    assert f"last@{n}" in names and f"mean@{n}" in names and len(out["results"]) == len(names)
    found = out["probe_found"]
    assert 0 <= found <= 8
    for r in out["results"]:
        assert 0 <= r["cv_accuracy"] <= 1 and math.isfinite(r["judge_corr"]), r
        assert math.isfinite(r["judge_corr_found"]) or found < 3, r  # nan below 3 samples with a truncation point


def test_refuses_a_missing_store(tmp_path):
    with pytest.raises(SystemExit, match="does not exist"):
        reward_features.main([str(tmp_path / "nope.db"), "--model", "tiny"])
