"""Evaluation as in the paper's results: ROUGE, the lead-3 baseline, "smart copier" statistics, blind
win rates with confidence intervals, best-of-N with a reward model, and the reward-vs-KL frontier.

What the paper measured (Ziegler et al. 2019, section 4.2 and appendix):

- ROUGE-1/2/L F1 against the reference summaries and their mean, the "ROUGE average" (CNN/DM: RL with 60k
  online labels 28.73, lead-3 31.55).
- The lead-3 baseline: the first three sentences of the article.
- RL summarisers are "smart copiers": the percentage of summary sentences NOT found in the source (RL 2.5
  on CNN/DM, 29.0 on TL;DR; references 96.7 / 98.9), and how often a summary copies the start of the
  input (RL 77.6% / 28.3%), skipping uninformative preambles ("hi", "so", a colon in the first 3 words).
- Human preference rates of one model over another (e.g. fine-tuned preferred to zero-shot 88% of the
  time on sentiment), which we report with a Wilson score interval.

Everything here is a pure function of strings and numbers, except `before_after`, which samples through a
PPOTrainer; no torch import. plotly is imported only by `frontier_figure`; tqdm only by `rouge`, for its progress
bar.
"""

import html
import math
import re
import statistics
import string
from statistics import NormalDist

# --- ROUGE and lead-3 -------------------------------------------------------------------------------

_SENTENCE_BREAK = re.compile(r"(?<=[.!?])\s+|\s*\n\s*")


def split_sentences(text: str) -> list[str]:
    """Split text into sentences with one simple rule, used by every statistic in this module.

    A sentence ends at '.', '!' or '?' followed by whitespace, or at a newline. Pieces are stripped and
    empty pieces dropped. Deliberately naive: "Mr. Smith" splits after "Mr.", and a sentence ending in a
    closing quote ('... done."') does not end there. The same splitter is applied to summaries, sources
    and references, so its mistakes cancel in comparisons.
    """
    return [s.strip() for s in _SENTENCE_BREAK.split(text) if s.strip()]


def lead_k(text: str, k: int = 3) -> str:
    """The lead-k baseline: the first k sentences of `text`, one per line (lead-3 for CNN/DM)."""
    if k < 1:
        raise ValueError(f"k must be at least 1, got {k}")
    return "\n".join(split_sentences(text)[:k])


def rouge(predictions: list[str], references: list[str], progress: bool = True) -> dict:
    """Mean ROUGE-1, ROUGE-2 and ROUGE-L F1 (x 100) of predictions against references, and their mean.

    Returns {"rouge1", "rouge2", "rougeL", "rouge_avg"}; "rouge_avg" is the paper's "ROUGE average".
    Scored with Google's rouge_score with the Porter stemmer. ROUGE-L is the summary-level "rougeLsum":
    both texts are put one sentence per line (`split_sentences`) and the LCS is taken per reference line
    against the union of prediction lines, so multi-sentence summaries are not penalised for sentence
    order. Newlines do not affect ROUGE-1/2.

    progress: a bar with the time left (tqdm) for a scoring that takes more than two seconds (thousands of
    pairs, or long ones); a quick one prints nothing.
    """
    if len(predictions) != len(references):
        raise ValueError(
            f"{len(predictions)} predictions but {len(references)} references: one reference per prediction"
        )
    if not predictions:
        raise ValueError("rouge needs at least one (prediction, reference) pair")
    from rouge_score import rouge_scorer
    from tqdm.auto import tqdm

    scorer = rouge_scorer.RougeScorer(["rouge1", "rouge2", "rougeLsum"], use_stemmer=True)
    totals = {"rouge1": 0.0, "rouge2": 0.0, "rougeL": 0.0}
    # delay: the bar appears only once the scoring has run that long, so a table of a few summaries stays quiet
    pairs = tqdm(zip(predictions, references), total=len(predictions), desc="ROUGE", unit="pair", delay=2.0,
                 disable=not progress)
    for prediction, reference in pairs:
        scores = scorer.score("\n".join(split_sentences(reference)), "\n".join(split_sentences(prediction)))
        totals["rouge1"] += scores["rouge1"].fmeasure
        totals["rouge2"] += scores["rouge2"].fmeasure
        totals["rougeL"] += scores["rougeLsum"].fmeasure
    result = {name: 100.0 * total / len(predictions) for name, total in totals.items()}
    result["rouge_avg"] = (result["rouge1"] + result["rouge2"] + result["rougeL"]) / 3
    return result


# --- "Smart copier" statistics ----------------------------------------------------------------------

PREAMBLE_WORDS = frozenset({"hi", "hey", "hello", "hiya", "greetings", "dear", "so", "ok", "okay", "well"})
"""First words that mark a sentence as a greeting or filler opener ("Hi everyone.", "So here goes.")."""


def _normalise(text: str) -> str:
    """Lower-case and collapse all whitespace to single spaces."""
    return " ".join(text.lower().split())


def _is_preamble(sentence: str) -> bool:
    words = sentence.split()
    return (
        len(words) < 4
        or any(":" in word for word in words[:3])
        or words[0].strip(string.punctuation).lower() in PREAMBLE_WORDS
    )


def skip_preamble(sentences: list[str]) -> list[str]:
    """Drop the uninformative preamble: the leading sentences for which any of these holds.

    1. it has fewer than 4 whitespace-separated words ("Hi everyone.", "Long time lurker.");
    2. one of its first 3 words contains ':' ("So: here it is", "Background: I am 25 and ...");
    3. its first word, lower-cased and stripped of punctuation, is in PREAMBLE_WORDS
       ("Hello reddit, first time poster here.", "So I need some advice on this.").

    Stops at the first sentence that is none of these and returns it and everything after it (possibly
    an empty list). The paper observed that its RL summarisers copy the start of the input but skip
    such preambles ("hi", "so", a colon in the first 3 words); the thresholds here are ours.
    """
    for i, sentence in enumerate(sentences):
        if not _is_preamble(sentence):
            return list(sentences[i:])
    return []


def copies_opening(summary: str, source: str) -> bool:
    """Whether the summary's first sentence appears verbatim in the source's opening.

    The opening is the source's preamble (see `skip_preamble`) plus the two sentences after it, joined
    with spaces; "verbatim" is a substring test after lower-casing and collapsing whitespace. Including
    the preamble means a summary that copies the very first sentence also counts. An empty summary does
    not copy anything.
    """
    summary_sentences = split_sentences(summary)
    if not summary_sentences:
        return False
    source_sentences = split_sentences(source)
    n_preamble = len(source_sentences) - len(skip_preamble(source_sentences))
    opening = _normalise(" ".join(source_sentences[: n_preamble + 2]))
    return _normalise(summary_sentences[0]) in opening


def copy_stats(summaries: list[str], sources: list[str]) -> dict:
    """The paper's "smart copier" statistics for summaries of the given sources.

    Returns
      novel_sentence_pct: percentage of all summary sentences (pooled over summaries) that are NOT a
        substring of their source after lower-casing and collapsing whitespace (paper: RL 2.5 on CNN/DM,
        29.0 on TL;DR; human references 96.7 / 98.9). NaN if no summary has a sentence.
      copies_opening_pct: percentage of summaries whose first sentence copies the source's opening,
        preamble skipped (`copies_opening`; paper: RL 77.6% on CNN/DM, 28.3% on TL;DR).
      n_summaries, n_sentences: the counts behind the percentages.
    Sentences come from `split_sentences`.
    """
    if len(summaries) != len(sources):
        raise ValueError(f"{len(summaries)} summaries but {len(sources)} sources: one source per summary")
    if not summaries:
        raise ValueError("copy_stats needs at least one (summary, source) pair")
    n_sentences = n_novel = n_copies = 0
    for summary, source in zip(summaries, sources):
        normalised_source = _normalise(source)
        for sentence in split_sentences(summary):
            n_sentences += 1
            n_novel += _normalise(sentence) not in normalised_source
        n_copies += copies_opening(summary, source)
    return {
        "novel_sentence_pct": 100.0 * n_novel / n_sentences if n_sentences else math.nan,
        "copies_opening_pct": 100.0 * n_copies / len(summaries),
        "n_summaries": len(summaries),
        "n_sentences": n_sentences,
    }


# --- Win rates from blind comparisons ---------------------------------------------------------------


def win_rate(wins: float, n: int, confidence: float = 0.95) -> dict:
    """Win rate wins / n with its Wilson score interval: {"rate", "low", "high", "n"}.

    The paper reports how often labelers preferred one model's sample to another's (e.g. 88% for the
    fine-tuned sentiment model over zero-shot GPT-2). Ties are the caller's: count a tie as half a win,
    so `wins` may be a float such as 7.5. The Wilson interval stays inside [0, 1] and behaves at rates
    near 0 or 1, unlike the normal approximation p +- z * sqrt(p (1 - p) / n).
    """
    if n <= 0:
        raise ValueError(f"win_rate needs at least one comparison, got n={n}")
    if not 0 <= wins <= n:
        raise ValueError(f"wins must be between 0 and n={n}, got {wins}")
    if not 0 < confidence < 1:
        raise ValueError(f"confidence must be in (0, 1), got {confidence}")
    z = NormalDist().inv_cdf(0.5 + confidence / 2)
    p = wins / n
    denominator = 1 + z**2 / n
    centre = (p + z**2 / (2 * n)) / denominator
    half_width = z / denominator * math.sqrt(p * (1 - p) / n + z**2 / (4 * n**2))
    return {"rate": p, "low": max(0.0, centre - half_width), "high": min(1.0, centre + half_width), "n": n}


def paired_difference(before: list[float], after: list[float], confidence: float = 0.95) -> dict:
    """Mean of after[i] - before[i] over paired measurements (the same prompts and seeds scored before and after
    training) with its Student-t interval: {"before", "after", "diff", "low", "high", "n"}.

    Pairing removes the prompts' own spread (a happy prompt gives happy continuations before and after), so the
    interval is the one of the per-prompt differences, sd / sqrt(n) wide times t(n - 1)."""
    n = len(before)
    if n != len(after):
        raise ValueError(f"before and after must pair up: got {n} and {len(after)} values")
    if n < 2:
        raise ValueError(f"an interval needs at least 2 pairs, got {n}")
    if not 0 < confidence < 1:
        raise ValueError(f"confidence must be in (0, 1), got {confidence}")
    diffs = [a - b for a, b in zip(after, before)]
    mean = sum(diffs) / n
    sd = math.sqrt(sum((d - mean) ** 2 for d in diffs) / (n - 1))
    half_width = _t_quantile(0.5 + confidence / 2, n - 1) * sd / math.sqrt(n)
    return {"before": sum(before) / n, "after": sum(after) / n, "diff": mean, "low": mean - half_width,
            "high": mean + half_width, "n": n}


def per_prompt_means(values: list[float], n_prompts: int, samples: int) -> list[float]:
    """Values laid out sample-major (sample s of prompt p at s * n_prompts + p) -> each prompt's mean, (n_prompts,)."""
    if len(values) != n_prompts * samples:
        raise ValueError(f"{len(values)} values for {n_prompts} prompts x {samples} samples")
    return [sum(values[s * n_prompts + p] for s in range(samples)) / samples for p in range(n_prompts)]


def before_after(trainer, prompts: list[str], score, samples: int = 1) -> dict:
    """What PPO changed, on held-out prompts: rho and pi each continue every prompt `samples` times, sample s of
    every prompt with seed s for both (so pi == rho would give the very same texts), and `score` (texts -> one float
    each, e.g. a mock labeler's `score`) judges them. The paired differences run over the prompts, each prompt's
    samples averaged first, so a prompt's own spread does not count as evidence (`paired_difference`).

    Returns {"before", "after": one Rollout per seed (rho's, pi's), "score_rho", "score_pi": `score` of each sample,
    sample-major, "rm_rho", "rm_pi": the trainer's own score of each (what PPO maximised, penalty included),
    "effect": paired_difference of `score`, "learned": the same of the trainer's score, "agreement": Pearson
    correlation of the two scores on the samples with a truncation point (where both judge the same text; nan
    below 3 such samples or when one is constant), "found_rho", "found_pi": the fractions with a truncation
    point}."""
    if samples < 1:
        raise ValueError(f"samples must be at least 1, got {samples}")
    out = {key: [] for key in ("before", "after", "score_rho", "score_pi", "rm_rho", "rm_pi")}
    pairs, found = [], {"rho": [], "pi": []}
    for seed in range(samples):
        rolls = {"rho": trainer.sample_rho(prompts, seed=seed), "pi": trainer.sample_policy(prompts, seed=seed)}
        for name, roll in rolls.items():
            judged, rm, ok = list(score(roll.response_texts)), trainer.score(roll).tolist(), roll.found.tolist()
            if len(judged) != len(roll):
                raise ValueError(f"score returned {len(judged)} values for {len(roll)} texts: it must give one each")
            out["before" if name == "rho" else "after"].append(roll)
            out[f"score_{name}"] += judged
            out[f"rm_{name}"] += rm
            found[name] += ok
            pairs += [(r, v) for r, v, k in zip(rm, judged, ok) if k]
    n = len(prompts)

    def paired(key: str) -> dict:
        return paired_difference(per_prompt_means(out[f"{key}_rho"], n, samples),
                                 per_prompt_means(out[f"{key}_pi"], n, samples))

    return {**out, "effect": paired("score"), "learned": paired("rm"), "agreement": pearson(pairs),
            "found_rho": sum(found["rho"]) / len(found["rho"]), "found_pi": sum(found["pi"]) / len(found["pi"])}


def pearson(pairs: list[tuple[float, float]]) -> float:
    """Pearson correlation of (x, y) pairs; nan below 3 pairs or when either side is constant."""
    if len(pairs) < 3:
        return math.nan
    try:
        return statistics.correlation(*zip(*pairs))
    except statistics.StatisticsError:  # a constant side
        return math.nan


def _t_quantile(p: float, df: int) -> float:
    """Student's t quantile from the normal one by the Cornish-Fisher series (Abramowitz & Stegun 26.7.5): within
    1e-3 of the exact value from df = 5 on (2.0395 for p = 0.975, df = 31), without scipy."""
    z = NormalDist().inv_cdf(p)
    g1 = (z**3 + z) / 4
    g2 = (5 * z**5 + 16 * z**3 + 3 * z) / 96
    g3 = (3 * z**7 + 19 * z**5 + 17 * z**3 - 15 * z) / 384
    g4 = (79 * z**9 + 776 * z**7 + 1482 * z**5 - 1920 * z**3 - 945 * z) / 92160
    return z + g1 / df + g2 / df**2 + g3 / df**3 + g4 / df**4


def policy_verdicts(store, task: str, policy_source_prefix: str = "policy", kind: str = "eval"):
    """Yield (comparison, label, won, share) for each labeled comparison that sets some responses of the policy
    (source starts with `policy_source_prefix`) against some of other models: `won`, the chosen response is one of
    the policy's; `share`, the policy's share of the responses (what a random choice wins). Each labeler's latest
    live label per comparison (`store.training_set`); comparisons with only one side are left out. The one rule
    behind every win rate (`win_rate_from_store`, the online loop's per policy)."""
    for comparison, label in store.training_set(task=task, kind=kind):
        is_policy = [source.startswith(policy_source_prefix) for source in comparison.sources]
        if all(is_policy) or not any(is_policy):
            continue
        yield comparison, label, is_policy[label.best], sum(is_policy) / len(is_policy)


def win_rate_from_store(store, task: str, policy_source_prefix: str = "policy", kind: str = "eval") -> dict:
    """The policy's win rate in blind comparisons against other models, read from a LabelStore.

    Counts the comparisons of `policy_verdicts`: those where some responses come from the policy (source starts
    with `policy_source_prefix`, e.g. "policy@40:3f9a0c1e") and some do not (e.g. "rho", "reference"); the policy
    wins when the chosen response is one of its own.

    Returns `win_rate(wins, n)` plus
      chance: the win rate of a labeler choosing at random (mean share of policy responses; 0.5 for
        2-way policy-vs-reference comparisons, 0.25 for one policy sample among 4);
      by_labeler: {labeler: win_rate(...)} per labeler.
    """
    wins, shares, by_labeler = [], [], {}
    for _, label, won, share in policy_verdicts(store, task, policy_source_prefix, kind):
        wins.append(won)
        shares.append(share)
        by_labeler.setdefault(label.labeler, []).append(won)
    if not wins:
        raise ValueError(
            f"no labeled {kind!r} comparisons for task {task!r} set a response whose source starts with "
            f"{policy_source_prefix!r} against one whose source does not"
        )
    result = win_rate(sum(wins), len(wins))
    result["chance"] = sum(shares) / len(shares)
    result["by_labeler"] = {labeler: win_rate(sum(w), len(w)) for labeler, w in sorted(by_labeler.items())}
    return result


# --- Best-of-N, the frontier, sample tables ---------------------------------------------------------


def best_of_n(texts_per_prompt: list[list[str]], scores_per_prompt: list[list[float]]) -> list[str]:
    """For each prompt, the candidate with the highest score (the first one on a tie).

    Best-of-N sampling with a reward model: the caller samples N continuations per prompt from the
    policy and scores them with the reward model; this picks the winners. A baseline for RL fine-tuning
    that optimises the reward without training the policy.
    """
    if len(texts_per_prompt) != len(scores_per_prompt):
        raise ValueError(f"texts for {len(texts_per_prompt)} prompts but scores for {len(scores_per_prompt)}")
    best = []
    for i, (texts, scores) in enumerate(zip(texts_per_prompt, scores_per_prompt)):
        if len(texts) != len(scores) or not texts:
            raise ValueError(f"prompt {i}: {len(texts)} texts, {len(scores)} scores; need equal numbers >= 1")
        best.append(texts[max(range(len(scores)), key=scores.__getitem__)])
    return best


def frontier_figure(points: list[dict], x: str = "kl", y: str = "score", label: str = "name"):
    """The reward-vs-KL frontier across checkpoints as a plotly Figure.

    Each point is a dict such as {"name": "step 400", "kl": 5.8, "score": 1.9}: the mean KL(pi || rho)
    and the mean reward of one checkpoint. Points are joined by a line in order of x; hovering shows the
    label. The paper tunes beta so that the policy gains reward at a modest KL (e.g. KL about 6 nats).
    """
    missing = [i for i, point in enumerate(points) if not {x, y, label} <= point.keys()]
    if missing:
        raise ValueError(f"points {missing} lack one of the keys {x!r}, {y!r}, {label!r}")
    import plotly.graph_objects as go

    ordered = sorted(points, key=lambda point: point[x])
    scatter = go.Scatter(
        x=[point[x] for point in ordered],
        y=[point[y] for point in ordered],
        hovertext=[str(point[label]) for point in ordered],
        mode="lines+markers",
        name=y,
    )
    return go.Figure(scatter, layout={"title": f"{y} vs {x}", "xaxis_title": x, "yaxis_title": y})


def before_after_figure(result: dict, judge: str, more: str = "higher"):
    """`before_after`'s first sample of every prompt as a plotly Figure: rho's score on x, pi's on y, one marker per
    prompt (hover: both texts), the no-change diagonal, and the paired difference with its interval in the title.
    `judge` names the score ("VADER"); `more` says what a higher one means ("more positive")."""
    import plotly.graph_objects as go

    (before,), (after,) = result["before"][:1], result["after"][:1]
    n = len(before)
    x, y = result["score_rho"][:n], result["score_pi"][:n]
    lo, hi = min(x + y), max(x + y)
    pad = 0.05 * (hi - lo or 1.0)
    effect = result["effect"]
    fig = go.Figure([
        go.Scatter(x=x, y=y, mode="markers", name="one held-out prompt", marker=dict(size=9),
                   hovertext=[f"rho: {b}<br>pi: {a}" for b, a in zip(before.response_texts, after.response_texts)]),
        go.Scatter(x=[lo - pad, hi + pad], y=[lo - pad, hi + pad], mode="lines", name="no change",
                   line=dict(dash="dash", color="grey")),
    ])
    fig.update_layout(
        title=f"{judge} of each prompt's continuation: above the line, pi is {more} than rho<br>"
              f"<sup>mean {effect['before']:+.2f} → {effect['after']:+.2f}: {effect['diff']:+.2f} "
              f"(95% CI {effect['low']:+.2f} to {effect['high']:+.2f}, {effect['n']} prompts)</sup>",
        xaxis_title="rho (before PPO)", yaxis_title="pi (after PPO)", xaxis_range=[lo - pad, hi + pad],
        yaxis_range=[lo - pad, hi + pad], width=560, height=480)
    return fig


def before_after_table(result: dict, judge: str, rows: int = 8) -> str:
    """The first `rows` held-out prompts of `before_after`'s first sample side by side (prompt end, rho's and pi's
    continuation, `judge`'s score of each) as an HTML table (`comparison_table`)."""
    (before,), (after,) = result["before"][:1], result["after"][:1]
    n = len(before)
    return comparison_table([
        {"prompt (end)": "…" + q[-120:], "rho": b, "pi": a, f"{judge} rho → pi": f"{vb:+.2f} → {va:+.2f}"}
        for q, b, a, vb, va in zip(before.query_texts, before.response_texts, after.response_texts,
                                   result["score_rho"][:n], result["score_pi"][:n])][:rows])


def comparison_table(rows: list[dict]) -> str:
    """An HTML table of rows side by side, e.g. {"query", "before", "after"} samples, for a notebook.

    Columns are the keys of all rows in first-seen order (a missing value is an empty cell). Every value
    is converted with str() and HTML-escaped; newlines are kept (white-space: pre-wrap). A value that is
    an empty or blank string (an empty response) shows as "(empty)", so that it is not mistaken for a
    missing value or a display glitch. Headers are left-aligned, over left-aligned cells. Show it with
    IPython.display.HTML.
    """
    if not rows:
        raise ValueError("comparison_table needs at least one row")
    columns = list(dict.fromkeys(key for row in rows for key in row))
    align = "text-align: left; vertical-align: top"  # headers too: browsers centre <th>, JupyterLab right-aligns it
    cell = f'<td style="white-space: pre-wrap; {align}">{{}}</td>'
    header = "".join(f'<th style="{align}">{html.escape(str(column))}</th>' for column in columns)
    body = "".join(
        "<tr>" + "".join(cell.format(_cell_text(row, column)) for column in columns) + "</tr>"
        for row in rows
    )
    return f"<table><thead><tr>{header}</tr></thead><tbody>{body}</tbody></table>"


EMPTY = "(empty)"


def _cell_text(row: dict, column) -> str:
    if column not in row:
        return ""
    text = str(row[column])
    return EMPTY if isinstance(row[column], str) and not text.strip() else html.escape(text)
