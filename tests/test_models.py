import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from labkit.models import ModelLoadError, load_lm, pick_device, pick_dtype


def test_tiny_model_and_tokenizer(tiny):
    model, tok = tiny
    assert tok.pad_token_id is not None and tok.pad_token_id != tok.eos_token_id
    assert tok.padding_side == "left"
    assert model.config.pad_token_id == tok.pad_token_id
    assert not model.training  # dropout off
    assert sum(p.numel() for p in model.parameters()) < 5_000_000
    out = model(input_ids=torch.tensor([[1, 2, 3]])).logits
    assert out.shape == (1, 3, len(tok)) and torch.isfinite(out).all()


def test_tiny_is_seeded(tiny):
    a, _ = load_lm("tiny", device="cpu", seed=0)
    b, _ = load_lm("tiny", device="cpu", seed=1)
    pa = dict(a.named_parameters())
    assert all(torch.equal(p, pa[n]) for n, p in tiny[0].named_parameters())
    assert not all(torch.equal(p, pa[n]) for n, p in b.named_parameters())


def test_device_and_dtype_choice():
    cpu = pick_device("cpu")
    assert cpu.type == "cpu" and pick_dtype(cpu) == torch.float32
    assert pick_dtype(cpu, "bfloat16") == torch.bfloat16
    # fp32 master weights on a GPU too: bf16 compute comes from autocast, not from the weights
    assert pick_dtype(torch.device("cuda")) == torch.float32
    assert pick_device().type == ("cuda" if torch.cuda.is_available() else "cpu")


def test_unknown_model_offline_gives_clear_error(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    with pytest.raises(ModelLoadError) as err:
        load_lm("labkit-test/does-not-exist-anywhere")
    msg = str(err.value)
    assert "smollm2-135m" in msg and "folder" in msg


def test_embedded_model_loads_and_continues_text():
    model, tok = load_lm("smollm2-135m", device="cpu")
    ids = tok("The cat sat on the", return_tensors="pt").input_ids
    nxt = model(input_ids=ids).logits[0, -1].argmax().item()
    assert tok.decode([nxt]).strip().isalpha()  # a real word, not noise: the weights converted correctly


@pytest.mark.slow
def test_interrupted_conversion_never_leaves_a_broken_cache(tmp_path):
    """Kill a conversion mid-way: no cache folder appears; the next prepare converts and loads."""
    env = dict(os.environ, LABKIT_CACHE=str(tmp_path))
    proc = subprocess.Popen([sys.executable, "-m", "labkit.models", "--prepare"], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    target = tmp_path / "models" / "smollm2-135m"
    deadline = time.time() + 120
    # wait until the conversion has started writing its temporary folder, then kill it hard
    while time.time() < deadline and not any((tmp_path / "models").glob(".smollm2-135m-*/*")):
        time.sleep(0.2)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not target.exists()
    subprocess.run([sys.executable, "-m", "labkit.models", "--prepare"], env=env, check=True,
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    assert (target / "labkit-complete.json").exists()
    assert not list((tmp_path / "models").glob(".smollm2-135m-*"))  # the killed run's leftovers are gone
