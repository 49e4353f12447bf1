"""The reward model r(x, y): an LM trunk plus a scalar head (trained in labkit.reward.train).

Following the released code of Ziegler et al. (2019), rewards.py RewardModelTrainer:
- r reads the final hidden state (after the last layer norm) at the last real token of query + response;
  head ~ N(0, 1/sqrt(d_model + 1)), bias 0; then r = gain * head(h) + bias.
- The query r reads is the task's query WITHOUT its prefix and suffix (`reward_query`): the released code
  formats queries only for the policy (train_policy.py: `Policy(embed_queries=lm_tasks.query_formatter(...))`)
  and scores `score_fn(queries, responses)` on the raw ones (rewards.py TrainedRewardModel.score_fn concatenates
  queries and responses), as its label files store them. For the style tasks both are the same.
- Loss for "best of k": softmax cross-entropy over the k rewards (pairs are the k = 2 case). Chance: ln k.
- One epoch by default, learning rate decayed linearly to 0.
- `normalize` sets gain and bias before and after training so that r has mean 0 and std 1 on fresh,
  untruncated samples from the frozen base model rho at the task temperature (so beta and the -1 penalty
  mean the same thing across runs); it measures the raw head, as the released code resets gain 1 / bias 0
  first (rewards.py reset_reward_scale). The sampler must be rho, not the reward model's own trunk.
  Departure: the released code also TRAINS gain and bias between the two normalisations (they are in
  RewardModelTrainer.get_params); labkit keeps them fixed while training. The second normalisation rescales
  either way, so this changes only the training dynamics of one scalar (its effective learning rate).
Departure, opt-in (`pool`, `layer`): r can read, instead of the last token's final hidden state, the mean of a
hidden layer's states over the response's tokens, e.g. `pool="mean", layer=15` on SmolLM2's 30 blocks. The released
reward model reads only the former (rewards.py RewardModelTrainer._build: `lm_output['reward'][:, -1]`, the scalar
head at the last position). With the trunk frozen and a head fitted on a hundred labels (RewardConfig.head_l2), the
head can only use what the features already hold, and on the quickstart's mock sentiment labels a middle layer's
response mean held more of it (benchmarks/reward_features.py, and the VADER the policy gained:
benchmarks/quickstart_eval.py). The default stays the released one. The blocks above `layer` still run (the LM's
own forward, as every call in labkit): with layer 15 of 30, about half of the scoring's compute is not needed.
Saved without pickle: safetensors for weights, JSON for the config, and the training's metrics as
metrics.jsonl (`history`), so that a notebook that loads the model can still show how it trained.
"""

from __future__ import annotations

import json
import math
import os
import random
import warnings
from pathlib import Path

import torch
import torch.nn as nn

from labkit import distributed
from labkit.models import tokenizer_fingerprint
from labkit.sampling import batch_slices, is_sharded, left_pad_mask, lm_forward, pad_left, positions, sample, unwrap
from labkit.tasks import Task, format_query

_VERSION = 4  # reward_config.json: 2 added the task and tokenizer, 3 the query format, 4 the pool and layer
POOLS = ("last", "mean")
"""What r reads of a layer's hidden states: the last real token's ("last", as released) or the mean over the
response's tokens ("mean")."""


def query_format_ids(task: Task, tokenizer) -> dict:
    """The token ids `format_query` puts before and after a task's source text: {"prefix": [...], "suffix": [...]}."""
    def enc(text):
        return tokenizer.encode(text, add_special_tokens=False) if text else []
    return {"prefix": enc(task.query_prefix), "suffix": enc(task.query_suffix)}


def strip_query_format(query: list[int], query_format: dict | None) -> list[int]:
    """A formatted query's ids without its prefix and suffix, as the reward model reads it (module docstring).

    Each is removed only where the query starts / ends with it, so a query stored bare (the released label
    files keep queries without them) is returned unchanged."""
    if not query_format:
        return list(query)
    prefix, suffix = query_format["prefix"], query_format["suffix"]
    start = len(prefix) if prefix and query[: len(prefix)] == prefix else 0
    end = len(query) - len(suffix) if suffix and len(query) - start >= len(suffix) and query[len(query) - len(suffix):] == suffix else len(query)
    return list(query[start:end])


def reward_query(task: Task, tokenizer, query: list[int]) -> list[int]:
    """`strip_query_format` with `task`'s prefix and suffix."""
    return strip_query_format(query, query_format_ids(task, tokenizer))


class RewardModel(nn.Module):
    """r(x, y) = gain * head(h) + bias on top of a causal LM's trunk (its vocabulary head is unused); h is the
    last token's final hidden state as released, or what `pool` and `layer` choose (the module docstring)."""

    def __init__(self, lm, tokenizer, seed: int | None = 0, pool: str = "last", layer: int | None = None):
        """seed: the head's init (None: torch's global RNG). Seeded by default, so that a notebook rerun from scratch
        fits the same reward model bit for bit: the fitted reward does not depend on the init, but its split into
        head and gain/bias does at the last bits, and PPO amplifies such differences into a different run.
        pool: "last" (the last real token's hidden state, as released) or "mean" (the mean over the response's
        tokens; the query is read but not pooled).
        layer: which hidden state: None, the final one after the last norm (as released); L, the output of block L
        (0: the embeddings; the number of blocks: the final one)."""
        super().__init__()
        n_blocks = lm.config.num_hidden_layers
        if pool not in POOLS:
            raise ValueError(f"pool={pool!r}: the reward model reads the hidden states' {' or '.join(POOLS)!s} "
                             "(\"last\": the last token's, as released; \"mean\": the mean over the response)")
        if layer is not None and (isinstance(layer, bool) or not isinstance(layer, int) or not 0 <= layer <= n_blocks):
            raise ValueError(f"layer={layer!r}: {type(lm).__name__} has hidden states 0 (the embeddings) to {n_blocks} "
                             "(the final one, after the last norm); pass one of those, or None for the final one")
        self.pool, self.layer = pool, layer
        self.lm = lm
        self.tokenizer = tokenizer
        d_model = lm.config.hidden_size
        p = next(lm.parameters())
        # skip_init: nn.Linear's own init would draw from the global RNG even when a seed is given
        self.head = nn.utils.skip_init(nn.Linear, d_model, 1, device=p.device, dtype=p.dtype)
        gen = torch.Generator().manual_seed(seed) if seed is not None else None
        with torch.no_grad():  # drawn on the CPU, so one seed gives one head on every device
            self.head.weight.copy_(torch.randn(self.head.weight.shape, generator=gen) / math.sqrt(d_model + 1))
        nn.init.zeros_(self.head.bias)
        # Set by `normalize`, not by gradient descent (see the module docstring for the released code's choice).
        self.register_buffer("gain", torch.ones((), device=p.device))
        self.register_buffer("bias", torch.zeros((), device=p.device))
        self.task_name: str | None = None  # the task `normalize` set it up for; saved, and checked by `check_fits`
        # The token ids of that task's query prefix and suffix, which r does not read (`reward_query`); saved, and
        # checked by `check_fits` (a task with another format would hand r queries it was never trained on).
        self.query_format: dict | None = None
        # What trained it, kept with it (`save`, `load`, `training_summary`): the metrics of every training step
        # (`RewardTrainer.fit` appends them) and the counts of the latest fit's comparisons.
        self.history: list[dict] = []
        self.trained_on: dict | None = None  # {"comparisons": trained on, "heldout": held out}

    @property
    def device(self):
        return self.head.weight.device

    def train_top_layers(self, n: int | None) -> int:
        """Make only the top `n` transformer blocks, what follows them (the final norm) and the head trainable;
        None: every weight. Returns the number of trainable parameters. The blocks are the LM's largest
        ModuleList (GPT-2's `h`, Llama's and Gemma's `layers`, ...), so this works for any family; embeddings and
        the unused vocabulary head stay frozen."""
        from labkit.sampling import unwrap

        if n is None:
            self.requires_grad_(True)
        else:
            base = unwrap(self.lm)
            blocks = max((m for m in base.modules() if isinstance(m, nn.ModuleList)),
                         key=lambda m: sum(p.numel() for p in m.parameters()), default=None)
            if blocks is None or len(blocks) == 0:
                raise ValueError(f"train_layers={n}: found no transformer blocks (an nn.ModuleList) in "
                                 f"{type(base).__name__}; use train_layers=None to train every weight")
            if n > len(blocks):
                raise ValueError(f"train_layers={n}, but {type(base).__name__} has {len(blocks)} transformer blocks; "
                                 f"pass at most {len(blocks)}, or None for every weight")
            in_blocks = {id(p) for p in blocks.parameters()}
            out_head = base.get_output_embeddings()
            unused = {id(p) for p in out_head.parameters()} if out_head is not None else set()
            names = [(name, p) for name, p in base.named_parameters()]
            last_block = max(i for i, (_, p) in enumerate(names) if id(p) in in_blocks)
            self.lm.requires_grad_(False)
            for block in list(blocks)[len(blocks) - n:] if n else []:
                block.requires_grad_(True)
            for _, p in names[last_block + 1:]:  # after the blocks in registration order: the final norm
                if id(p) not in in_blocks and id(p) not in unused:
                    p.requires_grad_(True)
            self.head.requires_grad_(True)
        return sum(p.numel() for p in self.parameters() if p.requires_grad)

    def trunk_hidden(self, input_ids, attention_mask, only: torch.Tensor | None = None):
        """Hidden states of `self.layer` (B, T, H), or (B, K, H) at positions `only`: the LM's own forward with no
        logits kept (see `lm_forward`)."""
        no_logits = torch.zeros(0, dtype=torch.long, device=input_ids.device)
        return lm_forward(self.lm, input_ids, attention_mask, positions(attention_mask), no_logits, want_hidden=True,
                          only=only, layer=self.layer)[1]

    def raw(self, query_ids, query_lengths, response_ids, response_lengths) -> torch.Tensor:
        """head(h), (B,), before gain and bias.

        query_ids (B, Q) left-padded; response_ids (B, R) right-padded after `response_lengths` tokens.
        """
        h = self.hidden_features(query_ids, query_lengths, response_ids, response_lengths)
        return self.head(h.to(self.head.weight.dtype)).squeeze(-1).float()  # h is bf16 under autocast

    def _reads(self, start: int, R: int, response_lengths: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The positions whose hidden states the features need, (K,) sorted, for responses that start at position
        `start` of the input and are R long; and, when pooling "last", each row's index into them (B,)."""
        if self.pool == "mean":
            return torch.arange(start, start + R, device=response_lengths.device), None
        last = start + response_lengths - 1  # the last real token, not the first pad after it
        read = torch.unique(last)  # (K,) sorted: the positions some row is scored at
        return read, torch.searchsorted(read, last)

    def _pooled(self, hidden: torch.Tensor, pick: torch.Tensor | None, response_lengths: torch.Tensor) -> torch.Tensor:
        """(B, K, H) hidden states at `_reads`' positions -> (B, H): each row's own last token, or its response's
        mean (the pads after `response_lengths` left out)."""
        if self.pool == "last":
            return hidden[torch.arange(hidden.shape[0], device=hidden.device), pick]
        return response_mean(hidden, response_lengths)

    def hidden_features(self, query_ids, query_lengths, response_ids, response_lengths) -> torch.Tensor:
        """What the head reads of each query + response (B, H): as released, the final hidden state at the last
        real token; `pool` and `layer` choose otherwise."""
        B, Q = query_ids.shape
        R = response_ids.shape[1]
        if (response_lengths < 1).any():
            raise ValueError("Every response needs at least one token to be scored.")
        resp_mask = (torch.arange(R, device=response_ids.device)[None] < response_lengths[:, None]).long()
        mask = torch.cat([left_pad_mask(query_lengths, Q), resp_mask], dim=1)  # (B, Q+R)
        read, pick = self._reads(Q, R, response_lengths)
        hidden = self.trunk_hidden(torch.cat([query_ids, response_ids], 1), mask, only=read)  # (B, K, H)
        return self._pooled(hidden, pick, response_lengths)  # (B, H)

    def forward(self, query_ids, query_lengths, response_ids, response_lengths) -> torch.Tensor:
        return self.gain * self.raw(query_ids, query_lengths, response_ids, response_lengths) + self.bias

    def kway(self, query_ids, query_lengths, response_ids, response_lengths) -> torch.Tensor:
        """Normalised rewards (B, k) of k responses to each of B queries: response rows b*k .. b*k+k-1 answer
        query b. query_ids (B, Q) left-padded; response_ids (B*k, R) right-padded after `response_lengths`.

        Each query runs once and its k responses share its keys and values (a KV cache that stays in the
        autograd graph, so gradients flow back into the query's positions): B*(Q + k*R) token positions
        instead of B*k*(Q + R), 2.2x fewer for 4 responses of 24 tokens after 64-token queries. Equal to
        scoring each query + response on its own (`forward`) up to float rounding.
        A sharded (FSDP) model scores each pair whole instead: FSDP gathers a block's weights for the backward
        pass when the gradient reaches the block's output, but the shared keys/values carry it into the query
        pass's blocks from inside, after FSDP has freed those weights again.
        """
        B = query_ids.shape[0]
        k = response_ids.shape[0] // B
        h = self.kway_hidden(query_ids, query_lengths, response_ids, response_lengths)  # (B*k, H)
        raw = self.head(h.to(self.head.weight.dtype)).squeeze(-1).float()
        return (self.gain * raw + self.bias).view(B, k)

    def kway_hidden(self, query_ids, query_lengths, response_ids, response_lengths) -> torch.Tensor:
        """`hidden_features` of k responses to each of B queries (B*k, H), laid out and computed as `kway` describes."""
        B, Q = query_ids.shape
        k, R = response_ids.shape[0] // B, response_ids.shape[1]
        if response_ids.shape[0] != B * k:
            raise ValueError(f"{response_ids.shape[0]} responses for {B} queries: expected k per query.")
        if (response_lengths < 1).any():
            raise ValueError("Every response needs at least one token to be scored.")
        if is_sharded(self.lm):
            q_ids, q_len = query_ids.repeat_interleave(k, dim=0), query_lengths.repeat_interleave(k)
            return self.hidden_features(q_ids, q_len, response_ids, response_lengths)
        no_logits = torch.zeros(0, dtype=torch.long, device=query_ids.device)
        q_mask = left_pad_mask(query_lengths, Q)  # (B, Q)
        _, _, cache = lm_forward(self.lm, query_ids, q_mask, positions(q_mask), no_logits, use_cache=True,
                                 only=no_logits)  # only the keys and values are read
        cache.batch_repeat_interleave(k)  # (B*k, heads, Q, d) per layer: each response sees its own query
        r_mask = (torch.arange(R, device=response_ids.device)[None] < response_lengths[:, None]).long()
        mask = torch.cat([q_mask.repeat_interleave(k, dim=0), r_mask], dim=1)  # (B*k, Q+R)
        pos = query_lengths.repeat_interleave(k)[:, None] + torch.arange(R, device=response_ids.device)[None]  # (B*k, R)
        read, pick = self._reads(0, R, response_lengths)
        _, hidden, _ = lm_forward(self.lm, response_ids, mask, pos, no_logits, want_hidden=True, cache=cache, use_cache=True,
                                  only=read, layer=self.layer)  # (B*k, K, H)
        return self._pooled(hidden, pick, response_lengths)  # (B*k, H)

    # ---- convenience scoring -----------------------------------------------------------------

    def pad(self, queries: list[list[int]], responses: list[list[int]]):
        """Token lists -> the tensors `forward` / `kway` take: left-padded queries (B, Q) and their lengths,
        right-padded responses (N, R) and their lengths. An empty response is scored on EOS alone."""
        tok = self.tokenizer
        q_ids, q_len = pad_left([list(q) for q in queries], tok.pad_token_id, self.device)
        rs = [list(r) or [tok.eos_token_id] for r in responses]
        r_len = torch.tensor([len(r) for r in rs], device=self.device)
        r_ids = torch.full((len(rs), int(r_len.max())), tok.pad_token_id, dtype=torch.long)
        for i, r in enumerate(rs):
            r_ids[i, : len(r)] = torch.tensor(r)
        return q_ids, q_len, r_ids.to(self.device), r_len

    def encode_texts(self, queries: list[str], responses: list[str]):
        """`pad` of the texts' token ids (no special tokens added)."""
        tok = self.tokenizer
        return self.pad([tok.encode(q, add_special_tokens=False) for q in queries],
                        [tok.encode(r, add_special_tokens=False) for r in responses])

    @torch.no_grad()
    def score_texts(self, queries: list[str], responses: list[str], batch_size: int = 16) -> torch.Tensor:
        """Normalised rewards (B,) for query/response texts, re-encoded with r's tokenizer. Queries are as r reads
        them: a summary task's source text without its "Article:" prefix or "TL;DR:" suffix. Text does not always
        encode back to the ids a model sampled: to score samples, use `score_rollout` (or the stored ids)."""
        out = []
        for i in range(0, len(queries), batch_size):
            out.append(self(*self.encode_texts(queries[i : i + batch_size], responses[i : i + batch_size])))
        return torch.cat(out)

    @torch.no_grad()
    def score_rollout(self, rollout, batch_size: int | None = None) -> torch.Tensor:
        """Normalised rewards (B,) of a rollout's truncated responses, on its own token ids, `batch_size` at a time
        (None: all at once). The queries are read without the task's prefix and suffix (`self.query_format`,
        set by `normalize`; `check_fits` makes sure it is the run's task's)."""
        q_ids, q_len = self.reward_queries(rollout.query_ids, rollout.query_lengths)
        lengths = rollout.truncated_lengths.clamp(min=1)
        return torch.cat([self(q_ids[s], q_len[s], rollout.truncated_ids[s], lengths[s])
                          for s in batch_slices(len(rollout), batch_size)])

    def reward_queries(self, query_ids: torch.Tensor, query_lengths: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Left-padded formatted queries (B, Q) -> the same without the task's prefix and suffix (B, Q'), lengths."""
        if not self.query_format or not (self.query_format["prefix"] or self.query_format["suffix"]):
            return query_ids, query_lengths
        rows = [ids[len(ids) - n:] for ids, n in zip(query_ids.tolist(), query_lengths.tolist())]
        return pad_left([strip_query_format(r, self.query_format) for r in rows], self.tokenizer.pad_token_id,
                        query_ids.device)

    # ---- normalisation -----------------------------------------------------------------------

    @torch.no_grad()
    def normalize(self, rho, task: Task, prompts: list[str], n_samples: int = 256, seed: int = 0, batch_size: int = 16,
                  truncated: bool = False, progress: bool = True) -> dict:
        """Set gain/bias so that r ~ N(0, 1) on responses sampled from rho (the frozen base model).

        As released (train_reward.py RewardModelTrainer.normalize / sample_policy_responses): `n_samples` requested
        samples rounded up to whole batches of `batch_size` (there, rollout_batch_size: 512 for the style tasks, so
        one batch of 512 for 256 requested; 128 for summaries, so 256), each response scored whole as sampled,
        untruncated (`policy.respond_op` does not truncate; only PPO's score_fn does). `truncated=True` measures on
        the truncated responses PPO scores instead (labkit before it followed the released code).
        `prompts` are source texts (formatted with the task); they are drawn with replacement (seeded).
        Chunk c of `batch_size` samples is drawn with seed + c, and under N processes chunks are shared out
        round-robin and the statistics taken over all of them: the result does not depend on N.
        Also records the task (and its query format) this reward model is for. Returns the raw head's mean and
        std before the change, and the number of samples. `progress`: a bar over the samples with the time left
        (sampling rho takes minutes on a CPU), on the main process of the main thread only.
        """
        from tqdm.auto import tqdm

        n_chunks = math.ceil(n_samples / batch_size)
        rng = random.Random(seed)
        texts = [prompts[rng.randrange(len(prompts))] for _ in range(n_chunks * batch_size)]
        queries = [format_query(task, t, self.tokenizer) for t in texts]
        self.query_format = query_format_ids(task, self.tokenizer)  # r reads queries without them, as in training
        raws = [torch.zeros(0, device=self.device)]
        mine = list(range(distributed.rank(), n_chunks, distributed.world_size()))  # chunk ids
        shown = distributed.shows_progress(progress)
        bar = tqdm(total=len(mine) * batch_size, desc="normalizing r on rho's samples", unit="sample",
                   disable=not shown)
        for j in range(distributed.max_over_processes(len(mine))):
            # a process with fewer chunks samples a stand-in one and drops it: sharded models need every process
            c = mine[j] if j < len(mine) else 0
            i = c * batch_size
            gen = torch.Generator(device=next(rho.parameters()).device).manual_seed(seed + c)
            roll = sample(rho, self.tokenizer, queries[i : i + batch_size], task, generator=gen)
            q_ids, q_len = self.reward_queries(roll.query_ids.to(self.device), roll.query_lengths.to(self.device))
            if truncated:
                r_ids, r_len = roll.truncated_ids, roll.truncated_lengths.clamp(min=1)
            else:  # every response is response_length tokens long
                r_ids, r_len = roll.response_ids, torch.full_like(roll.truncated_lengths, roll.response_ids.shape[1])
            raw = self.raw(q_ids, q_len, r_ids.to(self.device), r_len.to(self.device))
            if j < len(mine):
                raws.append(raw)
                bar.update(batch_size)
        bar.close()
        mean, std = distributed.global_mean_std(torch.cat(raws))  # population std over every process's samples
        std = std.clamp(min=1e-6)
        self.gain.fill_(1 / std)
        self.bias.fill_(-mean / std)
        self.task_name = task.name
        return {"raw_mean": mean.item(), "raw_std": std.item(), "samples": n_chunks * batch_size}

    # ---- save / load (no pickle) ---------------------------------------------------------------

    def save(self, folder) -> Path:
        """Write the reward model into `folder` (the main process writes). Under sharding every process must
        call it: the weights are gathered whole first."""
        from safetensors.torch import save_file

        folder = Path(folder)
        if not (distributed.sharded() or distributed.is_main()):
            return folder
        state = distributed.full_state_dict(self)  # a tied embedding / vocabulary head stored once
        if not distributed.is_main():
            return folder
        folder.mkdir(parents=True, exist_ok=True)
        base = unwrap(self.lm)
        base.config.to_json_file(folder / "lm_config.json")
        save_file(state, str(folder / "reward_model.safetensors"), metadata={"format": "pt"})
        self.tokenizer.save_pretrained(folder / "tokenizer")
        (folder / "reward_config.json").write_text(json.dumps({
            "format": "labkit-reward-model", "version": _VERSION, "gain": self.gain.item(), "bias": self.bias.item(),
            "task": self.task_name, "query_format": self.query_format, "tokenizer": tokenizer_fingerprint(self.tokenizer),
            "trained_on": self.trained_on, "pool": self.pool, "layer": self.layer}))
        _write_metrics(folder / METRICS_FILE, self.history)
        return folder

    def check_fits(self, task: Task, tokenizer, policy) -> None:
        """Refuse to score a policy this reward model was not made for: another task (its normalisation and
        training are the task's), another tokenizer (it would read the policy's token ids as other words), or
        a vocabulary smaller than the ids the policy can sample."""
        if self.task_name is not None and self.task_name != task.name:
            raise ValueError(f"This reward model was trained for the task {self.task_name!r}, and this run is "
                             f"{task.name!r}: train one on {task.name!r} labels (or pass the matching task).")
        if self.query_format is not None and self.query_format != query_format_ids(task, tokenizer):
            raise ValueError(f"This reward model was trained on queries formatted with another prefix/suffix than the "
                             f"task's ({task.query_prefix!r} / {task.query_suffix!r}): it would read queries it "
                             "never saw. Train one on this task's labels, or keep the task's query_prefix/suffix.")
        if tokenizer_fingerprint(self.tokenizer) != tokenizer_fingerprint(tokenizer):
            raise ValueError("This reward model's tokenizer is not the policy's (their vocabularies or special "
                             "tokens differ): it would read the policy's token ids as other words. Train the "
                             "reward model on the policy's base model (reward_model_from_lm(rho, tokenizer)).")
        rows = self.lm.get_input_embeddings().num_embeddings
        sampled = unwrap(policy).get_output_embeddings().out_features
        if rows < sampled:
            raise ValueError(f"The policy can sample token ids up to {sampled - 1}, but this reward model's embedding "
                             f"has only {rows} rows: use a reward model built on the policy's base model.")

    @classmethod
    def load(cls, folder, device=None, dtype=None, speedups: bool | None = None) -> RewardModel:
        """A reward model saved with `save`; `speedups` as in `models.load_lm`."""
        from safetensors.torch import load_model
        from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

        from labkit import speed
        from labkit.models import _setup_tokenizer, pick_device, pick_dtype

        folder = Path(folder)
        meta = folder / "reward_config.json"
        saved = json.loads(meta.read_text()) if meta.exists() else {}
        if saved.get("format") != "labkit-reward-model":
            raise FileNotFoundError(f"{folder} is not a saved labkit reward model (no reward_config.json). "
                                    "Save one with `reward_model.save(folder)`.")
        if saved.get("version", 1) > _VERSION:
            raise ValueError(f"{folder} was saved by a newer labkit (reward model format {saved['version']}; this one "
                             f"reads up to {_VERSION}): upgrade labkit to load it.")
        dev = pick_device(device)
        config = AutoConfig.from_pretrained(folder / "lm_config.json")
        lm = AutoModelForCausalLM.from_config(config)
        speed.apply(lm, speedups)  # as load_lm does
        tokenizer = AutoTokenizer.from_pretrained(folder / "tokenizer")
        _setup_tokenizer(tokenizer)
        try:  # before version 4: as released
            rm = cls(lm, tokenizer, pool=saved.get("pool", "last"), layer=saved.get("layer"))
        except ValueError as err:
            raise ValueError(f"{meta} is damaged: {err}. Restore it, or train and save the reward model again.") from None
        rm.task_name = saved.get("task")  # None for a version-1 file: its task was not recorded
        rm.trained_on = saved.get("trained_on")  # None when saved before labkit recorded it
        rm.history = _read_metrics(folder / METRICS_FILE)
        rm.query_format = saved.get("query_format")  # None before version 3: queries were read whole
        saved_tokenizer = saved.get("tokenizer")
        if saved_tokenizer is not None and saved_tokenizer != tokenizer_fingerprint(tokenizer):
            raise ValueError(f"{folder}/tokenizer is not the tokenizer this reward model was trained with (its "
                             "fingerprint differs from the one recorded in reward_config.json): restore it.")
        load_model(rm, str(folder / "reward_model.safetensors"))
        rm.to(device=dev, dtype=pick_dtype(dev, dtype))
        rm.gain.data = rm.gain.float()
        rm.bias.data = rm.bias.float()
        rm.eval()
        return rm

    def training_summary(self) -> str:
        """One line on how this reward model was trained, from what was saved with it: e.g. "trained on 57
        comparisons (6 held out) in 8 steps: held-out accuracy 0.67 (chance 0.25)"."""
        if not self.history:
            return "no training metrics were kept with it (saved before labkit kept them, or never trained)"
        counts = self.trained_on or {}
        l2 = self.history[-1].get("rm/head_l2")  # RewardConfig.head_l2: the head fitted alone, in L-BFGS rounds
        reads = []  # what the head reads, where it is not the released last token's final hidden state
        if self.pool != "last" or self.layer is not None:
            reads = [f"reads the {'response mean' if self.pool == 'mean' else 'last token'} of "
                     + ("the final hidden state" if self.layer is None else f"hidden state {self.layer}")]
        if l2 is None:
            text = "trained" + (f" ({reads[0]})" if reads else "")
        else:
            text = f"head fitted on the frozen trunk ({'; '.join([f'L2 {l2:g}'] + reads)})"
        if counts.get("comparisons") is not None:
            text += f" on {counts['comparisons']} comparisons"
            if counts.get("heldout"):
                text += f" ({counts['heldout']} held out)"
        n, unit = len(self.history), "step" if l2 is None else "L-BFGS round"
        text += f" in {n} {unit}{'s' if n != 1 else ''}"
        evaluated = [m for m in self.history if m.get("rm/heldout_accuracy") is not None]
        if evaluated:
            last = evaluated[-1]
            text += f": held-out accuracy {last['rm/heldout_accuracy']:.2f}"
            if last.get("rm/chance_accuracy") is not None:
                text += f" (chance {last['rm/chance_accuracy']:.2f})"
        else:
            text += f": final training loss {self.history[-1].get('rm/loss', math.nan):.3g} (no held-out comparisons)"
        return text


METRICS_FILE = "metrics.jsonl"
"""The training metrics saved beside a reward model, one JSON dict per line (what `Dashboard.from_jsonl` reads)."""


def _write_metrics(path: Path, history: list[dict]) -> None:
    """`history` as JSON lines, replacing the file atomically; no history removes a stale file (a folder
    reused for a model trained elsewhere must not show the old model's curves)."""
    if not history:
        path.unlink(missing_ok=True)
        return
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text("".join(json.dumps(m) + "\n" for m in history))
    os.replace(tmp, path)


def _read_metrics(path: Path) -> list[dict]:
    """The metrics saved with a reward model; [] if there are none. A damaged file costs only the curves (with
    a warning): the weights load all the same."""
    if not path.exists():
        return []
    try:
        rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    except ValueError as err:
        warnings.warn(f"{path} is not JSON lines ({err}): the reward model loads without its training metrics.",
                      stacklevel=3)
        return []
    return [row for row in rows if isinstance(row, dict)]


def response_mean(hidden: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
    """(B, R, H) hidden states of right-padded responses -> (B, H) float32: the mean over each row's first
    `lengths` (B,) positions, summed in float32 (the states are bf16 under autocast)."""
    keep = (torch.arange(hidden.shape[1], device=hidden.device)[None] < lengths[:, None]).float()  # (B, R)
    return (hidden.float() * keep[..., None]).sum(1) / lengths[:, None].float()


def reward_model_from_lm(lm, tokenizer, seed: int | None = 0, pool: str = "last",
                         layer: int | None = None) -> RewardModel:
    """A fresh reward model (new head, drawn from `seed`) on a copy of `lm`: the paper re-initialises from rho
    on every refit. pool and layer: what the head reads (`RewardModel`; default: as released)."""
    import copy

    return RewardModel(copy.deepcopy(lm), tokenizer, seed=seed, pool=pool, layer=layer)
