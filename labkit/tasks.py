"""The paper's four tasks: what to prompt with, how long to sample, how to truncate, how to judge.

Settings follow Ziegler et al. (2019), table "The four tasks" in shared/reference/paper.md. Lengths are
in tokens of the model in use. Each task owns its truncation rule: nothing elsewhere hard-wires "a
period ends the sample" (a rule that silently ruined other domains in other libraries).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, replace
from functools import lru_cache

from labkit.checks import above, at_least, check_types, fail, finite, non_empty, one_of

PROMPT_SOURCES = ("passages", "tldr", "cnndm")
"""The prompt column sets labkit.data reads (its `_COLUMNS`; it imports this module, so they are listed here)."""


TOKEN_MATCHING = ("exact", "contains")
"""How a truncation or query-trimming text is matched to token ids (`token_ids_matching`)."""


@dataclass(frozen=True)
class TruncationRule:
    """Cut a response after the first `text` token at response index >= `after`; if none, penalise.

    As released (lm_tasks.py, postprocess_fn_from_hparams and filter_fn_from_hparams): the cut token itself
    is kept, every later token becomes padding, and a response with no such token scores the penalty.
    """

    text: str
    """The truncation string, e.g. "." or "\\n" (released launch.py: truncate_token 13 = '.' for the style
    tasks, 198 = '\\n' for the summaries)."""
    after: int
    """Only tokens at response index >= after can truncate (the paper: 16 for style, 55 for summaries)."""
    tokens: str = "exact"
    """Which token ids count as `text`: "exact", the token(s) whose text is exactly `text`, as released (one
    id: GPT-2's 13 for '.'); or "contains", every token whose text contains `text` not directly followed by a
    letter or digit ('."', '...', '.)', '\\n\\n'; not '.com' or '3.5'): about 140 SmolLM2 tokens, so responses
    are cut earlier and the policy has more ways to avoid the penalty. "contains" suits a tokenizer that merges
    punctuation into longer tokens, and is what labkit did before this field existed (checkpoints written then
    resume only with it). The task's query trimming (`start_after`, `end_at`) matches the same way."""

    def __post_init__(self):
        check_types(self)
        non_empty(self, "text", "an empty text would match every token")
        at_least(self, "after", 0)
        one_of(self, "tokens", TOKEN_MATCHING, "how `text` is matched to token ids: exactly, as released, or any token containing it")


@dataclass(frozen=True)
class Task:
    """One experiment of the paper: prompts, sampling lengths, truncation and labeler instructions."""

    name: str
    """Short id, used in the label store and file names."""
    title: str
    """Human-readable name."""
    instructions: str
    """Shown to labelers at the top of the labeling widget."""
    prompt_source: str
    """Which prompt column set the task reads: "passages", "tldr" or "cnndm" (see labkit.data)."""
    query_length: int
    """Tokens of source text in the query (before prefix/suffix). Paper: 64 (style), 500 (summaries)."""
    response_length: int
    """Tokens sampled per response, always exactly this many (EOS does not stop generation)."""
    temperature: float
    """Sampling temperature; log-probs of pi and rho are computed at this temperature too."""
    truncation: TruncationRule | None
    """Where a response is cut before it is scored; None scores the whole response and never penalises."""
    penalty: float = -1.0
    """Score given when no truncation token is found (the paper's -1)."""
    query_prefix: str = ""
    """Text before the source text (CNN/DM: "Article:\\n\\n")."""
    query_suffix: str = ""
    """Text after the source text (summaries: "\\n\\nTL;DR:")."""
    start_after: str | None = None
    """Style tasks: the query starts after the first token matching this text ('.'), matched as the truncation
    rule's `tokens` says ("exact" without a rule; released: lm_tasks.py make_query_sampler, `start_token,`)."""
    end_at: str | None = None
    """The query ends at the last token matching this text ('.' for style, '\\n' for CNN/DM), matched as
    `start_after` is."""
    init_beta: float = 0.15
    """Initial KL coefficient beta (paper: 0.15 for style tasks; code: 0.03 TL;DR, 0.01 CNN/DM)."""
    kl_target: float | None = 6.0
    """Target KL in nats for the adaptive controller; None means fixed beta (the code's summary setting)."""

    def __post_init__(self):
        """Refuse bad settings now, before any sampling (labkit.checks). A truncation `after` at or beyond
        response_length is allowed: every response is then penalised (tests use it on purpose)."""
        check_types(self)
        non_empty(self, "name", "it names the task in the label store and in file names")
        one_of(self, "prompt_source", PROMPT_SOURCES, "the prompt columns labkit.data reads")
        at_least(self, "query_length", 1)
        at_least(self, "response_length", 1)
        above(self, "temperature", 0, "logits are divided by it; use a small value such as 0.01 for near-greedy")
        finite(self, "penalty")
        at_least(self, "init_beta", 0)
        above(self, "kl_target", 0, "target KL in nats; None = a fixed beta")
        if self.init_beta == 0 and self.kl_target is not None:  # the controller multiplies beta: 0 stays 0
            fail(self, "init_beta", "a beta of 0 never moves under the adaptive controller (it multiplies beta); "
                 "set kl_target=None for a fixed beta of 0, or init_beta > 0.")

    def with_(self, **changes) -> Task:
        """A copy with some fields changed, e.g. `SENTIMENT.with_(response_length=16)`."""
        return replace(self, **changes)


_STYLE_TRUNCATION = TruncationRule(text=".", after=16)
_SUMMARY_TRUNCATION = TruncationRule(text="\n", after=55)

SENTIMENT = Task(
    name="sentiment",
    title="Positive sentiment continuation",
    instructions=(
        "Which continuation is the most positive and happy? Judge only the continuation (after the prompt), "
        "not the prompt. Prefer text that is happy and upbeat; ignore grammar unless it hides the meaning."
    ),
    prompt_source="passages",
    query_length=64,
    response_length=24,
    temperature=0.7,
    truncation=_STYLE_TRUNCATION,
    start_after=".",
    end_at=".",
    init_beta=0.15,
    kl_target=6.0,
)

DESCRIPTIVENESS = replace(  # the same experiment with another instruction to the labelers
    SENTIMENT,
    name="descriptiveness",
    title="Vividly descriptive continuation",
    instructions=(
        "Which continuation is the most vividly descriptive? Prefer text that paints a concrete picture "
        "(sights, sounds, textures, specific detail) and stays coherent with the prompt."
    ),
)

TLDR = Task(
    name="tldr",
    title="TL;DR summarization (Reddit-style posts)",
    instructions=(
        "Which is the best summary of the post? A good summary is accurate (penalise anything the post "
        "does not say), covers the main point, and is concise. Copying sentences from the post is fine."
    ),
    prompt_source="tldr",
    query_length=500,
    response_length=75,
    temperature=0.7,
    truncation=_SUMMARY_TRUNCATION,
    query_suffix="\n\nTL;DR:",
    init_beta=0.03,
    kl_target=None,
)

CNNDM = Task(
    name="cnndm",
    title="CNN/DailyMail-style news summarization",
    instructions=(
        "Which is the best summary of the article? A good summary is accurate (penalise anything the "
        "article does not say), covers the key facts, and is concise. Copying sentences is fine."
    ),
    prompt_source="cnndm",
    query_length=500,
    response_length=75,
    temperature=0.5,
    truncation=_SUMMARY_TRUNCATION,
    query_prefix="Article:\n\n",
    query_suffix="\n\nTL;DR:",
    end_at="\n",
    init_beta=0.01,
    kl_target=None,
)

TASKS: dict[str, Task] = {t.name: t for t in (SENTIMENT, DESCRIPTIVENESS, TLDR, CNNDM)}


def get_task(task: str | Task) -> Task:
    """A Task from its name (or the Task itself); a clear error for unknown names."""
    if isinstance(task, Task):
        return task
    if task not in TASKS:
        raise KeyError(f"Unknown task {task!r}. Known tasks: {', '.join(TASKS)}. Or build your own `Task(...)`.")
    return TASKS[task]


# --------------------------------------------------------------------------------------------------
# token-level helpers (pure functions of a tokenizer)


def special_token_ids(tokenizer) -> set[int]:
    """Ids of the tokenizer's special tokens: its named ones and every added token marked special (SmolLM2:
    0-16, its code and jupyter markers included, of which only 0-2 are named)."""
    added = getattr(tokenizer, "added_tokens_decoder", {})
    return set(tokenizer.all_special_ids) | {i for i, t in added.items() if getattr(t, "special", False)}


def _contains_ids(tokenizer, text: str) -> frozenset[int]:
    """Ids of every non-special token whose text contains `text` not followed by a letter or digit."""
    pattern = re.compile(re.escape(text) + r"(?![A-Za-z0-9])")
    ids = range(len(tokenizer))
    pieces = tokenizer.batch_decode([[i] for i in ids])
    special = special_token_ids(tokenizer)
    return frozenset(i for i, p in zip(ids, pieces) if i not in special and pattern.search(p))


def _exact_ids(tokenizer, text: str) -> frozenset[int]:
    """Ids of every non-special token whose text, read after another token, is exactly `text`.

    Why after an anchor token ('a') rather than alone: a SentencePiece tokenizer (Llama style) drops the '▁'
    (a leading space) of the first token it decodes, so ' .' alone reads '.'; after 'a' it reads 'a .', and
    the difference from 'a' is ' .'. Byte-level BPE (GPT-2, SmolLM2) decodes the same either way.
    `clean_up_tokenization_spaces=False`: that clean-up turns 'a .' into 'a.' (GPT-2's tokenizer had it on).
    """
    anchor = tokenizer.encode("a", add_special_tokens=False)[-1:]
    head = tokenizer.decode(anchor, clean_up_tokenization_spaces=False)
    special = special_token_ids(tokenizer)
    ids = [i for i in range(len(tokenizer)) if i not in special]
    pieces = tokenizer.batch_decode([anchor + [i] for i in ids], clean_up_tokenization_spaces=False)
    return frozenset(i for i, p in zip(ids, pieces) if p == head + text)


@lru_cache(maxsize=32)
def _matching_ids(tokenizer, text: str, tokens: str) -> frozenset[int]:
    """`token_ids_matching`, cached per (tokenizer object, text, mode): one pass over the vocabulary each."""
    if tokens == "contains":
        return _contains_ids(tokenizer, text)
    found = _exact_ids(tokenizer, text)
    if not found:
        name = getattr(tokenizer, "name_or_path", "") or type(tokenizer).__name__
        raise ValueError(f"No token of the tokenizer {name!r} ({type(tokenizer).__name__}) is exactly {text!r}, so "
                         f"tokens='exact' cannot find it; use TruncationRule(..., tokens='contains') to match every "
                         f"token whose text contains {text!r}.")
    return found


def token_ids_matching(tokenizer, text: str, tokens: str = "exact") -> frozenset[int]:
    """Token ids that count as an occurrence of `text` (for truncation and query trimming), matched as
    `TruncationRule.tokens` describes: "exact" (as released; a ValueError if no token is exactly `text`) or
    "contains"."""
    if tokens not in TOKEN_MATCHING:
        raise ValueError(f"tokens = {tokens!r}: must be one of {', '.join(map(repr, TOKEN_MATCHING))}.")
    return _matching_ids(tokenizer, text, tokens)


def query_matching(task: Task) -> str:
    """How `format_query` matches `start_after` and `end_at`: as the task's truncation rule, else exactly."""
    return task.truncation.tokens if task.truncation is not None else "exact"


def format_query(task: Task, text: str, tokenizer) -> list[int]:
    """Token ids of the query for one source text, following the paper.

    Style tasks: at most `query_length` tokens starting after the first '.' and ending at the last '.'.
    Summaries: prefix + at most `query_length` tokens of the source (CNN/DM: ending at the last newline)
    + suffix. Trimming is skipped when it would leave nothing (e.g. a text with a single sentence).
    The marks are token ids matched as the truncation rule matches (`query_matching`); released:
    language/datasets.py Dataset.tf_dataset with single start/end token ids.
    """
    ids = tokenizer.encode(text, add_special_tokens=False)
    mode = query_matching(task)
    if task.start_after:
        marks = token_ids_matching(tokenizer, task.start_after, mode)
        first = next((i for i, t in enumerate(ids) if t in marks), None)
        if first is not None and first + 1 < len(ids):
            ids = ids[first + 1 :]
    ids = ids[: task.query_length]
    if task.end_at:
        marks = token_ids_matching(tokenizer, task.end_at, mode)
        last = max((i for i, t in enumerate(ids) if t in marks), default=None)
        if last is not None:
            ids = ids[: last + 1]
    prefix = tokenizer.encode(task.query_prefix, add_special_tokens=False) if task.query_prefix else []
    suffix = tokenizer.encode(task.query_suffix, add_special_tokens=False) if task.query_suffix else []
    return prefix + ids + suffix


def truncation_index(response: list[int], rule: TruncationRule, match_ids: frozenset[int]) -> int | None:
    """Index of the token that ends the response under `rule`, or None when there is none (-> penalty)."""
    for i in range(rule.after, len(response)):
        if response[i] in match_ids:
            return i
    return None
