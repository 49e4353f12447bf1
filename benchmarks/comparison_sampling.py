"""What sampling a k-way comparison costs: k responses to one prompt share one prefill (labkit.sampling.prefill).

`make_comparisons` samples its responses in chunks of 64 rows, k = 4 rows per prompt. The prefill runs the whole
query (the sentiment task: 64 tokens) through the model once per chunk, and each of the R response tokens runs one
position, so the prefill is most of a chunk's work. Rows holding the same query run once and are copied.

Side by side in one process, alternating (ABAB...) so that machine noise falls on both:
- shared: 16 prompts x 4 responses, as make_comparisons asks (16 distinct queries in a chunk of 64);
- distinct: 64 different prompts x 1 response, the same shapes (64 rows, the same padded width, R tokens): every
  row runs its own prefill, which is what each chunk cost before rows shared one.
It prints seconds per chunk of 64 responses for each, their ratio, and the prefill's own seconds per chunk.

    python benchmarks/comparison_sampling.py            # the embedded model, the sentiment task; one JSON line
    python benchmarks/comparison_sampling.py --smoke    # the tiny random model (the test suite runs this)
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from labkit.data import load_prompts
from labkit.models import load_lm
from labkit.sampling import left_pad_mask, lm_forward, pad_left, positions, prefill, sample
from labkit.tasks import format_query, get_task
from record import emit  # this script's folder is on sys.path

K = 4
CHUNK = 64  # labkit.labeling.comparisons.DEFAULT_SAMPLE_BATCH


def _timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--smoke", action="store_true", help="the tiny random model, one repeat")
    parser.add_argument("--repeats", type=int, default=3, help="timed chunks of each kind (after one warm-up each)")
    args = parser.parse_args(argv)
    repeats = 1 if args.smoke else args.repeats
    model_name = "tiny" if args.smoke else "smollm2-135m"
    model, tokenizer = load_lm(model_name)
    task = get_task("sentiment")
    texts = [p.text for p in load_prompts(task, "train")][:CHUNK]
    # longest first, so that both requests below pad to one width: the only difference is whether rows repeat
    queries = sorted((format_query(task, t, tokenizer) for t in texts), key=len, reverse=True)
    shared = [q for q in queries[: CHUNK // K] for _ in range(K)]  # (64 rows, 16 distinct), prompt-major as stored
    q_shared, len_shared = pad_left(shared, tokenizer.pad_token_id)
    q_distinct, _ = pad_left(queries, tokenizer.pad_token_id)
    assert q_shared.shape == q_distinct.shape
    generator = torch.Generator(device=model.device).manual_seed(0)

    def run_sample(rows):
        with torch.no_grad():
            sample(model, tokenizer, rows, task, generator=generator)

    def run_prefill(ids, lengths):
        with torch.no_grad():
            prefill(model, ids, lengths)

    def run_prefill_every_row(ids, lengths):  # the prefill as it ran before rows shared one
        mask = left_pad_mask(lengths, ids.shape[1])
        with torch.no_grad():
            lm_forward(model, ids, mask, positions(mask), keep=1, use_cache=True, only=mask.new_tensor([ids.shape[1] - 1]))

    times = {"shared": [], "distinct": [], "prefill_shared": [], "prefill_every_row": []}
    for i in range(repeats + 1):  # the first round warms up (compiled kernels, allocator) and is not kept
        got = {"shared": _timed(lambda: run_sample(shared)), "distinct": _timed(lambda: run_sample(queries)),
               "prefill_shared": _timed(lambda: run_prefill(q_shared, len_shared)),
               "prefill_every_row": _timed(lambda: run_prefill_every_row(q_shared, len_shared))}
        if i:
            for name, seconds in got.items():
                times[name].append(seconds)
    med = {name: statistics.median(v) for name, v in times.items()}
    line = {"benchmark": "comparison_sampling", "model": model_name, "task": task.name, "smoke": args.smoke,
            "rows": CHUNK, "k": K, "query_width": int(q_distinct.shape[1]), "response_length": task.response_length,
            "repeats": repeats, "threads": torch.get_num_threads(),
            "s_per_chunk_shared": round(med["shared"], 3), "s_per_chunk_distinct": round(med["distinct"], 3),
            "speedup": round(med["distinct"] / med["shared"], 2),
            "prefill_s_shared": round(med["prefill_shared"], 3), "prefill_s_every_row": round(med["prefill_every_row"], 3)}
    print(f"{CHUNK} responses, k={K}: {med['shared']:.2f} s with shared prefills, {med['distinct']:.2f} s with one "
          f"per row ({line['speedup']}x); the prefill alone {med['prefill_shared']:.2f} s vs {med['prefill_every_row']:.2f} s")
    emit(line)
    return line


if __name__ == "__main__":
    main()
