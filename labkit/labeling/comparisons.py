"""Comparisons to label: sample k responses per prompt and store them, ready for the labeling widget.

    ids = make_comparisons(store, model, tokenizer, SENTIMENT, load_prompts(SENTIMENT)[:16], k=4)

The paper's labelers see the query and k = 4 responses sampled from rho (the pretrained model) and pick
the best. Each stored response is the TRUNCATED text (what the reward model will score); the untruncated
text goes to `extra["full_responses"]` so the labeler can show what truncation cut away, and
`extra["found"]` says whether a truncation token was found (if not, the response is scored as penalty).
"""

from __future__ import annotations

import torch

from labkit.data import Prompt
from labkit.labeling.store import LabelStore
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
) -> list[int]:
    """Sample `k` responses to each prompt with `model` and store one comparison per prompt.

    source: what made the responses, stored with each one: one string for all (e.g. "rho",
    "policy@step12") or a list of k strings. batch_size bounds how many sequences are sampled at once.
    All comparisons of one call are stored in one transaction: either all of them or none.
    Returns the new comparison ids, in prompt order.
    """
    task = get_task(task)
    if k < 2:
        raise ValueError(f"a comparison needs k >= 2 responses to choose between, got k={k}")
    if not isinstance(source, str) and len(source) != k:
        raise ValueError(f"source must be one string or a list of k={k} strings (one per response), got {source!r}")
    texts = [p.text if isinstance(p, Prompt) else p for p in prompts]
    if not all(isinstance(t, str) for t in texts):
        raise ValueError("prompts must be Prompt objects (labkit.data.load_prompts) or strings")
    if not texts:
        return []
    queries = [format_query(task, text, tokenizer) for text in texts]
    # One sampling call for every prompt's k responses: rows i*k .. i*k+k-1 belong to prompt i.
    rollout = sample(model, tokenizer, [q for q in queries for _ in range(k)], task,
                     generator=generator, batch_size=batch_size)
    rows = rollout_rows(rollout, tokenizer)
    sources = [source] * k if isinstance(source, str) else list(source)
    items = [comparison_item(task.name, p, rows[i * k:(i + 1) * k], sources, kind) for i, p in enumerate(prompts)]
    return store.add_comparisons(items)


def make_policy_vs_rho(store: LabelStore, trainer, prompts: list[Prompt | str], *, kind: str = "eval",
                       seed: int = 0) -> list[int]:
    """Blind 2-way comparisons for the paper's evaluation: one sample from rho, one from the policy.

    Stored order is always [rho, policy] with sources "rho" and "policy@<update>"; the labeling widget
    shows them in a random order, so the labeler does not know which is which. `win_rate_from_store`
    (labkit.evaluate) then counts how often the policy's sample was chosen.
    """
    texts = [p.text if isinstance(p, Prompt) else p for p in prompts]
    if not texts:
        return []
    task = trainer.task
    rho_roll = trainer.sample_rho(texts, seed=seed)
    pi_roll = trainer.sample_policy(texts, seed=seed + 1)
    policy = f"policy@{trainer.step_count}"
    rho_rows, pi_rows = rollout_rows(rho_roll, trainer.tokenizer), rollout_rows(pi_roll, trainer.tokenizer)
    items = [comparison_item(task.name, p, [rho_rows[i], pi_rows[i]], ["rho", policy], kind)
             for i, p in enumerate(prompts)]
    return store.add_comparisons(items)
