"""Rollouts and log-probs: batched sampling at the task temperature, truncation, scoring passes.

Conventions (shapes): B batch, Q query length (left-padded), R response length, H hidden size, V vocab.
- Queries are left-padded; the attention mask comes from `query_lengths`, never from `token == pad`.
- Position ids are `cumsum(mask) - 1`, so a left-padded row sees the same positions as the row alone.
- Responses are exactly R tokens: EOS does not stop generation and is not forbidden either (HF's
  `min_new_tokens` would forbid it and so change the distribution; we run our own KV-cache loop).
- Log-probs are of the temperature-scaled distribution, log softmax(logits / T), for the sampler and
  for every scoring pass (the paper: the KL is between the tempered distributions).
- `masked_ids`: vocabulary columns that are never sampled and left out of every log-prob's normalisation
  (labkit.models.never_sampled_ids: chat control tokens, labkit's added pad, head rows with no token). The
  released code slices the logits to the real vocabulary in every pass (policy.py Policy.step_core,
  `lm_logits[:,:,:n_vocab]`, used by both the sampler and the scoring passes); here their logits are set to
  MASKED_LOGIT after the temperature, in the sampler and in every scoring pass alike, so that pi, rho and the
  sampler share one distribution. `sample` computes them from its tokenizer; the scoring passes take them
  as an argument (None = the whole head).
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from labkit.models import never_sampled_ids
from labkit.speed import last_mlp
from labkit.speed.blocks import unwrap
from labkit.tasks import Task, token_ids_matching, truncation_index

MASKED_LOGIT = -1e9
"""The tempered logit of a masked column, written into fp32 (or wider) logits: exp(-1e9 - logsumexp) is exactly 0,
so the column gets no probability and no gradient, and p * log p there is 0 * (-1e9) = 0 (an entropy stays finite, where
-inf would give 0 * -inf = NaN). Set after dividing by the temperature, so that a small T cannot overflow it."""


def masked_ids_for(model, tokenizer) -> tuple[int, ...]:
    """The ids `model`'s head never samples with `tokenizer` (labkit.models.never_sampled_ids over its head's rows):
    what `sample` masks by default, and what every scoring pass of its responses must pass as `masked_ids`."""
    head = unwrap(model).get_output_embeddings()
    rows = head.weight.shape[0] if head is not None else unwrap(model).config.vocab_size  # global rows under FSDP
    return never_sampled_ids(tokenizer, rows)


def mask_index(masked_ids: Sequence[int] | torch.Tensor | None, device) -> torch.Tensor | None:
    """`masked_ids` as a 1-D long tensor on `device` for `index_fill_`, or None when there is nothing to mask."""
    if masked_ids is None or len(masked_ids) == 0:
        return None
    if isinstance(masked_ids, torch.Tensor):
        return masked_ids.to(device=device, dtype=torch.long)
    return torch.tensor(list(masked_ids), dtype=torch.long, device=device)


def pad_left(seqs: list[list[int]], pad_id: int, device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-pad token lists: ids (B, Q) and lengths (B,)."""
    if not seqs:
        raise ValueError("pad_left needs at least one sequence.")
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    for i, s in enumerate(seqs):
        if len(s):
            ids[i, width - len(s) :] = torch.tensor(s, dtype=torch.long)
    lengths = torch.tensor([len(s) for s in seqs], dtype=torch.long)
    return ids.to(device), lengths.to(device)


def left_pad_mask(lengths: torch.Tensor, width: int) -> torch.Tensor:
    """(B, width) long mask that is 1 on the last `lengths[b]` positions of each row."""
    cols = torch.arange(width, device=lengths.device)
    return (cols[None, :] >= (width - lengths)[:, None]).long()


def positions(mask: torch.Tensor) -> torch.Tensor:
    """Position ids for a (possibly left-padded) mask: cumsum - 1, clamped at 0 on padding."""
    return (mask.cumsum(-1) - 1).clamp(min=0)


@dataclass
class Rollout:
    """A batch of sampled responses and everything PPO and the labeler need about them."""

    query_ids: torch.Tensor  # (B, Q) left-padded
    query_lengths: torch.Tensor  # (B,)
    response_ids: torch.Tensor  # (B, R) all R sampled tokens; PPO trains on and charges KL for all
    logprobs: torch.Tensor  # (B, R) tempered log-probs of response_ids under the sampler
    truncated_ids: torch.Tensor  # (B, R) response_ids with everything after the truncation token = pad
    truncated_lengths: torch.Tensor  # (B,) tokens kept by truncation (R when no truncation token)
    found: torch.Tensor  # (B,) bool: a truncation token was found (else the score becomes the penalty)
    query_texts: list[str]
    response_texts: list[str]  # decoded truncated responses: what the reward model and labelers see
    # The sampler's own keys and values of the queries' first Q-1 positions, one (keys, values) pair of
    # (B, kv_heads, Q-1, head_dim) per layer, kept only when asked for (`sample(keep_query_prefix=True)`):
    # PPO's scoring pass continues from them instead of running pi over the queries again.
    query_prefix: list[tuple[torch.Tensor, torch.Tensor]] | None = None
    # The ids the sampler never sampled (`sample`'s `masked_ids`, sorted), or None for the whole head: scoring
    # passes over these responses pass the same (`forward_responses(masked_ids=...)`) so that both sides of a
    # ratio or a KL are one distribution.
    masked_ids: tuple[int, ...] | None = None

    def __len__(self) -> int:
        return self.response_ids.shape[0]


def truncate(response_ids: torch.Tensor, task: Task, tokenizer) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Apply the task's truncation rule: (truncated_ids (B, R), lengths (B,), found (B,) bool)."""
    B, R = response_ids.shape
    if task.truncation is None:
        dev = response_ids.device
        return response_ids.clone(), torch.full((B,), R, device=dev), torch.ones(B, dtype=torch.bool, device=dev)
    match = token_ids_matching(tokenizer, task.truncation.text, task.truncation.tokens)
    rows = response_ids.tolist()
    out = response_ids.clone()
    lengths, found = [], []
    for b, row in enumerate(rows):
        idx = truncation_index(row, task.truncation, match)
        keep = len(row) if idx is None else idx + 1  # the truncation token itself is kept
        out[b, keep:] = tokenizer.pad_token_id
        lengths.append(keep)
        found.append(idx is not None)
    dev = response_ids.device
    return out, torch.tensor(lengths, device=dev), torch.tensor(found, dtype=torch.bool, device=dev)


def decode_responses(tokenizer, ids: torch.Tensor, lengths: torch.Tensor) -> list[str]:
    return tokenizer.batch_decode([row[:n] for row, n in zip(ids.tolist(), lengths.tolist())], skip_special_tokens=True)


@torch.no_grad()
def sample(
    model,
    tokenizer,
    queries: list[list[int]],
    task: Task,
    generator: torch.Generator | None = None,
    batch_size: int | None = None,
    response_length: int | None = None,
    keep_query_prefix: bool = False,
    masked_ids: Sequence[int] | None | str = "tokenizer",
) -> Rollout:
    """Sample exactly `task.response_length` tokens per query at the task temperature (top_k 0, top_p 1).

    `generator` makes sampling reproducible (it must live on the model's device). `batch_size` splits a
    large request into chunks to bound memory; all chunks share one left-padding width.
    `keep_query_prefix` keeps the prefill's keys and values in `Rollout.query_prefix` (see `query_prefix`).
    `masked_ids`: the ids never sampled (module docstring); "tokenizer" (the default) computes them
    (`masked_ids_for(model, tokenizer)`), None samples from the whole head. Scoring passes of these responses
    must mask the same ids (`forward_responses(masked_ids=rollout.masked_ids)`).
    """
    device = next(model.parameters()).device
    R = response_length or task.response_length
    if isinstance(masked_ids, str):
        if masked_ids != "tokenizer":
            raise ValueError(f"masked_ids = {masked_ids!r}: must be 'tokenizer', None or a sequence of token ids.")
        masked_ids = masked_ids_for(model, tokenizer)
    masked_ids = tuple(sorted(int(i) for i in masked_ids)) if masked_ids is not None and len(masked_ids) else None
    masked = mask_index(masked_ids, device)
    query_ids, query_lengths = pad_left(queries, tokenizer.pad_token_id, device)
    step = batch_size or len(queries)
    responses, logprobs, prefixes = [], [], []
    for start in range(0, len(queries), step):
        ids, lp, prefix = _sample_chunk(model, query_ids[start : start + step], query_lengths[start : start + step], R,
                                        task.temperature, generator, keep_query_prefix, masked)
        responses.append(ids)
        logprobs.append(lp)
        prefixes.append(prefix)
    response_ids = torch.cat(responses)
    truncated_ids, truncated_lengths, found = truncate(response_ids, task, tokenizer)
    return Rollout(
        query_ids=query_ids,
        query_lengths=query_lengths,
        response_ids=response_ids,
        logprobs=torch.cat(logprobs),
        truncated_ids=truncated_ids,
        truncated_lengths=truncated_lengths,
        found=found,
        query_texts=tokenizer.batch_decode(queries, skip_special_tokens=True),
        response_texts=decode_responses(tokenizer, truncated_ids, truncated_lengths),
        query_prefix=_cat_prefixes(prefixes, query_ids.shape[1]) if keep_query_prefix else None,
        masked_ids=masked_ids,
    )


def _prefix_of(cache) -> list[tuple[torch.Tensor, torch.Tensor]] | None:
    """Per layer, the (keys, values) (B, kv_heads, Q, head_dim) in a DynamicCache straight after a prefill, or
    None where the cache is not plain per-position keys and values (a sliding window, say): PPO then scores
    whole sequences. Later `update`s concatenate into new tensors, so these stay the prefill's."""
    from transformers.cache_utils import DynamicLayer

    layers = getattr(cache, "layers", None)
    if not layers or any(type(layer) is not DynamicLayer for layer in layers):
        return None
    return [(layer.keys, layer.values) for layer in layers]


def prefix_rows(prefix: list[tuple[torch.Tensor, torch.Tensor]] | None, rows: slice):
    """The rows `rows` of a query prefix (views), or None for None."""
    return None if prefix is None else [(k[rows], v[rows]) for k, v in prefix]


def _cat_prefixes(prefixes: list, Q: int) -> list[tuple[torch.Tensor, torch.Tensor]] | None:
    """The first Q-1 positions of each chunk's prefill, joined over the chunks' rows (None if any chunk has none)."""
    if Q < 2 or any(p is None for p in prefixes):
        return None
    return [(torch.cat([p[i][0][:, :, : Q - 1] for p in prefixes]), torch.cat([p[i][1][:, :, : Q - 1] for p in prefixes]))
            for i in range(len(prefixes[0]))]


@torch.no_grad()
def query_prefix(model, query_ids: torch.Tensor, query_lengths: torch.Tensor,
                 batch_size: int | None = None) -> list[tuple[torch.Tensor, torch.Tensor]] | None:
    """`model`'s keys and values over the first Q-1 query positions, computed exactly as `sample` computes
    its own (the same prefill call on the same chunks of rows), so that for equal weights they are equal bit
    for bit. None where the model's cache is not plain keys and values (see `_prefix_of`)."""
    B, Q = query_ids.shape
    prefixes = []
    for s in batch_slices(B, batch_size):
        _, cache = prefill(model, query_ids[s], query_lengths[s])
        prefixes.append(_prefix_of(cache))
    return _cat_prefixes(prefixes, Q)


def prefill(model, query_ids: torch.Tensor, query_lengths: torch.Tensor):
    """One forward over left-padded queries (B, Q), keeping the cache: returns (logits (B, 1, V) at the last query
    position, the cache). Rows holding the same query run once and are copied: k responses to one prompt (a k-way
    comparison) share one prefill, and the prefill is most of a sampling chunk's work (Q positions per row, against
    R one-position steps). The sampler and `query_prefix` both come here, so at equal weights their keys and values
    stay equal bit for bit."""
    B, Q = query_ids.shape
    # distinct (query, length) rows; `inverse` maps each row to its distinct one
    distinct, inverse = torch.unique(torch.cat([query_ids, query_lengths[:, None]], dim=1), dim=0, return_inverse=True)
    shared = len(distinct) < B  # all rows distinct: run them as given, in their order (bit-for-bit the old path)
    ids, lengths = (distinct[:, :Q], distinct[:, Q]) if shared else (query_ids, query_lengths)
    mask = left_pad_mask(lengths, Q)
    logits, _, cache = lm_forward(model, ids, mask, positions(mask), keep=1, use_cache=True,
                                  only=mask.new_tensor([Q - 1]))
    if shared:
        cache.batch_select_indices(inverse)  # (D, ...) -> (B, ...) per layer: new tensors, row b a copy of inverse[b]'s
        logits = logits[inverse]
    return logits, cache


def batch_slices(n: int, size: int | None) -> list[slice]:
    """Slices of at most `size` rows covering range(n) (None: one slice)."""
    size = size or max(n, 1)
    return [slice(i, i + size) for i in range(0, n, size)]


def autocast_for(model):
    """The precision `model`'s matmuls run in: bf16 autocast (weights stay fp32, see `models.pick_dtype`) or none.

    The model's `labkit_bf16_autocast` (set by `load_lm`; copies keep it) decides; unset or None means on for
    a CUDA device with bf16 and off on a CPU. Every model call in labkit (`lm_forward`) runs inside this, so
    training steps and no-grad scoring passes use the same precision and both sides of a ratio or a KL come
    from the same kind of pass.
    """
    device = next(model.parameters()).device
    wanted = getattr(unwrap(model), "labkit_bf16_autocast", None)
    if wanted is None:
        wanted = device.type == "cuda" and torch.cuda.is_bf16_supported()
    return torch.autocast(device.type, dtype=torch.bfloat16) if wanted else contextlib.nullcontext()


def _avoid_cudnn_attention_for_training(device: torch.device) -> None:
    """Before the first GPU pass with gradients, switch SDPA's cuDNN kernel off for this process.

    Why: cuDNN's SDPA backward, SDPA's first choice on Hopper GPUs since torch 2.11 (still in 2.13), returns NaN
    gradients for the queries when a mask is passed and some query row's log-sum-exp is below about -88.7
    (pytorch/pytorch#196678; huggingface/trl#7181): a fully masked row has -inf, and every left-padded query
    has such rows at its padding. On an H200 (torch 2.11) a reward model trained on padded queries reached a
    NaN loss within 5 steps (benchmarks/results/gpu_ppo.jsonl, part "mock"). The backward runs the kernel its
    forward chose, so no-gradient passes before any training (sampling, scoring) may keep cuDNN's forward,
    which is correct. Process-wide rather than a context around each pass: `sdpa_kernel` sets the same global
    flags and restores them on exit, which a pass in another thread (background training, an online refit)
    could undo mid-way. SDPA then picks flash or memory-efficient attention, as before torch 2.11.
    """
    if device.type == "cuda" and torch.is_grad_enabled() and torch.backends.cuda.cudnn_sdp_enabled():
        torch.backends.cuda.enable_cudnn_sdp(False)


def is_sharded(model) -> bool:
    """The model is split across processes by FSDP2 (labkit.distributed.shard_model)."""
    from torch.distributed.fsdp import FSDPModule

    return isinstance(unwrap(model), FSDPModule)


@functools.lru_cache(maxsize=None)
def _cache_argument(model_class) -> str:
    """transformers 5.2x renamed `past_key_values` to `cache`; support both (looked up once per model class)."""
    import inspect

    return "cache" if "cache" in inspect.signature(model_class.forward).parameters else "past_key_values"


def lm_forward(model, input_ids, attention_mask, position_ids, keep, want_hidden: bool = False, cache=None,
               use_cache: bool = False, only: torch.Tensor | None = None, layer: int | None = None):
    """One call of the causal LM's own `forward`: logits only at the positions in `keep`, and optionally the
    final hidden states. Returns (logits (B, K, V), hidden (B, T, H) or None, cache or None).

    keep: an int k (the last k positions) or a 1-D tensor of positions; an empty tensor computes no logits
    (the reward model's case). Every model call in labkit goes through here, and through the model's own
    `forward` rather than its trunk and head separately, so that the hooks of a sharding wrapper (FSDP2's
    `fully_shard` on the whole model, labkit.distributed.shard_model) fire on every call. The hidden states
    are the last of `output_hidden_states` (after the final norm): being part of the model's output, a
    backward pass from them alone (the reward model's loss) still passes through FSDP's backward hooks.
    only: the 1-D positions of the T inputs whose outputs the caller reads (`keep` must be among them);
    `hidden` is then (B, K, H) at those positions, and with the speed layer on the last block's MLP runs there
    only (labkit/speed/last_mlp.py).
    layer: the hidden states returned are `output_hidden_states[layer]` (0: the embeddings, L: block L's output)
    instead of the final ones (None).
    """
    base = unwrap(model)
    cache_arg = _cache_argument(type(base))
    extra = {cache_arg: cache} if cache is not None else {}
    _avoid_cudnn_attention_for_training(input_ids.device)
    with autocast_for(model), last_mlp.reading_only(base, only, input_ids.shape[1]):
        out = base(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, use_cache=use_cache,
                   logits_to_keep=keep, output_hidden_states=want_hidden, **extra)
    new_cache = (out.cache if cache_arg == "cache" else out.past_key_values) if use_cache else None
    hidden = out.hidden_states[-1 if layer is None else layer] if want_hidden else None
    if hidden is not None and only is not None:
        hidden = hidden[:, only]
    return out.logits, hidden, new_cache


def sample_categorical(probs: torch.Tensor, generator: torch.Generator | None = None, block: int = 1024) -> torch.Tensor:
    """One index per row of `probs` (B, V), drawn with probability proportional to the row: (B, 1).

    Inverse-CDF sampling: one uniform number per row against the running sum, in two levels: the running sum
    of the row's blocks of `block` entries picks a block, then the running sum inside that block picks the
    entry. `torch.multinomial` draws one exponential number per vocabulary entry (B * 49,152 per token on
    SmolLM2, from a sequential CPU generator), and a float64 running sum over the whole row is a sequential
    scan after a copy: both cost a large share of a CPU rollout. The sums are in float64,
    so their rounding (~1e-16) is far below any probability a float32 softmax can express, and the target
    inside the block is clamped into [0, block total) so that an entry with zero probability (or the zero
    padding of the last block) is never drawn.
    """
    B, V = probs.shape
    nb = -(-V // block)
    blocks = (F.pad(probs, (0, nb * block - V)) if V % block else probs).reshape(B, nb, block)  # (B, nb, block)
    mass = blocks.sum(-1, dtype=torch.float64)  # (B, nb)
    cdf = mass.cumsum(-1)  # (B, nb)
    u = torch.rand(B, 1, generator=generator, dtype=torch.float64, device=probs.device) * cdf[:, -1:]  # [0, total)
    j = torch.searchsorted(cdf, u, right=True).clamp_(max=nb - 1)  # (B, 1): first block whose running sum exceeds u
    inner = blocks[torch.arange(B, device=probs.device), j[:, 0]].cumsum(-1, dtype=torch.float64)  # (B, block)
    top = inner[:, -1:]
    r = (u - (cdf.gather(1, j) - mass.gather(1, j))).clamp_(min=0)  # what is left of u inside block j
    r = torch.minimum(r, torch.nextafter(top, torch.zeros_like(top)))  # below the block's total: a positive entry
    k = torch.searchsorted(inner, r, right=True)  # (B, 1)
    return (j * block + k).clamp_(max=V - 1)  # the clamp only matters for a row with no mass at all


def _sample_chunk(model, query_ids, query_lengths, R, temperature, generator, keep_prefix=False, masked=None):
    """KV-cache sampling loop: response_ids (B, R), logprobs (B, R), and (if `keep_prefix`) the prefill's keys
    and values per layer (`_prefix_of`), else None.

    The vocabulary head runs on one position per step (logits_to_keep=1). `masked`: a 1-D long tensor of
    columns never sampled (`mask_index`), or None.
    """
    B, Q = query_ids.shape
    mask = left_pad_mask(query_lengths, Q)
    pos = positions(mask)
    tokens = torch.empty(B, R, dtype=torch.long, device=query_ids.device)
    logprobs = torch.empty(B, R, dtype=torch.float32, device=query_ids.device)
    next_pos = pos[:, -1:] + 1  # (B, 1)
    logits, cache = prefill(model, query_ids, query_lengths)  # token 0's
    prefix = _prefix_of(cache) if keep_prefix else None  # taken now: the loop replaces the cache's tensors
    for t in range(R):
        scaled = logits[:, -1].float() / temperature  # (B, V), a new tensor: masked in place below
        if masked is not None:
            scaled.index_fill_(-1, masked, MASKED_LOGIT)
        logp = F.log_softmax(scaled, dim=-1)  # (B, V)
        tok = sample_categorical(logp.exp(), generator)  # (B, 1)
        tokens[:, t] = tok[:, 0]
        logprobs[:, t] = logp.gather(-1, tok)[:, 0]
        if t == R - 1:
            break
        mask = torch.cat([mask, mask.new_ones(B, 1)], dim=1)
        logits, _, cache = lm_forward(model, tok, mask, next_pos, keep=1, cache=cache, use_cache=True)
        next_pos = next_pos + 1
    return tokens, logprobs, prefix


class _TemperedLogprobs(torch.autograd.Function):
    """log softmax(logits / T)[ids], computed in the logits' own buffer, with a backward that reuses it.

    `masked` (a 1-D long tensor or None): columns set to MASKED_LOGIT after the division, in whichever buffer
    the log-softmax reads (no extra (B, R, V) tensor), so they are out of the normalisation; their gradient
    is 0 (they are constants), which the backward enforces even for a response holding a masked id.

    A fresh (B, R, V) tensor is costly on a CPU: 75 MB for 16 x 24 x 49,152 floats, above glibc's mmap
    threshold, so every one is new pages for the kernel to map and zero. The plain chain (divide, log_softmax,
    gather) allocates two in forward and three in backward (the gather's zeros, log_softmax's gradient, the
    division's gradient). Here the forward divides and takes the log-softmax in place in the logits tensor
    (the head's output, used for nothing else: `tempered_logprobs` consumes it), and the backward writes the
    gradient with respect to the logits, (onehot(ids) - softmax) * g / T, into that same buffer.
    The buffer is consumed: the graph can be backpropagated once. On a GPU (a caching allocator, no page
    faults), for a leaf that requires grad, and for low-precision autocast logits (whose softmax runs in
    fp32) the forward writes a new buffer instead.
    """

    @staticmethod
    def forward(ctx, logits, ids, temperature, masked=None):
        ctx.set_materialize_grads(False)  # else backward gets a zero-filled (B, R, V) for the second output
        low_precision = logits.dtype in (torch.float16, torch.bfloat16)
        leaf = logits.requires_grad and logits.grad_fn is None
        in_place = not low_precision and logits.device.type == "cpu" and not leaf
        if low_precision:  # autocast's head output: softmax in fp32
            scaled = logits.float() / temperature  # (B, R, V)
        elif in_place:  # (the CPU kernel reduces each row before it writes the row)
            scaled = logits.div_(temperature)
            ctx.mark_dirty(logits)
        else:  # a GPU, or a leaf (kept as it is)
            scaled = logits / temperature
        if masked is not None:  # in the buffer just written (fp32 or wider): B * R * len(masked) writes
            scaled.index_fill_(-1, masked, MASKED_LOGIT)
        logp_all = torch.log_softmax(scaled, dim=-1, out=logits) if in_place else torch.log_softmax(scaled, dim=-1)
        ctx.save_for_backward(logp_all, ids)
        ctx.mark_non_differentiable(logp_all)
        ctx.temperature, ctx.masked = temperature, masked
        return logp_all.gather(-1, ids.unsqueeze(-1)).squeeze(-1), logp_all  # (B, R), and the buffer for metrics

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad, _grad_logp_all):
        if grad is None:  # only the buffer was used (no materialised zeros: see forward)
            return None, None, None, None
        logp_all, ids = ctx.saved_tensors  # a second backward fails here: autograd sees the buffer was modified
        g = (grad / ctx.temperature).unsqueeze(-1)  # (B, R, 1)
        out = logp_all.exp_().mul_(-g)  # -softmax * g / T, in place (exactly 0 in masked columns)
        out.scatter_add_(-1, ids.unsqueeze(-1), g)  # + onehot(ids) * g / T
        if ctx.masked is not None:  # a masked column is a constant: no gradient, even where ids holds it
            out.index_fill_(-1, ctx.masked, 0.0)
        return out, None, None, None


def tempered_logprobs(logits: torch.Tensor, ids: torch.Tensor, temperature: float, want_entropy: bool = False,
                      masked_ids: Sequence[int] | torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(B, R) log-probs of `ids` (B, R) under softmax(logits / T) for logits (B, R, V), and optionally the
    (B, R) entropy of that distribution (a metric: no gradient). Consumes `logits`: on a CPU, unless it is a
    leaf or in low precision, it holds the log-softmax afterwards (see `_TemperedLogprobs`).
    `masked_ids`: columns left out of the distribution (module docstring); None = none. A masked id in `ids`
    gets a log-prob of about MASKED_LOGIT (finite) and no gradient."""
    logprobs, logp_all = _TemperedLogprobs.apply(logits, ids, temperature, mask_index(masked_ids, logits.device))
    entropy = None
    if want_entropy:  # computed before any backward consumes the buffer; holds no (B, R, V) tensor for backward
        with torch.no_grad():
            entropy = -torch.linalg.vecdot(logp_all.exp(), logp_all)  # one (B, R, V) temporary, not two
    return logprobs, entropy


@dataclass
class ResponseForward:
    """Per-response-token outputs of one forward pass over query + response."""

    logprobs: torch.Tensor | None  # (B, R) tempered log-probs of the response tokens (unless not wanted)
    entropy: torch.Tensor | None  # (B, R) entropy of the tempered distribution, if asked for
    hidden: torch.Tensor | None  # (B, R, H) final hidden state at the position before each response token


def forward_responses(
    model,
    query_ids: torch.Tensor,
    query_lengths: torch.Tensor,
    response_ids: torch.Tensor,
    temperature: float,
    want_entropy: bool = False,
    want_hidden: bool = False,
    want_logprobs: bool = True,
    prefix: list[tuple[torch.Tensor, torch.Tensor]] | None = None,
    masked_ids: Sequence[int] | torch.Tensor | None = None,
) -> ResponseForward:
    """Score `response_ids` (B, R) after left-padded queries under `model` (grad follows the caller).

    One forward pass; the vocabulary head is applied only at the R positions that predict response tokens
    (position Q-1+t predicts response token t), so no (B, Q+R, V) logits tensor is ever built.
    `want_logprobs=False` skips the head altogether (a value model needs only the hidden states).
    `prefix`: `model`'s own keys and values of these rows' first Q-1 query positions (`query_prefix`,
    `Rollout.query_prefix`); then only the R positions Q-1 .. Q+R-2 run, over that cache (no-grad scoring:
    no gradient reaches the prefix). Equal to the whole pass up to float rounding (~2e-5 in a log-prob).
    `masked_ids`: the columns the sampler never samples (`sample`'s, `never_sampled_ids`), left out of the
    log-probs' and the entropy's distribution; None = the whole head.
    """
    B, Q = query_ids.shape
    R = response_ids.shape[1]
    mask = torch.cat([left_pad_mask(query_lengths, Q), query_lengths.new_ones(B, R)], dim=1)  # (B, Q+R)
    pos = positions(mask)
    if prefix is None:
        # the last response token is input to nothing: positions 0 .. Q+R-2 only (causal, so the rest are unchanged)
        input_ids = torch.cat([query_ids, response_ids[:, :-1]], dim=1)  # (B, Q+R-1)
        mask, pos = mask[:, : Q + R - 1], pos[:, : Q + R - 1]
        keep = torch.arange(Q - 1, Q + R - 1, device=input_ids.device)  # position Q-1+t predicts response token t
        cache, read = None, keep  # outputs are read at these R positions only (`prune_last_mlp`)
    else:
        from transformers import DynamicCache

        cache = DynamicCache()
        for layer, (k, v) in enumerate(prefix):
            cache.update(k, v, layer)  # copies: the rollout's prefix stays as it was
        input_ids = torch.cat([query_ids[:, Q - 1 :], response_ids[:, :-1]], dim=1)  # (B, R): positions Q-1 .. Q+R-2
        mask, pos = mask[:, : Q + R - 1], pos[:, Q - 1 : Q + R - 1]
        keep = torch.arange(R, device=input_ids.device)
        read = None  # every input position is read
    if not want_logprobs:
        keep = keep[:0]  # no logits at all
    logits, h, _ = lm_forward(model, input_ids, mask, pos, keep, want_hidden=want_hidden, cache=cache,
                              use_cache=cache is not None, only=read)  # h: (B, R, H) or None
    if not want_logprobs:
        return ResponseForward(logprobs=None, entropy=None, hidden=h)
    logprobs, entropy = tempered_logprobs(logits, response_ids, temperature, want_entropy, masked_ids)
    return ResponseForward(logprobs=logprobs, entropy=entropy, hidden=h)


def score_logprobs(model, query_ids, query_lengths, response_ids, temperature: float,
                   masked_ids: Sequence[int] | torch.Tensor | None = None) -> torch.Tensor:
    """(B, R) tempered log-probs of the responses under `model`, without gradients (`masked_ids`: see
    `forward_responses`)."""
    with torch.no_grad():
        return forward_responses(model, query_ids, query_lengths, response_ids, temperature,
                                 masked_ids=masked_ids).logprobs
