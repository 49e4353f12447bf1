"""benchmarks/gpu_ppo.py on a CPU with a 2-layer GPT-2 (so that the GPU script cannot rot), and its FLOP count."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parent.parent / "benchmarks"
sys.path.insert(0, str(BENCH))

import gpu_ppo  # noqa: E402
import ppo_step  # noqa: E402


def test_matmul_weights_count_gpt2_conv1d_and_llama_linear():
    """N (the trunk's matmul weights) against a naive count from the config: GPT-2's blocks are Conv1D, not
    nn.Linear, and must not count as zero."""
    from transformers import AutoModelForCausalLM, GPT2Config, LlamaConfig

    d, L = 32, 3
    gpt2 = AutoModelForCausalLM.from_config(GPT2Config(n_embd=d, n_layer=L, n_head=4, vocab_size=100, n_positions=64))
    assert ppo_step.trunk_matmul_params(gpt2) == L * (3 * d * d + d * d + 2 * d * 4 * d)  # qkv, out, fc, proj
    assert ppo_step.last_mlp_matmul_params(gpt2) == 2 * d * 4 * d
    llama = AutoModelForCausalLM.from_config(LlamaConfig(hidden_size=d, intermediate_size=48, num_hidden_layers=L,
                                                         num_attention_heads=4, num_key_value_heads=2, vocab_size=100))
    kv = 2 * (d // 4)
    assert ppo_step.trunk_matmul_params(llama) == L * (d * d + 2 * d * kv + d * d + 3 * d * 48)
    assert ppo_step.last_mlp_matmul_params(llama) == 3 * d * 48


def _rec(**kw):
    return {"seconds_per_update": 1.0, "generation_s": 0.2, "scoring_s": 0.1, "optimization_s": 0.7,
            "training_mfu": 0.45, **kw}


def test_summary_ratios_and_goals():
    records = {"shared": _rec(), "separate": _rec(seconds_per_update=2.0), "trl": _rec(seconds_per_update=2.5),
               "mock": {"seconds": 75.0}}
    s = gpu_ppo.summarise(records, on_gpu=True, size="large")
    assert s["speedup_shared_vs_trl"] == 2.5 and s["speedup_separate_vs_trl"] == 1.25
    assert s["shared_largest_phase"] == "optimization"
    assert s["goals"] == {"ppo_update_2x_trl": True, "training_mfu_40pct": True, "generation_not_largest": True,
                          "mock_sentiment_under_60s": False}
    # a failed part leaves its goals open (None), never met
    failed = gpu_ppo.summarise({"shared": {"error": "exit status 1"}, "trl": _rec()}, on_gpu=True, size="large")
    assert failed["goals"] == {"ppo_update_2x_trl": None, "training_mfu_40pct": None, "generation_not_largest": None,
                               "mock_sentiment_under_60s": None}
    assert "goals" not in gpu_ppo.summarise(records, on_gpu=False, size="tiny")  # goals are for the GPU run


@pytest.mark.slow
def test_gpu_benchmark_runs_on_cpu_with_tiny_shapes(tmp_path, capsys):
    results = tmp_path / "results.jsonl"
    gpu_ppo.main(["--size", "tiny", "--parts", "shared,separate,decode", "--workdir", str(tmp_path), "--results", str(results), "--profile-dir", str(tmp_path),
                  "--part-timeout", "600"])
    recs = {r["part"]: r for r in map(json.loads, results.read_text().splitlines())}
    assert set(recs) == {"peak", "model", "shared", "separate", "decode", "summary"}
    assert all("error" not in r for r in recs.values()), recs
    assert recs["model"]["params"] > 0 and recs["peak"]["matmul_peak_gflops"] > 0
    for part, value in (("shared", "shared"), ("separate", "separate")):
        r = recs[part]
        assert r["value"] == value and r["device"] == "cpu"
        assert r["flop_formula"].startswith("N=98304 ")  # 2 GPT-2 blocks of d 64: 2 * 12 * 64^2 (Conv1D counted)
        for k in ("seconds_per_update", "generation_s", "optimization_s", "training_mfu", "mfu", "generation_tokens_per_s"):
            assert r[k] > 0, (part, k, r[k])
    # GPT-2 over a static KV cache samples exactly labkit's tokens in fp32 (no CUDA graph on a CPU)
    assert recs["decode"]["static_same_tokens_frac"] == 1.0 and recs["decode"]["graph_s"] is None
    assert abs(sum(recs["summary"]["shared_phase_shares"].values()) - 1) < 0.02
    profile = (tmp_path / "profile_shared.txt").read_text()
    assert "profiled update" in profile and "Self CPU" in profile
    assert "summary" in capsys.readouterr().out


def test_a_failing_part_is_recorded_and_the_rest_runs(tmp_path):
    with open(tmp_path / "log", "w") as log:
        bad = gpu_ppo.run_part("trl", [sys.executable, "-c", "import sys; print('boom'); sys.exit(3)"], log)
        good = gpu_ppo.run_part("x", [sys.executable, "-c", "print('{\"a\": 1}')"], log)
        hung = gpu_ppo.run_part("h", [sys.executable, "-c", "import time; time.sleep(60)"], log, timeout=1)
    assert bad["part"] == "trl" and "exit status 3" in bad["error"] and "boom" in bad["error"]
    assert good["a"] == 1 and "error" not in good
    assert "error" in hung
    assert "boom" in (tmp_path / "log").read_text()


@pytest.mark.slow
def test_padded_batch_gradients_check_runs_on_cpu():
    """benchmarks/gpu_padding_grads.py (the GPU check of padded-batch gradients) on a CPU: fp32 against float64.
    In its own process, as it runs: its float64 models would add variants to this process's compiled kernels
    (labkit/speed/fused.py), whose recompile limit other tests' exact comparisons depend on."""
    out = subprocess.run([sys.executable, str(BENCH / "gpu_padding_grads.py")], capture_output=True, text=True,
                         check=True, cwd=BENCH.parent).stdout
    r = json.loads(out.strip().splitlines()[-1])
    for kind in ("llama", "gpt2"):
        for what in ("reward", "ppo"):
            c = r[f"{kind}_{what}"]
            assert c["nonfinite"] == 0 and c["tensors"] > 30 and 0 < c["rel_err"] < 1e-4, (kind, what, c)
