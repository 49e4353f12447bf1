"""Programmatic ("mock") labelers, so the whole lab runs without a human.

The paper's mock-sentiment experiment replaces the human with a sentiment classifier that picks the best of
four responses; these do the same for each task. A labeler's `score(texts)` is also a reward function
(higher is better), so PPO can be run directly on the mock human and compared with PPO on a reward model
learned from its labels.

`temperature` simulates noisy, disagreeing labelers: 0 always picks the highest score; T > 0 picks
response i with probability exp(score_i / T) / sum_j exp(score_j / T). T is in the units of the score
(VADER compound and ROUGE-L F1 lie in [-1, 1] and [0, 1], so T = 0.1 is already noisy).
Give each simulated labeler its own `labeler_id` and `seed` to study agreement between them, and label with
`label_pending(..., also_labeled_by_others=True)`: by default a mock labels only what nobody else has.

`skip_ties=True` makes a labeler skip (as a person presses "skip") when the best score is shared: VADER
gives exactly 0.0 to any text without a sentiment word, so about a quarter of 4-way comparisons of 24-token
continuations have a tied top, and an arbitrary pick among equals is pure label noise for the reward model.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np

from labkit.labeling.store import Comparison, LabelStore


class Labeler(Protocol):
    labeler_id: str

    def choose(self, comparison: Comparison) -> int | None:
        """Index (stored order) of the best response of `comparison`, or None to skip it."""
        ...


def label_pending(store: LabelStore, labeler: Labeler, task=None, kind=None, limit=None, *,
                  also_labeled_by_others: bool = False, progress: bool = True) -> int:
    """Have `labeler` label the comparisons that nobody has labeled or skipped yet (at most `limit`), oldest
    first: it fills in around the people (and other labelers) of this store, and never adds its own label to
    a comparison a person already labeled or skipped. The reward model trains on every labeler's labels, so a
    mock label there would outweigh the person's, and a person's skip says the comparison should not be
    labeled at all.

    also_labeled_by_others=True: label every comparison `labeler` itself has neither labeled nor skipped,
    whoever else did (e.g. several mock labelers on the same comparisons, to study their agreement).
    Labels and skips (choose() returned None) are stored under labeler.labeler_id; returns how many
    comparisons were handled (labels + skips). progress: show a progress bar with an ETA (tqdm).
    """
    from tqdm.auto import tqdm  # here: notebook or terminal bar, whichever this runs in

    todo = set(store.pending(labeler.labeler_id, task=task, kind=kind,
                             exclude_labeled_by_others=not also_labeled_by_others))
    comparisons = [c for c in store.comparisons(task=task, kind=kind) if c.id in todo][:limit]
    # Commit in chunks: one fsync per chunk instead of per label, and a crash loses at most one chunk
    # of (recomputable) mock labels.
    chunk = 256
    with tqdm(total=len(comparisons), desc=f"labeling as {labeler.labeler_id}", unit="comparison",
              disable=not progress or not comparisons) as bar:
        for start in range(0, len(comparisons), chunk):
            picks = []
            for c in comparisons[start:start + chunk]:
                picks.append((c, labeler.choose(c)))
                bar.update()
            store.record_labels([dict(comparison_id=c.id, best=best, labeler=labeler.labeler_id)
                                 for c, best in picks if best is not None])
            for c, best in picks:  # rare (ties only), so one transaction each is fine
                if best is None:
                    store.record_skip(c.id, labeler.labeler_id, note="tied top score")
    return len(comparisons)


@dataclass
class _ScoreLabeler:
    """Picks by a score of each response; subclasses define `score`."""

    temperature: float = 0.0
    seed: int | None = None
    skip_ties: bool = False
    _rng: np.random.Generator = field(init=False, repr=False, compare=False)

    def __post_init__(self):
        if not self.temperature >= 0:
            raise ValueError(f"temperature must be >= 0 (0 = always pick the best score), got {self.temperature}")
        self._rng = np.random.default_rng(self.seed)

    def score(self, texts: list[str], references: list[str] | None = None) -> list[float]:
        raise NotImplementedError

    def __call__(self, texts: list[str], references: list[str] | None = None) -> list[float]:
        return self.score(texts, references)

    def choose(self, comparison: Comparison) -> int | None:
        references = None if comparison.reference is None else [comparison.reference] * comparison.k
        scores = self.score(comparison.responses, references)
        if self.skip_ties and scores.count(max(scores)) > 1:
            return None
        return pick(scores, self.temperature, self._rng)


def pick(scores, temperature: float, rng: np.random.Generator) -> int:
    """argmax of `scores` at temperature 0 (first one on ties), else a draw from softmax(scores / temperature)."""
    scores = np.asarray(scores, dtype=np.float64)
    if temperature == 0:
        return int(np.argmax(scores))
    logits = scores / temperature
    p = np.exp(logits - logits.max())  # minus the max: no overflow at small temperatures
    return int(rng.choice(len(p), p=p / p.sum()))


@dataclass
class VaderLabeler(_ScoreLabeler):
    """Prefers the most positive response: VADER's compound sentiment score in [-1, 1] (a lexicon and rules,
    no model download), standing in for the paper's "positive and happy" labelers."""

    labeler_id: str = "mock:vader"

    def __post_init__(self):
        super().__post_init__()
        from vaderSentiment.vaderSentiment import SentimentIntensityAnalyzer

        self._analyzer = SentimentIntensityAnalyzer()

    def score(self, texts, references=None):
        return [self._analyzer.polarity_scores(t)["compound"] for t in texts]


# Words that make a reader see, hear, feel, smell or taste something: colours, light, sound, texture,
# temperature, smell and taste, shape and size, motion. A small hand-picked list, enough to separate
# "the crimson sun sank behind jagged peaks" from "the sun went down".
SENSORY_WORDS = frozenset("""
    red crimson scarlet ruby pink rosy orange amber golden gold yellow green emerald olive blue azure navy
    turquoise indigo violet purple lavender brown chestnut tawny black ebony white ivory pale grey gray
    silver silvery bronze copper coppery
    bright brilliant dazzling radiant glowing gleaming glistening glittering shimmering sparkling shining
    flickering twinkling luminous dim dusky shadowy shadows shadow murky hazy misty foggy gloomy dark
    sunlit moonlit candlelit
    loud thunderous roaring booming echoing humming buzzing whispering whispered rustling crackling
    creaking clattering rumbling hissing chirping howling murmuring silent hushed quiet shrill
    rough smooth silky velvety soft coarse jagged sharp prickly slick slippery sticky damp wet soggy
    muddy dusty gritty crisp brittle fuzzy furry feathery grainy glossy polished rusty weathered
    cold icy frosty freezing chilly cool warm hot scorching sweltering steaming balmy humid
    fragrant scented perfumed musty pungent acrid smoky earthy fresh stale sweet sour bitter salty
    savory spicy tangy juicy ripe rotten
    towering tiny enormous vast huge massive narrow wide twisted gnarled crooked curved round
    slender plump lanky hulking sprawling
    fluttering swirling drifting trembling quivering flowing rippling billowing swaying tumbling
    dripping trickling gushing flapping darting creeping
    eerie serene tranquil ominous stark lush barren desolate vivid ornate ancient
""".split())

# Concrete things a reader can picture: parts of a room and a house, streets and places, nature and weather, the
# body, clothes, objects in hand, animals, vehicles. Worth half a sensory word: "a cup on the table" shows something,
# "an amber cup" shows more.
CONCRETE_WORDS = frozenset("""
    door doors window windows wall walls floor floors ceiling roof table tables chair chairs bed beds desk shelf
    stairs staircase hallway corridor kitchen room rooms porch garden gardens yard fence gate street streets road
    roads path alley bridge tower castle cottage cabin barn church village town city
    tree trees branch branches leaf leaves grass flower flowers forest woods field fields meadow hill hills mountain
    mountains valley cliff cliffs rock rocks stone stones pebble sand dirt mud dust sky skies sun sunlight sunset
    sunrise dawn moon moonlight star stars cloud clouds rain raindrops snow snowflakes ice wind breeze storm
    thunder lightning fog mist smoke fire flame flames ember embers ash ashes water river stream creek lake pond sea
    ocean wave waves shore beach tide
    hand hands finger fingers fist palm arm arms shoulder shoulders chest neck face cheek cheeks lips mouth teeth
    tongue eye eyes eyelids brow forehead hair skin blood bone bones knee knees feet foot boots shoe shoes
    coat cloak dress shirt sleeve sleeves scarf hat glove gloves
    glass glasses cup mug bottle plate bowl knife sword blade candle candles lamp lantern mirror curtain curtains
    blanket pillow rug carpet book pages paper letter envelope key keys coin coins ring necklace jewel
    horse horses dog dogs cat bird birds wings feather feathers wolf deer fish insect bees
    car truck wheel wheels engine train ship boat sail deck bread wine coffee tea scent perfume
""".split())

# -ly words that are not manner adverbs, and common words ending in an adjective suffix that paint nothing.
_NOT_MODIFIERS = frozenset("""
    only really actually early family likely lovely daily holy ugly reply supply apply rely fly july
    italy belly jelly bully silly folly
    various previous obvious serious useful careful helpful careless useless
""".split())
_MODIFIER_SUFFIXES = ("ly", "ous", "ful", "less", "ish", "ive", "esque")

# Function words of four letters or more: English repeats them in every plain sentence ("they said that they would"),
# so counting them as repeats judged grammar, not vividness (benchmarks/mock_ties.py prints their share of a lab's
# repeats). "very" is not among them: "very very dark" is the padding the repeat term is for.
_FUNCTION_WORDS = frozenset("""
    about after again also been before being both could does doing down each even from have having here into
    just many more most much must once only other over same should some such than that their theirs them then
    there these they this those through under until upon were what when where which while will with would your
    yours himself herself itself myself themselves it's i'm i've i'll you're they're that's there's didn't don't
    doesn't can't couldn't wouldn't wasn't weren't won't isn't
""".split())
_WORD = re.compile(r"[a-z]+(?:'[a-z]+)?")


@dataclass
class DescriptivenessLabeler(_ScoreLabeler):
    """Prefers the most vividly descriptive response, by a transparent heuristic (no model):

        score = 10 * (sensory + 0.5 * (things + modifiers + numbers) - repeats) / max(n_words, 10)

    - sensory: distinct words in SENSORY_WORDS (colour, light, sound, texture, temperature, smell/taste, shape, motion);
    - things: distinct words in CONCRETE_WORDS, things a reader can picture (rooms, streets, trees, sky, hands, cups);
      without them most of a small model's plain continuations score exactly 0, so most 4-way comparisons tie at
      the top and carry no preference, where a person would still pick the one with something to see in it;
    - modifiers: other distinct words with an adjective/adverb suffix (-ly, -ous, -ful, -less, -ish, -ive, -esque),
      minus a short list of common words that only look like one ("only", "family", "useful", ...);
    - numbers: digits, a cheap sign of concrete detail;
    - repeats: occurrences of a word of 4+ letters beyond its first, since "very very dark dark" is not vivid;
      function words ("they", "with", "could": _FUNCTION_WORDS) excepted, which plain English repeats.

    So roughly "vivid words per 10 words"; the floor of 10 words keeps a two-word reply with one colour in
    it from beating a full vivid sentence.
    """

    labeler_id: str = "mock:descriptive"

    def score(self, texts, references=None):
        return [descriptiveness(t) for t in texts]


def descriptiveness(text: str) -> float:
    """The DescriptivenessLabeler heuristic for one text (see its docstring)."""
    words = _WORD.findall(text.lower())
    distinct = set(words)  # a vivid word said twice paints nothing new (and is penalised as a repeat)
    sensory = len(distinct & SENSORY_WORDS)
    modifiers = sum(
        w not in SENSORY_WORDS and w not in _NOT_MODIFIERS and len(w) > 4 and w.endswith(_MODIFIER_SUFFIXES)
        for w in distinct
    )
    numbers = len(re.findall(r"\d+", text))
    long_words = [w for w in words if len(w) >= 4 and w not in _FUNCTION_WORDS]
    repeats = len(long_words) - len(set(long_words))
    things = len((distinct & CONCRETE_WORDS) - SENSORY_WORDS)
    return 10 * (sensory + 0.5 * (things + modifiers + numbers) - repeats) / max(len(words), 10)


@dataclass
class RougeLabeler(_ScoreLabeler):
    """Prefers the summary closest to the comparison's reference: ROUGE-L F1 in [0, 1] (with stemming).
    Needs comparisons stored with add_comparison(..., reference=...)."""

    labeler_id: str = "mock:rouge"

    def __post_init__(self):
        super().__post_init__()
        from rouge_score import rouge_scorer

        self._scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)

    def score(self, texts, references=None):
        if references is None:
            raise ValueError("RougeLabeler.score needs references (one reference text per text) to compare with")
        if len(references) != len(texts):
            raise ValueError(f"got {len(texts)} texts but {len(references)} references; pass one reference per text")
        return [self._scorer.score(ref, text)["rougeL"].fmeasure for text, ref in zip(texts, references)]

    def choose(self, comparison: Comparison) -> int:
        if comparison.reference is None:
            raise ValueError(
                f"comparison {comparison.id} (task {comparison.task!r}) has no reference text, so RougeLabeler "
                "cannot score it; store comparisons with add_comparison(..., reference=reference_summary)"
            )
        return super().choose(comparison)
