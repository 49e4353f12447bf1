"""benchmarks/gpu_decode.py on a CPU with the tiny model (so that the GPU script cannot rot): the static-cache
arm samples exactly what labkit's own loop samples, and the graph arm's buffer bookkeeping (token, position,
mask column, the cache's own counters) is right when each replay is stood in for by an eager call."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

BENCH = Path(__file__).resolve().parent.parent / "benchmarks"
sys.path.insert(0, str(BENCH))

import gpu_decode  # noqa: E402


def test_cpu_run_static_arm_matches_labkits_loop(capsys):
    result = gpu_decode.main(["--model", "tiny", "--batch", "4", "--query", "16", "--response", "4", "--repeats", "1",
                              "--threads", "2"])
    last = capsys.readouterr().out.strip().splitlines()[-1]
    assert json.loads(last) == json.loads(json.dumps(result))  # the final line is the record
    assert result["benchmark"] == "gpu_decode" and result["device"] == "cpu"
    assert not [k for k in result if k.endswith("error")], result
    assert result["eager_s"] > 0 and result["static_s"] > 0 and result["static_tokens_per_s"] > 0
    assert result["compute_dtype"] == "float32"  # fp32 on a CPU: the same draws must give the same tokens
    assert result["static_same_tokens_frac"] == 1.0 and result["static_rows_identical"] == 4
    assert result["static_max_logprob_diff"] <= 1e-4
    assert result["graph_s"] is None and result["graph_skipped"] == "no CUDA device"


class _EagerReplay:
    """A stand-in for the CUDA graph: a replay runs the captured step eagerly into the same output buffer."""

    def __init__(self, dec):
        self.dec = dec

    def replay(self):
        self.dec.s_logp.copy_(self.dec._step())


def test_graph_rollout_bookkeeping_matches_the_static_loop(tiny):
    model, tok = tiny
    B, Q, R = 4, 12, 5
    ids, lengths = gpu_decode.make_queries(B, Q, model.config.vocab_size, tok.pad_token_id, torch.device("cpu"), seed=1)
    assert lengths.tolist() == [4, 12, 12, 12]  # rows i % 4 == 0 are 8 tokens shorter
    dec = gpu_decode.StaticDecoder(model, ids, lengths, R, temperature=0.7)
    with torch.no_grad():
        static = dec.rollout(torch.Generator().manual_seed(5))
        dec.static_inputs()
        dec.s_logp = torch.empty(B, model.config.vocab_size)
        dec.graph = _EagerReplay(dec)
        replayed = dec.graph_rollout(torch.Generator().manual_seed(5))
        again = dec.graph_rollout(torch.Generator().manual_seed(5))  # a second rollout reuses the reset cache
    for a, b in zip(static, replayed):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    for a, b in zip(replayed, again):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_compare_counts_positions_before_the_first_difference():
    ref_t = torch.tensor([[1, 2, 3], [4, 5, 6]])
    ref_lp = torch.tensor([[-1.0, -2.0, -3.0], [-1.0, -1.0, -1.0]])
    t = torch.tensor([[1, 9, 3], [4, 5, 6]])
    lp = torch.tensor([[-1.5, -7.0, -3.0], [-1.0, -1.25, -1.0]])
    c = gpu_decode.compare(ref_t, ref_lp, t, lp)
    assert c["same_tokens_frac"] == pytest.approx(5 / 6, abs=1e-6) and c["rows_identical"] == 1
    assert c["same_prefix_frac"] == pytest.approx(4 / 6, abs=1e-6)
    assert c["max_logprob_diff"] == 0.5  # row 0's position 0; its positions 1, 2 come after the difference
