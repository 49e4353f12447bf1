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
from labkit.labels import LabelStore
from labkit.sampling import sample
from labkit.tasks import Task, format_query, get_task


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
    full_texts = tokenizer.batch_decode(rollout.response_ids.tolist(), skip_special_tokens=True)
    kept_ids = [row[:n] for row, n in zip(rollout.truncated_ids.tolist(), rollout.truncated_lengths.tolist())]
    found = rollout.found.tolist()

    items = []
    for i, (prompt, query) in enumerate(zip(prompts, queries)):
        rows = range(i * k, (i + 1) * k)
        items.append(dict(
            task=task.name,
            kind=kind,
            query=rollout.query_texts[i * k],
            query_tokens=query,
            responses=[rollout.response_texts[r] for r in rows],
            response_tokens=[kept_ids[r] for r in rows],
            sources=source,
            reference=prompt.reference if isinstance(prompt, Prompt) else None,
            extra={"full_responses": [full_texts[r] for r in rows], "found": [bool(found[r]) for r in rows]},
        ))
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
    items = []
    for i, prompt in enumerate(prompts):
        rolls = (rho_roll, pi_roll)
        full = [trainer.tokenizer.decode(r.response_ids[i].tolist(), skip_special_tokens=True) for r in rolls]
        items.append(dict(
            task=task.name, kind=kind, query=rho_roll.query_texts[i],
            query_tokens=format_query(task, texts[i], trainer.tokenizer),
            responses=[r.response_texts[i] for r in rolls],
            response_tokens=[r.truncated_ids[i, : r.truncated_lengths[i]].tolist() for r in rolls],
            sources=["rho", policy],
            reference=prompt.reference if isinstance(prompt, Prompt) else None,
            extra={"full_responses": full, "found": [bool(r.found[i]) for r in rolls]},
        ))
    return store.add_comparisons(items)
