import math

import torch

from labkit.data import Prompt
from labkit.models import load_lm
from labkit.sft import SFTConfig, supervised_finetune, target_ids
from labkit.tasks import TLDR


def test_target_ends_with_the_truncation_text(tokenizer):
    ids = target_ids(TLDR, "I moved.\nIt went well.", tokenizer, 75)
    assert tokenizer.decode(ids) == " I moved. It went well.\n"


def test_sft_lowers_the_loss_on_references():
    model, tok = load_lm("tiny", device="cpu")
    prompts = [Prompt(f"My post number {i} is about my cat and my landlord.", f"cat and landlord {i}") for i in range(4)]
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    hist = supervised_finetune(model, tok, TLDR.with_(query_length=32), prompts,
                               SFTConfig(lr=3e-3, batch_size=2, epochs=5), progress=False)
    assert all(math.isfinite(h["sft/loss"]) for h in hist)
    assert hist[-1]["sft/loss"] < hist[0]["sft/loss"] - 1.0
    assert any(not torch.equal(p, before[n]) for n, p in model.named_parameters())
