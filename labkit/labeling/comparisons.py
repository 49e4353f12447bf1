"""Comparisons to label: sample k responses per prompt and store them, ready for the labeling widget.

    ids = make_comparisons(store, model, tokenizer, SENTIMENT, load_prompts(SENTIMENT)[:16], k=4)

The paper's labelers see the query and k = 4 responses sampled from rho (the pretrained model) and pick
the best. Each stored response is the TRUNCATED text (what the reward model will score); the untruncated
text goes to `extra["full_responses"]` so the labeler can show what truncation cut away, and
`extra["found"]` says whether a truncation token was found (if not, the response is scored as penalty).
By default only responses with a truncation point are stored (`make_comparisons(require_truncation=...)`).
"""

from __future__ import annotations

import torch

from labkit.data import Prompt
from labkit.labeling.store import LabelStore
from labkit.models import weights_fingerprint
from labkit.sampling import sample
from labkit.tasks import Task, format_query, get_task


def rollout_rows(roll, tokenizer) -> list[dict]:
    """Per sampled row: the query and the response as the store keeps them (truncated text and tokens,
    the untruncated text, whether a truncation point was found)."""
    full = tokenizer.batch_decode(roll.response_ids.tolist(), skip_special_tokens=True)
    kept = [ids[:n] for ids, n in zip(roll.truncated_ids.tolist(), roll.truncated_lengths.tolist())]
    query_ids = [ids[len(ids) - n:] for ids, n in zip(roll.query_ids.tolist(), roll.query_lengths.tolist())]
    return [dict(query=roll.query_texts[b], query_tokens=query_ids[b], response=roll.response_texts[b],
                 tokens=kept[b], full=full[b], found=bool(roll.found[b])) for b in range(len(roll))]


def comparison_item(task_name: str, prompt: Prompt | str, rows: list[dict], sources: list[str], kind: str) -> dict:
    """One comparison for LabelStore.add_comparisons from k rows of `rollout_rows` (same query)."""
    return dict(
        task=task_name, kind=kind, query=rows[0]["query"], query_tokens=rows[0]["query_tokens"],
        responses=[r["response"] for r in rows], response_tokens=[r["tokens"] for r in rows], sources=sources,
        reference=prompt.reference if isinstance(prompt, Prompt) else None,
        extra={"full_responses": [r["full"] for r in rows], "found": [r["found"] for r in rows]},
    )


# Extra sampling rounds for responses without a truncation point (require_truncation=True). Measured with
# SmolLM2-135M on the sentiment task (32 train prompts x 12 samples): 49% of responses have a cut point, 17-75%
# per prompt, so a 4-way comparison has all four on the first draw for ~9% of prompts; expected prompts kept
# after 3 / 7 / 11 extra rounds: 70% / 93% / 98%, for 1.95 / 2.19 / 2.25 draws per response. Each round only
# samples the responses still without one, so later rounds are small.
RESAMPLE_ROUNDS = 7
# Sequences sampled per model call when batch_size is not given: bounds memory, and the progress bar moves.
DEFAULT_SAMPLE_BATCH = 64


class ComparisonIds(list):
    """make_comparisons' result: the new comparison ids in prompt order (a list), and `left_out`, the indices
    (into `prompts`) of prompts that got no comparison because some response never had a truncation point."""

    def __init__(self, ids=(), left_out=()):
        super().__init__(ids)
        self.left_out = list(left_out)


def make_comparisons(
    store: LabelStore,
    model,
    tokenizer,
    task: Task | str,
    prompts: list[Prompt | str],
    *,
    k: int = 4,
    source: str | list[str] = "rho",
    kind: str = "train",
    generator: torch.Generator | None = None,
    batch_size: int | None = None,
    require_truncation: bool = True,
    resample_rounds: int = RESAMPLE_ROUNDS,
    progress: bool = True,
) -> ComparisonIds:
    """Sample `k` responses to each prompt with `model` and store one comparison per prompt.

    source: what made the responses, stored with each one: one string for all (e.g. "rho",
    "policy@step12") or a list of k strings. batch_size: how many sequences are sampled at once (default
    DEFAULT_SAMPLE_BATCH).

    require_truncation (default True): labelers only see responses that have a truncation point, as released
    (lm_tasks.py filter_fn_from_hparams: responses without one get the fixed penalty, and only responses that
    pass are shown to humans): a response without one is sampled again for the same prompt, with the same
    generator, for up to `resample_rounds` extra rounds, and a comparison is stored only when all k responses
    have one. Prompts still short of that are left out: the count is printed and their indices returned in
    `.left_out`. False stores the raw samples, with `extra["found"]` saying which ones scored the penalty.
    A task without a truncation rule (truncation=None) never penalises, so nothing is resampled; one whose
    rule cannot be met (truncation.after >= response_length) keeps the raw samples, with a printed note.

    progress: show a progress bar with an ETA (tqdm) while sampling.
    All comparisons of one call are stored in one transaction: either all of them or none.
    Returns the new comparison ids, in prompt order (a list, with `.left_out`).
    """
    from tqdm.auto import tqdm  # here: notebook or terminal bar, whichever this runs in

    task = get_task(task)
    if k < 2:
        raise ValueError(f"a comparison needs k >= 2 responses to choose between, got k={k}")
    if not isinstance(source, str) and len(source) != k:
        raise ValueError(f"source must be one string or a list of k={k} strings (one per response), got {source!r}")
    if isinstance(resample_rounds, bool) or not isinstance(resample_rounds, int) or resample_rounds < 0:
        raise ValueError(f"resample_rounds must be a whole number >= 0 (extra sampling rounds for responses without "
                         f"a truncation point), got {resample_rounds!r}")
    texts = [p.text if isinstance(p, Prompt) else p for p in prompts]
    if not all(isinstance(t, str) for t in texts):
        raise ValueError("prompts must be Prompt objects (labkit.data.load_prompts) or strings")
    if not texts:
        return ComparisonIds()
    queries = [format_query(task, text, tokenizer) for text in texts]
    step = batch_size or DEFAULT_SAMPLE_BATCH
    # slots[i * k + j]: response j of prompt i, as a rollout_rows row once sampled.
    slots: list[dict | None] = [None] * (len(texts) * k)
    todo = list(range(len(slots)))
    filtering = require_truncation and task.truncation is not None  # without a rule nothing is penalised
    if filtering and task.truncation.after >= task.response_length:
        # No response can have a cut point (e.g. a smoke run's short responses): filtering would store nothing
        # at all, so keep the raw samples and say why every response is tagged.
        print(f"make_comparisons: task {task.name!r} cuts only at response token >= {task.truncation.after}, but "
              f"responses are {task.response_length} tokens: no response can have a truncation point, so every one "
              "scores the penalty. Keeping the raw samples; to have responses worth labeling, set "
              "truncation.after below response_length (pass require_truncation=False to keep them without this note).")
        filtering = False
    rounds = 1 + (resample_rounds if filtering else 0)
    with tqdm(total=len(todo), desc="sampling responses", unit="response", disable=not progress) as bar:
        for round_ in range(rounds):
            if round_:  # the bar grows by the responses sampled again
                bar.total += len(todo)
                bar.set_description(f"resampling {len(todo)} without a truncation point (round {round_}/{rounds - 1})")
            # Several model calls per round (not one `sample` call) so that the bar moves and memory stays bounded.
            for start in range(0, len(todo), step):
                chunk = todo[start:start + step]
                rollout = sample(model, tokenizer, [queries[s // k] for s in chunk], task, generator=generator)
                for s, row in zip(chunk, rollout_rows(rollout, tokenizer)):
                    slots[s] = row
                bar.update(len(chunk))
            todo = [s for s in todo if filtering and not slots[s]["found"]]
            if not todo:
                break
    left_out = sorted({s // k for s in todo})
    if left_out:
        rule = task.truncation
        print(f"make_comparisons: left out {len(left_out)} of {len(texts)} prompts: some of their responses had "
              f"no truncation point ({rule.text!r} at or after response token {rule.after}) after "
              f"{resample_rounds} extra sampling round(s), and labelers only see responses that have one. "
              "Pass more prompts, resample_rounds=, or require_truncation=False to keep the raw samples.")
    sources = [source] * k if isinstance(source, str) else list(source)
    skipped = set(left_out)
    items = [comparison_item(task.name, p, slots[i * k:(i + 1) * k], sources, kind)
             for i, p in enumerate(prompts) if i not in skipped]
    return ComparisonIds(store.add_comparisons(items) if items else [], left_out)


def policy_source(trainer) -> str:
    """The source a blind comparison records for the trainer's policy as it is now: "policy@<update>:<weights>",
    e.g. "policy@40:3f9a0c1e". The update count alone does not name a policy: a new PPO run (another seed, or the
    folder deleted after relabeling) reaches update 40 too, and its comparisons must not be counted as the old
    one's. The weights' fingerprint (labkit.models.weights_fingerprint, one pass over the weights) does."""
    return f"policy@{trainer.step_count}:{weights_fingerprint(trainer.policy)[:8]}"


def make_policy_vs_rho(store: LabelStore, trainer, prompts: list[Prompt | str], *, kind: str = "eval",
                       seed: int = 0) -> list[int]:
    """Blind 2-way comparisons for the paper's evaluation: one sample from rho, one from the policy.

    Stored order is always [rho, policy] with sources "rho" and `policy_source(trainer)`; the labeling widget
    shows them in a random order, so the labeler does not know which is which. `win_rate_from_store`
    (labkit.evaluate) then counts how often the policy's sample was chosen: pass it
    `policy_source_prefix=policy_source(trainer)` to count only this policy's comparisons.
    """
    texts = [p.text if isinstance(p, Prompt) else p for p in prompts]
    if not texts:
        return []
    task = trainer.task
    rho_roll = trainer.sample_rho(texts, seed=seed)
    pi_roll = trainer.sample_policy(texts, seed=seed + 1)
    policy = policy_source(trainer)
    rho_rows, pi_rows = rollout_rows(rho_roll, trainer.tokenizer), rollout_rows(pi_roll, trainer.tokenizer)
    items = [comparison_item(task.name, p, [rho_rows[i], pi_rows[i]], ["rho", policy], kind)
             for i, p in enumerate(prompts)]
    return store.add_comparisons(items)
