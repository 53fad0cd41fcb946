"""Every optimizer the config offers takes real steps, and its state survives a checkpoint round trip; the EMA of
the LoRA weights follows hand-computed numbers."""

import importlib.util

import pytest
import torch

from qwen_image_lora.config import ConfigError, OptimConfig
from qwen_image_lora.train.optim import LoRAEMA, build_lr_scheduler, build_optimizer

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


@pytest.mark.parametrize("name", list(PACKAGES))
def test_every_optim_setting_reaches_the_optimizer(name):
    if PACKAGES[name] and importlib.util.find_spec(PACKAGES[name]) is None:
        pytest.skip(f"{PACKAGES[name]} not installed (pip install -e '.[optim]')")
    cfg = OptimConfig(name=name, lr=0.3, betas=[0.8, 0.95], weight_decay=0.07, eps=1e-5)
    defaults = build_optimizer([torch.nn.Parameter(torch.zeros(8))], cfg).defaults
    assert (defaults["lr"], tuple(defaults["betas"]), defaults["weight_decay"], defaults["eps"]) == (
        0.3,
        (0.8, 0.95),
        0.07,
        1e-5,
    )


def test_an_unknown_optimizer_is_refused_naming_the_field():
    with pytest.raises(ConfigError, match=r"optim.name: unknown 'sgd'"):
        build_optimizer([torch.nn.Parameter(torch.zeros(8))], OptimConfig(name="sgd"))


def test_the_fused_kernel_is_chosen_only_for_float_parameters_on_cpu_or_cuda():
    assert build_optimizer([torch.nn.Parameter(torch.zeros(8))], OptimConfig()).defaults["fused"] is True
    on_meta = torch.nn.Parameter(torch.zeros(8, device="meta"))
    assert build_optimizer([on_meta], OptimConfig()).defaults["fused"] is None  # torch's own default there


@pytest.mark.parametrize("scheduler, at_step_8", [("constant_with_warmup", 0.01), ("linear", 0.005), ("cosine", 0.005)])
def test_the_learning_rate_ramps_over_warmup_steps_then_follows_the_schedule(scheduler, at_step_8):
    cfg = OptimConfig(lr=0.01, scheduler=scheduler, warmup_steps=4)
    opt = build_optimizer([torch.nn.Parameter(torch.zeros(2))], cfg)
    schedule = build_lr_scheduler(opt, cfg, max_steps=12)
    lrs = []
    for _ in range(12):
        lrs.append(schedule.get_last_lr()[0])  # the rate optimizer step k runs with
        opt.step()
        schedule.step()
    assert lrs[:5] == pytest.approx([0.0, 0.0025, 0.005, 0.0075, 0.01])  # linear from 0 over 4 steps
    assert lrs[8] == pytest.approx(at_step_8)  # half way through the 8 steps after warm-up
    if scheduler != "constant_with_warmup":
        assert schedule.get_last_lr()[0] == pytest.approx(0.0)  # down to 0 after max_steps steps


def test_ema_follows_decay_09_by_hand():
    w = torch.nn.Parameter(torch.tensor([1.0, -2.0]))
    ema = LoRAEMA([w], decay=0.9)
    with torch.no_grad():
        w.copy_(torch.tensor([0.0, 3.0]))
    ema.update()  # 0.9 * [1, -2] + 0.1 * [0, 3]
    torch.testing.assert_close(ema.shadow[0], torch.tensor([0.9, -1.5]))
    with torch.no_grad():
        w.copy_(torch.tensor([2.0, 3.0]))
    ema.update()  # 0.9 * [0.9, -1.5] + 0.1 * [2, 3]
    torch.testing.assert_close(ema.shadow[0], torch.tensor([1.01, -1.05]))
    with ema.swapped_in():
        torch.testing.assert_close(w.detach(), torch.tensor([1.01, -1.05]))
    torch.testing.assert_close(w.detach(), torch.tensor([2.0, 3.0]))  # the live weights come back

    state = ema.state_dict()
    assert state["decay"] == 0.9
    restored = LoRAEMA([torch.nn.Parameter(torch.zeros(2))], decay=0.9)
    restored.load_state_dict(state)
    torch.testing.assert_close(restored.shadow[0], torch.tensor([1.01, -1.05]))
    # A half-precision checkpoint comes back in fp32, where the small (1 - decay) updates still register.
    restored.load_state_dict({"decay": 0.9, "shadow": [torch.tensor([1.01, -1.05]).half()]})
    assert restored.shadow[0].dtype == torch.float32
    with pytest.raises(ValueError, match="EMA state has 1 tensors, the adapter 2"):
        LoRAEMA([w, w], decay=0.9).load_state_dict(ema.state_dict())


def test_adamw_runs_the_fused_kernel_with_foreach_numbers():
    cfg = OptimConfig(name="adamw", lr=1e-2)
    target = torch.randn(4096, generator=torch.Generator().manual_seed(0))
    w = torch.nn.Parameter(torch.zeros(4096))
    opt = build_optimizer([w], cfg)
    assert opt.param_groups[0]["fused"] is True
    w_ref = torch.nn.Parameter(torch.zeros(4096))
    reference = torch.optim.AdamW([w_ref], lr=cfg.lr, betas=tuple(cfg.betas), weight_decay=cfg.weight_decay,
                                  eps=cfg.eps, foreach=True)  # fmt: skip
    assert _run(opt, w, target, 20) == pytest.approx(_run(reference, w_ref, target, 20), rel=1e-5)
    torch.testing.assert_close(w.detach(), w_ref.detach(), rtol=1e-5, atol=1e-6)


def test_prodigy_says_nothing_of_its_own_defaults(capsys):
    """prodigyopt printed "Using decoupled weight decay" (its default) on every run with a weight decay."""
    if importlib.util.find_spec("prodigyopt") is None:
        pytest.skip("prodigyopt not installed (pip install -e '.[optim]')")
    build_optimizer([torch.nn.Parameter(torch.zeros(4))], OptimConfig(name="prodigy", lr=1.0, weight_decay=0.01))
    assert capsys.readouterr().out == ""
    import prodigyopt  # noqa: PLC0415 - the optim extra, checked above

    class Chatty(prodigyopt.Prodigy):  # anything else it might print is no default of its own: it still shows
        def __init__(self, *args, **kwargs):
            print("prodigy: a real problem")
            super().__init__(*args, **kwargs)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(prodigyopt, "Prodigy", Chatty)
        build_optimizer([torch.nn.Parameter(torch.zeros(4))], OptimConfig(name="prodigy", lr=1.0, weight_decay=0.01))
    assert capsys.readouterr().out == "prodigy: a real problem\n"
