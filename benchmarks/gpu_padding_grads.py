"""Gradients of left-padded batches on a GPU: finite, and close to a float64 reference on the CPU.

Why: cuDNN's SDPA backward (SDPA's first choice on Hopper GPUs since torch 2.11) returns NaN query gradients
when a mask is passed and a query row's log-sum-exp is below about -88.7 (pytorch/pytorch#196678): every
left-padded query has fully masked rows (log-sum-exp -inf) at its padding. A reward model trained on an H200
went to a NaN loss within 5 steps. labkit switches that kernel off before its first GPU pass with gradients
(`sampling._avoid_cudnn_attention_for_training`); this checks the bug and the fix on the device at hand:

  sdpa      torch alone: one bf16 SDPA call with a causal + left-padding mask of 64 keys, backward with cuDNN
            allowed and with it off: the count of non-finite query gradients in each
  labkit    random 4-layer Llama and GPT-2 models (written to folders with --tokenizer, loaded with load_lm):
            a reward model's 4-way loss (`RewardModel.kway`, query keys/values shared in the graph) and a PPO
            training pass (`forward_responses` with values) over left-padded 64-token queries, backward;
            every gradient finite, and its relative error against the same models in float64 on the CPU
            (bf16 autocast on a GPU: ~1e-2 expected). `labkit_without_fix` repeats the reward-model loss with
            the fix disabled, to show what it prevents on this device.

Prints one JSON line. On a CPU it runs the same comparisons (fp32 against float64; nothing to show for cuDNN).

    python benchmarks/gpu_padding_grads.py --tokenizer DIR      # DIR: a tokenizer folder (default: the embedded model's)
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import torch
from record import emit  # this script's folder is on sys.path

CONFIGS = {
    "llama": dict(model_type="llama", hidden_size=128, intermediate_size=256, num_hidden_layers=4,
                  num_attention_heads=4, num_key_value_heads=2, vocab_size=50257, max_position_embeddings=256),
    "gpt2": dict(model_type="gpt2", n_embd=128, n_layer=4, n_head=4, vocab_size=50257, n_positions=256),
}
Q, R, K = 64, 8, 4  # query tokens (the length #196678 needs: 64 mod 128), response tokens, responses per query


def sdpa_bug(device: torch.device) -> dict:
    """Non-finite grad_q of one padded bf16 SDPA call, with cuDNN allowed and with it off."""
    import torch.nn.functional as F

    out = {}
    g = torch.Generator(device=device).manual_seed(0)
    B, H, L, D = 4, 4, Q, 64
    lengths = torch.tensor([L, L - 9, L - 20, L - 1], device=device)
    keep = torch.arange(L, device=device)[None] >= (L - lengths)[:, None]  # (B, L) real tokens
    mask = (torch.ones(L, L, dtype=torch.bool, device=device).tril()[None] & keep[:, None, :])[:, None]  # (B, 1, L, L)
    for name, cudnn in (("cudnn_allowed", True), ("cudnn_off", False)):
        was = torch.backends.cuda.cudnn_sdp_enabled()
        torch.backends.cuda.enable_cudnn_sdp(cudnn)
        try:
            q, k, v = (torch.randn(B, H, L, D, device=device, generator=g, dtype=torch.bfloat16).requires_grad_()
                       for _ in range(3))
            o = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
            o.backward(torch.randn(o.shape, device=device, generator=g, dtype=o.dtype))
            out[f"sdpa_{name}_nonfinite_grad_q"] = int((~torch.isfinite(q.grad)).sum())
        finally:
            torch.backends.cuda.enable_cudnn_sdp(was)
    return out


def write_model(kind: str, folder: Path, tokenizer_dir: Path) -> None:
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    cfg = dict(CONFIGS[kind])
    config = AutoConfig.for_model(cfg.pop("model_type"), **cfg)
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config).save_pretrained(folder)
    AutoTokenizer.from_pretrained(tokenizer_dir).save_pretrained(folder)


def batch(device, seed=0):
    """Left-padded queries (B, Q) of four lengths, K responses each (B*K, R) with lengths 1..R."""
    from labkit.sampling import pad_left

    g = torch.Generator().manual_seed(seed)
    queries = [torch.randint(5, 40000, (n,), generator=g).tolist() for n in (Q, Q - 9, Q - 30, 3)]
    q_ids, q_len = pad_left(queries, 0, device)
    r_ids = torch.randint(5, 40000, (len(queries) * K, R), generator=g).to(device)
    r_len = torch.randint(1, R + 1, (len(queries) * K,), generator=g).to(device)
    return q_ids, q_len, r_ids, r_len


def losses_and_grads(folder: str, device: str, dtype) -> dict[str, dict[str, torch.Tensor]]:
    """{'reward': grads, 'ppo': grads}: float64 CPU copies of every gradient after each loss's backward."""
    from labkit.models import load_lm
    from labkit.reward import kway_loss, reward_model_from_lm
    from labkit.sampling import forward_responses

    model, tok = load_lm(folder, device=device, dtype=dtype)
    q_ids, q_len, r_ids, r_len = batch(model.device)
    out = {}
    rm = reward_model_from_lm(model, tok, seed=0).requires_grad_(True)
    with torch.no_grad():
        rm.head.weight.mul_(30.0)  # rewards far apart: a loss whose gradients are not tiny
    loss, _ = kway_loss(rm.kway(q_ids, q_len, r_ids, r_len), torch.tensor([0, 1, 2, 3], device=model.device))
    loss.backward()
    out["reward"] = {n: p.grad.detach().double().cpu() for n, p in rm.named_parameters() if p.grad is not None}
    model.requires_grad_(True)
    res = forward_responses(model, q_ids, q_len, r_ids[:: K], 0.7, want_hidden=True)
    (res.logprobs.sum() + res.hidden.float().pow(2).mean()).backward()
    out["ppo"] = {n: p.grad.detach().double().cpu() for n, p in model.named_parameters() if p.grad is not None}
    return out


def compare(got: dict, ref: dict) -> dict:
    nonfinite = sum(int((~torch.isfinite(g)).sum()) for g in got.values())
    num = sum(float((got[n] - ref[n]).norm() ** 2) for n in ref if torch.isfinite(got[n]).all()) ** 0.5
    den = sum(float(ref[n].norm() ** 2) for n in ref) ** 0.5
    return {"nonfinite": nonfinite, "rel_err": float(f"{num / den:.3g}") if den else None, "tensors": len(ref)}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tokenizer", default=None, help="a tokenizer folder (default: the embedded model's)")
    args = p.parse_args(argv)
    from labkit import sampling
    from labkit.models import embedded_model_dir

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    result = {"benchmark": "gpu_padding_grads", "device": str(device), "torch": torch.__version__,
              "gpu": torch.cuda.get_device_name() if device.type == "cuda" else None}
    if device.type == "cuda":
        result.update(sdpa_bug(device))
    with tempfile.TemporaryDirectory() as tmp:
        for kind in CONFIGS:
            folder = Path(tmp) / kind
            write_model(kind, folder, Path(args.tokenizer) if args.tokenizer else embedded_model_dir())
            ref = losses_and_grads(str(folder), "cpu", torch.float64)
            got = losses_and_grads(str(folder), str(device), torch.float32)
            for what in ("reward", "ppo"):
                result[f"{kind}_{what}"] = compare(got[what], ref[what])
            if device.type == "cuda":  # the same reward-model loss with cuDNN attention allowed in training
                fix = sampling._avoid_cudnn_attention_for_training
                sampling._avoid_cudnn_attention_for_training = lambda device: None
                torch.backends.cuda.enable_cudnn_sdp(True)
                try:
                    result[f"{kind}_reward_without_fix"] = compare(
                        losses_and_grads(str(folder), str(device), torch.float32)["reward"], ref["reward"])
                finally:
                    sampling._avoid_cudnn_attention_for_training = fix
    emit(result)
    return result


if __name__ == "__main__":
    main()
