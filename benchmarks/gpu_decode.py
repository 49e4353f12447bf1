"""One rollout's decode loop three ways: labkit's eager loop, a static KV cache, and a CUDA graph per step.

Why: labkit samples with its own KV-cache loop (`sampling._sample_chunk`): a prefill over the left-padded
queries (B, Q), then R steps that each feed one token (B, 1) through the model's own forward with a
DynamicCache. For a 774M GPT-2 (36 layers) at batch 64 a decode step is a few GFLOPs per row, far too little
to keep a GPU busy: the step's time is Python (transformers' forward, the cache's concatenations) and
kernel launches (hundreds per step), not the GPU. A CUDA graph replays all of a step's kernels with one
launch, but needs every tensor it touches at a fixed address: a static KV cache (transformers' StaticCache,
(B, kv_heads, Q+R, head_dim) per layer, written in place) and an attention mask that never changes shape.
This measures, in one run, whether that pays, and whether it samples the same tokens.

Arms (each one warm-up rollout, then the median of --repeats; the clock is read after
torch.cuda.synchronize() on a GPU):
  eager   labkit's own `sampling._sample_chunk` (DynamicCache, 2-D mask from which transformers builds the 4-D
          one every step)
  static  the same loop over a StaticCache (max_cache_len Q+R) with an explicit additive 4-D mask: the prefill's
          (B, 1, Q, Q+R) causal + left-padding mask, then one (B, 1, 1, Q+R) decode mask whose column Q+t is
          opened in place before step t. A 4-D tensor is handed on unchanged by transformers'
          `masking_utils._preprocess_mask_arguments` (any torch.Tensor or BlockMask with 4 dims: early exit, and
          `create_causal_mask` returns it as is; the same in 5.17 and 5.25), so no mask is built per step. Model
          calls go through `sampling.lm_forward` (so `sampling.autocast_for(model)`, the cache keyword from
          `sampling._cache_argument`, and the prefill's `only` are labkit's); sampling is labkit's
          (log-softmax of logits / T in fp32, `sample_categorical` with the generator), outside autocast as in
          `_sample_chunk`
  graph   (CUDA only) the static arm with each decode step's model forward and log-softmax (B, V) captured once
          in a torch.cuda.CUDAGraph (after three warm-up steps on a side stream, as PyTorch's CUDA-graph notes
          require) and replayed R-1 times per rollout; the token, position and mask column are copied into the
          graph's static input buffers between replays. Sampling stays OUTSIDE the graph (eager, with the same
          torch.Generator): identical draws to the other arms by construction, at the cost of its ~15 kernel
          launches per step (reported separately as sampling_step_ms)

Why transformers' StaticCache needs no cache_position here: in 5.17 and 5.25 neither GPT-2's nor Llama's forward
takes one, and `StaticLayer.update` writes at its own device-side counter `cumulative_length` (an in-place
add, so a graph replay advances it too). `cache.reset()` zeroes the buffers and the counters in place
(addresses kept) before every rollout. Where a model's forward does take `cache_position` it is passed.

Correctness in the same run: every arm's first rollout uses the same generator seed; the static and graph
arms' tokens and log-probs are compared with the eager arm's: the fraction of identical tokens, and the
largest |log-prob difference| over the positions before each row's first differing token (where the contexts
are still the same). In fp32 on a CPU the static arm must give identical tokens; under bf16 autocast on a GPU
the kernels differ (longer key rows, another mask) and rows may diverge after a while: reported, not asserted.

Output: progress lines, then one JSON line. Every arm runs in try/except: a failure is recorded as
"<arm>_error": "<Type>: <message>" and the rest still runs (the graph arm runs last: a device-side assert
would spoil the CUDA context for whatever came after).

    python benchmarks/gpu_decode.py --model runs/gpt2-large-random      # a load_lm name or model folder
    python benchmarks/gpu_ppo.py --parts decode                          # on the random gpt2-large that script writes
    python benchmarks/gpu_decode.py --model tiny --batch 4 --query 16 --response 4 --repeats 1   # CPU check
"""

from __future__ import annotations

import argparse
import contextlib
import inspect
import statistics
import time
import traceback

import torch
import torch.nn.functional as F
from record import emit  # this script's folder is on sys.path

def _err(e: BaseException) -> str:
    return f"{type(e).__name__}: {str(e)[:300]}"


def _log(msg: str) -> None:
    print(msg, flush=True)


def _sync(device: torch.device):
    return torch.cuda.synchronize if device.type == "cuda" else (lambda: None)


def _timed(fn, repeats: int, device: torch.device) -> tuple[float, list[float]]:
    """Median seconds of `repeats` calls of fn() (the caller has already warmed it up)."""
    sync = _sync(device)
    times = []
    for _ in range(repeats):
        sync()
        t0 = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - t0)
    return statistics.median(times), times


def make_queries(B: int, Q: int, vocab: int, pad_id: int, device: torch.device, seed: int = 0):
    """Random query ids (B, Q), left-padded: rows i % 4 == 0 are 8 tokens shorter (at least 1 token), so
    the padding-mask path runs. Returns ids (B, Q) and lengths (B,)."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (B, Q), generator=g)
    lengths = torch.full((B,), Q, dtype=torch.long)
    lengths[::4] = max(1, Q - 8)
    ids[torch.arange(Q)[None, :] < (Q - lengths)[:, None]] = pad_id
    return ids.to(device), lengths.to(device)


def compare(ref_tokens, ref_logprobs, tokens, logprobs) -> dict:
    """Agreement of one arm's rollout (B, R) with the reference's, on CPU tensors: the fraction of identical
    tokens, the fraction of positions before each row's first differing token, the rows identical
    throughout, and the largest |log-prob difference| over those leading positions (same context, same token)."""
    B, R = ref_tokens.shape
    same = tokens == ref_tokens  # (B, R)
    differs = ~same
    first = torch.where(differs.any(1), differs.float().argmax(1), torch.full((B,), R))  # (B,)
    before = torch.arange(R)[None, :] < first[:, None]  # (B, R)
    diff = (logprobs.double() - ref_logprobs.double()).abs()[before]
    return {
        "same_tokens_frac": round(same.float().mean().item(), 6),
        "same_prefix_frac": round(before.float().mean().item(), 6),
        "rows_identical": int((first == R).sum()),
        "max_logprob_diff": float(diff.max()) if diff.numel() else None,
    }


def static_cache_kwargs(cache_cls, config, B: int, max_len: int, device, dtype) -> dict:
    """Keyword arguments for `cache_cls` (transformers' StaticCache) that its installed signature names.

    transformers 5.17 and 5.25 both take (config, max_cache_len, offloading, offload_only_non_sliding, **kwargs)
    and allocate lazily at the first update (batch, heads, dtype and device from the keys themselves); 4.x
    took max_batch_size, device and dtype as well. Only the names the signature has are passed (not through
    **kwargs, where 5.x would drop them silently)."""
    params = inspect.signature(cache_cls.__init__).parameters
    wanted = {"config": config, "max_cache_len": max_len, "max_batch_size": B, "batch_size": B,
              "device": device, "dtype": dtype}
    return {k: v for k, v in wanted.items() if k in params}


class StaticDecoder:
    """The static-cache loop (and, on CUDA, its graph-captured decode step) for one (B, Q, R) shape.

    Buffers: `prefill_mask` (B, 1, Q, Q+R) additive, 0 where query position i may attend key j (j <= i and j
    inside the row's real tokens) and the compute dtype's lowest finite value elsewhere, also on keys Q.. that
    the cache has not been written yet (finite, not -inf: a left-padding position's own row has nothing to
    attend, and -inf would give NaN there, which 0 * NaN would carry into real rows); `decode_mask0`
    (B, 1, 1, Q+R) the same for one new position before any response token; `mask` a working copy of it.
    """

    def __init__(self, model, query_ids, query_lengths, R: int, temperature: float):
        from transformers import StaticCache

        from labkit import sampling

        self.model, self.R, self.T = model, R, temperature
        self.base = sampling.unwrap(model)
        self.device = query_ids.device
        B, Q = query_ids.shape
        self.B, self.Q = B, Q
        self.query_ids, self.query_lengths = query_ids, query_lengths
        with sampling.autocast_for(model):  # the dtype the attention's queries (and so the mask) will have
            autocast_on = torch.is_autocast_enabled(self.device.type)
            self.compute_dtype = torch.get_autocast_dtype(self.device.type) if autocast_on else \
                next(model.parameters()).dtype
        lowest = torch.finfo(self.compute_dtype).min
        mask2d = sampling.left_pad_mask(query_lengths, Q)  # (B, Q) long
        self.pos = sampling.positions(mask2d)  # (B, Q): labkit's position ids
        real = torch.zeros(B, Q + R, dtype=torch.bool, device=self.device)
        real[:, :Q] = mask2d.bool()  # keys that hold a real query token
        causal = torch.ones(Q, Q + R, dtype=torch.bool, device=self.device).tril()  # (Q, Q+R): j <= i
        allowed = causal[None] & real[:, None, :]  # (B, Q, Q+R)
        self.prefill_mask = torch.full((B, 1, Q, Q + R), lowest, dtype=self.compute_dtype, device=self.device)
        self.prefill_mask.masked_fill_(allowed[:, None], 0.0)
        self.decode_mask0 = torch.full((B, 1, 1, Q + R), lowest, dtype=self.compute_dtype, device=self.device)
        self.decode_mask0.masked_fill_(real[:, None, None, :], 0.0)
        self.mask = self.decode_mask0.clone()  # (B, 1, 1, Q+R): column Q+t opened before step t
        self.only = torch.tensor([Q - 1], device=self.device)  # the prefill reads position Q-1 only
        self.cache_kwargs = static_cache_kwargs(StaticCache, self.base.config, B, Q + R, self.device,
                                                self.compute_dtype)
        self.cache = StaticCache(**self.cache_kwargs)
        self.cache_position_arg = "cache_position" in inspect.signature(type(self.base).forward).parameters
        self.cache_arg = sampling._cache_argument(type(self.base))
        self.graph = None

    # -- model calls -------------------------------------------------------------------------------------------

    def _forward(self, ids, mask, pos, cache_position=None, only=None):
        """Logits (B, 1, V) at the last input position, the cache updated in place."""
        from labkit import sampling

        if self.cache_position_arg and cache_position is not None:  # a forward that wants it (not 5.17 / 5.25)
            with sampling.autocast_for(self.model):
                out = self.base(input_ids=ids, attention_mask=mask, position_ids=pos, use_cache=True,
                                logits_to_keep=1, cache_position=cache_position, **{self.cache_arg: self.cache})
            return out.logits
        logits, _, _ = sampling.lm_forward(self.model, ids, mask, pos, keep=1, cache=self.cache, use_cache=True,
                                           only=only)
        return logits

    def prefill(self):
        """Reset the cache and run the queries: logits (B, 1, V) of response token 0; the cache holds Q positions."""
        self.cache.reset()  # in place: buffers and counters keep their addresses (the graph reads them)
        cpos = torch.arange(self.Q, device=self.device) if self.cache_position_arg else None
        return self._forward(self.query_ids, self.prefill_mask, self.pos, cpos, only=self.only)

    # -- the static arm: an eager loop -------------------------------------------------------------------------

    @torch.no_grad()
    def rollout(self, generator):
        """tokens (B, R) long and logprobs (B, R) fp32, drawn as `_sample_chunk` draws them."""
        from labkit.sampling import sample_categorical

        B, Q, R = self.B, self.Q, self.R
        tokens = torch.empty(B, R, dtype=torch.long, device=self.device)
        logprobs = torch.empty(B, R, dtype=torch.float32, device=self.device)
        logits = self.prefill()
        self.mask.copy_(self.decode_mask0)
        next_pos = self.pos[:, -1:] + 1  # (B, 1)
        for t in range(R):
            logp = F.log_softmax(logits[:, -1].float() / self.T, dim=-1)  # (B, V)
            tok = sample_categorical(logp.exp(), generator)  # (B, 1)
            tokens[:, t] = tok[:, 0]
            logprobs[:, t] = logp.gather(-1, tok)[:, 0]
            if t == R - 1:
                break
            self.mask[:, :, :, Q + t] = 0.0  # the key written by this step (cache slot Q+t) is now visible
            cpos = torch.tensor([Q + t], device=self.device) if self.cache_position_arg else None
            logits = self._forward(tok, self.mask, next_pos, cpos)
            next_pos = next_pos + 1
        return tokens, logprobs

    # -- the graph arm -----------------------------------------------------------------------------------------

    def _step(self):
        """One decode step on the static buffers: tempered log-probs (B, V) fp32 of the next token."""
        logits = self._forward(self.s_ids, self.mask, self.s_pos, self.s_cpos if self.cache_position_arg else None)
        return F.log_softmax(logits[:, -1].float() / self.T, dim=-1)

    def static_inputs(self):
        """The graph's input buffers (their contents change between replays, their addresses never)."""
        self.s_ids = self.query_ids[:, -1:].clone()  # (B, 1) the token fed at each step
        self.s_pos = self.pos[:, -1:] + 1  # (B, 1) its position id
        self.s_cpos = torch.tensor([self.Q], device=self.device)  # (1,) only for a forward that takes it

    @torch.no_grad()
    def capture(self, warmup: int = 3):
        """Capture one decode step in a CUDA graph. The cache must exist first (StaticLayer allocates its
        (B, kv_heads, Q+R, head_dim) buffers lazily at the first update): one prefill. The warm-up steps (on a
        side stream, as PyTorch requires before a capture) write cache slots 0..warmup-1 from a reset cache,
        inside its Q+R slots; the capture itself runs nothing. Autocast's weight-cast cache is off around both:
        PyTorch's CUDA-graph notes require it (a cast cached during capture would be memory the graph owns)."""
        assert self.Q + self.R >= warmup, "the warm-up steps must fit in the cache"
        self.static_inputs()
        self.prefill()
        self.cache.reset()
        self.mask.copy_(self.decode_mask0)
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream), _autocast_cache_off():
            for _ in range(warmup):
                self._step()
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with _autocast_cache_off(), torch.cuda.graph(graph):
            self.s_logp = self._step()  # (B, V) fp32, in the graph's memory: rewritten by every replay
        self.graph = graph

    @torch.no_grad()
    def graph_rollout(self, generator):
        """As `rollout`, with the R-1 decode forwards replayed from the graph."""
        from labkit.sampling import sample_categorical

        B, Q, R = self.B, self.Q, self.R
        tokens = torch.empty(B, R, dtype=torch.long, device=self.device)
        logprobs = torch.empty(B, R, dtype=torch.float32, device=self.device)
        logits = self.prefill()  # eager: one call, its shapes differ from a step's
        self.mask.copy_(self.decode_mask0)
        self.s_pos.copy_(self.pos[:, -1:] + 1)
        self.s_cpos.fill_(Q)
        logp = F.log_softmax(logits[:, -1].float() / self.T, dim=-1)  # (B, V)
        for t in range(R):
            tok = sample_categorical(logp.exp(), generator)  # (B, 1), eager, outside the graph
            tokens[:, t] = tok[:, 0]
            logprobs[:, t] = logp.gather(-1, tok)[:, 0]
            if t == R - 1:
                break
            self.s_ids.copy_(tok)
            self.mask[:, :, :, Q + t] = 0.0
            if t:
                self.s_pos.add_(1)
                self.s_cpos.add_(1)
            self.graph.replay()  # writes cache slot Q+t (the layers' own counters advance in the graph)
            logp = self.s_logp
        return tokens, logprobs


@contextlib.contextmanager
def _autocast_cache_off():
    """Autocast contexts entered inside inherit this (torch.autocast reads the flag when constructed)."""
    before = torch.is_autocast_cache_enabled()
    torch.set_autocast_cache_enabled(False)
    try:
        yield
    finally:
        torch.set_autocast_cache_enabled(before)


def _cpu(out):
    return tuple(t.detach().cpu() for t in out)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="tiny", help="a labkit.models.load_lm name or a local model folder")
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--query", type=int, default=64)
    p.add_argument("--response", type=int, default=24)
    p.add_argument("--temperature", type=float, default=0.7)
    p.add_argument("--repeats", type=int, default=3, help="timed rollouts per arm after one warm-up (median)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--seed", type=int, default=0, help="the generator seed of every arm's first rollout")
    p.add_argument("--no-graph", action="store_true", help="skip the CUDA-graph arm")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    B, Q, R, T = args.batch, args.query, args.response, args.temperature
    result = {"benchmark": "gpu_decode", "device": None, "model": args.model, "batch": B, "query": Q, "response": R, "temperature": T, "repeats": args.repeats,
              "torch": torch.__version__}
    try:
        import transformers

        result["transformers"] = transformers.__version__
    except Exception as e:  # noqa: BLE001
        result["transformers_error"] = _err(e)
    try:
        _run(args, result)
    except Exception as e:  # noqa: BLE001 - whatever happened, the JSON line still comes out
        result["error"] = _err(e)
        traceback.print_exc()
    emit(result)
    return result


def _run(args, result: dict) -> None:
    from labkit import sampling
    from labkit.models import load_lm

    B, Q, R, T = args.batch, args.query, args.response, args.temperature
    # -- the model ---------------------------------------------------------------------------------------------
    try:
        t0 = time.perf_counter()
        model, tok = load_lm(args.model)
        _log(f"loaded {result['model']} in {time.perf_counter() - t0:.1f} s")
    except Exception as e:  # noqa: BLE001
        result["model_error"] = _err(e)
        traceback.print_exc()
        return
    base = sampling.unwrap(model)
    device = next(model.parameters()).device
    result.update({
        "device": str(device), "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
        "params": sum(p.numel() for p in model.parameters()), "layers": getattr(base.config, "num_hidden_layers", None),
        "model_class": type(base).__name__, "attn_implementation": getattr(base.config, "_attn_implementation", None),
        "cache_argument": sampling._cache_argument(type(base)),
    })
    pad_id = tok.pad_token_id if tok.pad_token_id is not None else 0
    query_ids, query_lengths = make_queries(B, Q, base.config.vocab_size, pad_id, device)
    sync = _sync(device)
    gen = lambda seed: torch.Generator(device=device).manual_seed(seed)  # noqa: E731
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    outs = {}

    # -- arm A: labkit's own loop ------------------------------------------------------------------------------
    try:
        _log("eager: labkit's _sample_chunk (DynamicCache) ...")
        run = lambda seed: sampling._sample_chunk(model, query_ids, query_lengths, R, T, gen(seed))[:2]  # noqa: E731
        with torch.no_grad():
            outs["eager"] = _cpu(run(args.seed))  # warm-up, and the reference rollout
            result["eager_s"], times = _timed(lambda: run(args.seed + 1), args.repeats, device)
        result["eager_tokens_per_s"] = round(B * R / result["eager_s"], 1)
        _log(f"eager: {result['eager_s']:.4f} s per rollout ({', '.join(f'{t:.4f}' for t in times)})")
    except Exception as e:  # noqa: BLE001
        result["eager_error"] = _err(e)
        traceback.print_exc()
    try:  # the eager prefill alone, exactly as _sample_chunk runs it
        mask = sampling.left_pad_mask(query_lengths, Q)
        pos = sampling.positions(mask)
        only = mask.new_tensor([Q - 1])
        pre = lambda: sampling.lm_forward(model, query_ids, mask, pos, keep=1, use_cache=True, only=only)  # noqa: E731
        with torch.no_grad():
            pre()
            result["prefill_eager_s"], _ = _timed(pre, args.repeats, device)
    except Exception as e:  # noqa: BLE001
        result["prefill_eager_error"] = _err(e)

    # -- arm B: static cache, explicit 4-D mask ----------------------------------------------------------------
    dec = None
    try:
        _log("static: StaticCache + 4-D additive mask ...")
        dec = StaticDecoder(model, query_ids, query_lengths, R, T)
        result.update({"compute_dtype": str(dec.compute_dtype).removeprefix("torch."),
                       "static_cache_kwargs": sorted(dec.cache_kwargs),
                       "cache_position_passed": dec.cache_position_arg})
        with torch.no_grad():
            outs["static"] = _cpu(dec.rollout(gen(args.seed)))
            result["static_s"], times = _timed(lambda: dec.rollout(gen(args.seed + 1)), args.repeats, device)
            dec.prefill()
            result["prefill_static_s"], _ = _timed(dec.prefill, args.repeats, device)
        result["static_tokens_per_s"] = round(B * R / result["static_s"], 1)
        _log(f"static: {result['static_s']:.4f} s per rollout ({', '.join(f'{t:.4f}' for t in times)})")
    except Exception as e:  # noqa: BLE001
        result["static_error"] = _err(e)
        traceback.print_exc()

    # -- sampling alone: what a graph that also captured sampling could save at most ---------------------------
    try:
        V = base.config.vocab_size
        logits = torch.randn(B, V, device=device, generator=gen(args.seed)) * 3

        def sampling_only():
            g = gen(args.seed)
            for _ in range(R):
                logp = F.log_softmax(logits.float() / T, dim=-1)
                tok_ = sampling.sample_categorical(logp.exp(), g)
                logp.gather(-1, tok_)

        sampling_only()
        s, _ = _timed(sampling_only, args.repeats, device)
        result["sampling_step_ms"] = round(1e3 * s / R, 4)
    except Exception as e:  # noqa: BLE001
        result["sampling_error"] = _err(e)

    # -- arm C: CUDA graph per decode step (last: a device-side failure spoils the context) --------------------
    result["graph_s"] = None
    result["graph_sampling"] = "outside the graph (eager, same generator)"
    if device.type != "cuda":
        result["graph_skipped"] = "no CUDA device"
    elif args.no_graph:
        result["graph_skipped"] = "--no-graph"
    elif R < 2:
        result["graph_skipped"] = "response < 2: no decode step to capture"
    elif dec is None:
        result["graph_error"] = "static arm could not be set up: " + result.get("static_error", "?")
    else:
        try:
            _log("graph: capturing one decode step ...")
            t0 = time.perf_counter()
            dec.capture()
            sync()
            result["graph_capture_s"] = round(time.perf_counter() - t0, 3)
            with torch.no_grad():
                outs["graph"] = _cpu(dec.graph_rollout(gen(args.seed)))
                result["graph_s"], times = _timed(lambda: dec.graph_rollout(gen(args.seed + 1)), args.repeats, device)
            result["graph_tokens_per_s"] = round(B * R / result["graph_s"], 1)
            _log(f"graph: {result['graph_s']:.4f} s per rollout ({', '.join(f'{t:.4f}' for t in times)})")
            replays = []  # R-1 replays back to back from a reset cache: forward + log-softmax, no sampling
            for _ in range(args.repeats):
                dec.cache.reset()
                sync()
                t0 = time.perf_counter()
                for _ in range(R - 1):
                    dec.graph.replay()
                sync()
                replays.append(time.perf_counter() - t0)
            result["graph_replay_step_ms"] = round(1e3 * statistics.median(replays) / (R - 1), 4)
        except Exception as e:  # noqa: BLE001
            result["graph_s"] = None
            result["graph_error"] = _err(e)
            traceback.print_exc()

    # -- summary -----------------------------------------------------------------------------------------------
    for arm, prefill in (("eager", "prefill_eager_s"), ("static", "prefill_static_s"), ("graph", "prefill_static_s")):
        if result.get(f"{arm}_s") and result.get(prefill) is not None and R > 1:  # decode step incl. sampling
            result[f"{arm}_decode_step_ms"] = round(1e3 * (result[f"{arm}_s"] - result[prefill]) / (R - 1), 4)
        if arm != "eager" and result.get(f"{arm}_s") and result.get("eager_s"):
            result[f"{arm}_speedup"] = round(result["eager_s"] / result[f"{arm}_s"], 3)
    for arm, ref in (("static", "eager"), ("graph", "eager"), ("graph_vs_static", "static")):
        mine = "graph" if arm == "graph_vs_static" else arm
        if mine in outs and ref in outs:
            for k, v in compare(*outs[ref], *outs[mine]).items():
                result[f"{arm}_{k}"] = v
    for k in ("eager_s", "static_s", "graph_s", "prefill_eager_s", "prefill_static_s"):
        if result.get(k) is not None:
            result[k] = round(result[k], 5)
    if device.type == "cuda":
        try:
            result["peak_gpu_gib"] = round(torch.cuda.max_memory_allocated(device) / 2**30, 2)
        except Exception as e:  # noqa: BLE001 - a spoilt CUDA context after a failed arm
            result["peak_gpu_error"] = _err(e)


if __name__ == "__main__":
    main()
