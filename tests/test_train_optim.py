"""Every optimizer the config offers takes real steps, and its state survives a checkpoint round trip."""

import importlib.util

import pytest
import torch

from qwen_image_lora.config import OptimConfig
from qwen_image_lora.train.optim import build_optimizer

PACKAGES = {"adamw": None, "adamw8bit": "bitsandbytes", "prodigy": "prodigyopt"}


def _run(opt, w, target, steps):
    losses = []
    for _ in range(steps):
        loss = ((w - target) ** 2).mean()
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    return losses


@pytest.mark.parametrize("name", list(PACKAGES))
def test_optimizer_learns_and_resumes_identically(name):
    if PACKAGES[name] and importlib.util.find_spec(PACKAGES[name]) is None:
        pytest.skip(f"{PACKAGES[name]} not installed (pip install -e '.[optim]')")
    cfg = OptimConfig(name=name, lr=1.0 if name == "prodigy" else 1e-2, weight_decay=0.0)
    target = torch.randn(4096, generator=torch.Generator().manual_seed(0))

    w = torch.nn.Parameter(torch.zeros(4096))
    opt = build_optimizer([w], cfg)
    straight = _run(opt, w, target, 30)
    assert straight[-1] < 0.7 * straight[0]

    w2 = torch.nn.Parameter(torch.zeros(4096))
    opt2 = build_optimizer([w2], cfg)
    first = _run(opt2, w2, target, 15)
    state = {"w": w2.detach().clone(), "opt": opt2.state_dict()}
    w3 = torch.nn.Parameter(state["w"])
    opt3 = build_optimizer([w3], cfg)
    opt3.load_state_dict(state["opt"])
    assert first + _run(opt3, w3, target, 15) == pytest.approx(straight, rel=1e-6)
