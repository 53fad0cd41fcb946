"""The trainer's LoRA layer (`train.adapter.LeanLoraLinear`): peft's maths to the bit, less the multiply by a
scale of exactly 1 and the new tensor peft adds the adapter's output into, forward and backward."""

from __future__ import annotations

import pytest
import torch
from diffusers import QwenImage21Transformer2DModel
from peft import LoraConfig, inject_adapter_in_model
from peft.tuners.lora.layer import Linear as PeftLoraLinear
from torch.utils._python_dispatch import TorchDispatchMode

from qwen_image_lora import objective
from qwen_image_lora.config import LoRAConfig
from qwen_image_lora.train import memory, memory_trace
from qwen_image_lora.train.adapter import LeanLoraLinear, add_lora

SMALL = dict(in_channels=16, out_channels=16, num_layers=2, attention_head_dim=16, num_attention_heads=2,
             context_in_dim=32, mlp_ratio=2, axes_dims_rope=(4, 6, 6))  # fmt: skip


class CountOps(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.muls = self.new_sums = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.muls += func.overloadpacket is torch.ops.aten.mul
        self.new_sums += func.overloadpacket is torch.ops.aten.add
        return func(*args, **(kwargs or {}))


def _model(cfg: LoRAConfig, peft_forward: bool, dtype=torch.float32):
    """The small transformer (in `dtype`; its LoRA is fp32) with `cfg`'s adapter, its lora_B random (a fresh B is zero and hides the adapter's
    path); with `peft_forward` every adapted layer is put back to peft's own class."""
    torch.manual_seed(0)
    transformer = QwenImage21Transformer2DModel(**SMALL).to(dtype)
    params = add_lora(transformer, cfg)
    with torch.no_grad():
        for name, p in transformer.named_parameters():
            if "lora_B" in name:
                p.normal_(std=0.1)
    layers = [m for m in transformer.modules() if isinstance(m, PeftLoraLinear)]
    if peft_forward:
        for m in layers:
            m.__class__ = PeftLoraLinear
    transformer.train()
    return transformer, params, layers


def _loss_and_grads(cfg: LoRAConfig, peft_forward: bool, dtype=torch.float32, autocast=False):
    transformer, params, layers = _model(cfg, peft_forward, dtype)
    batch = memory_trace.build_step_inputs(memory.StepShape(64, 64, 1, 8), SMALL, dtype)
    torch.manual_seed(1)  # the dropout masks draw from it
    noise = torch.randn(batch.latents.shape)
    with CountOps() as counter, torch.autocast("cpu", dtype, enabled=autocast):
        loss = objective.flow_matching_loss(transformer, batch, noise, torch.full((1,), 0.5), dtype=dtype)
        loss.backward()
    return loss.detach(), [p.grad for p in params], counter, layers


@pytest.mark.parametrize(
    "cfg",
    [
        LoRAConfig(rank=4, alpha=4),
        LoRAConfig(rank=4, alpha=4, dropout=0.25),
        LoRAConfig(rank=4, alpha=8),
        LoRAConfig(rank=4, alpha=4, use_rslora=True),
        LoRAConfig(rank=4, alpha=4, use_dora=True),
    ],
    ids=["alpha=rank", "dropout", "alpha=2rank", "rslora", "dora"],
)
def test_the_loss_and_every_gradient_equal_peft_to_the_bit(cfg):
    ours_loss, ours_grads, _, layers = _loss_and_grads(cfg, peft_forward=False)
    peft_loss, peft_grads, _, _ = _loss_and_grads(cfg, peft_forward=True)
    assert layers and all(type(m) is LeanLoraLinear for m in layers)
    assert torch.equal(ours_loss, peft_loss)
    assert all(torch.equal(a, b) for a, b in zip(ours_grads, peft_grads, strict=True))


@pytest.mark.parametrize("autocast", [True, False], ids=["bf16-autocast", "bf16-base-fp32-lora"])
def test_with_a_bf16_base_the_loss_and_every_gradient_equal_peft_to_the_bit(autocast):
    ours_loss, ours_grads, _, _ = _loss_and_grads(LoRAConfig(rank=4, alpha=4), False, torch.bfloat16, autocast)
    peft_loss, peft_grads, _, _ = _loss_and_grads(LoRAConfig(rank=4, alpha=4), True, torch.bfloat16, autocast)
    assert torch.equal(ours_loss, peft_loss)
    assert all(torch.equal(a, b) for a, b in zip(ours_grads, peft_grads, strict=True))


def test_a_unit_scale_skips_one_multiply_per_layer_forward_and_backward_and_sums_in_place():
    _, _, ours, layers = _loss_and_grads(LoRAConfig(rank=4, alpha=4), peft_forward=False)
    _, _, theirs, _ = _loss_and_grads(LoRAConfig(rank=4, alpha=4), peft_forward=True)
    assert theirs.muls - ours.muls == 2 * len(layers)
    assert theirs.new_sums - ours.new_sums == len(layers)


def test_any_other_scale_runs_peft_own_forward():
    _, _, ours, _ = _loss_and_grads(LoRAConfig(rank=4, alpha=8), peft_forward=False)
    _, _, theirs, _ = _loss_and_grads(LoRAConfig(rank=4, alpha=8), peft_forward=True)
    assert (ours.muls, ours.new_sums) == (theirs.muls, theirs.new_sums)


def test_two_adapters_over_a_bf16_layer_sum_in_fp32_as_peft_does():
    """peft adds fp32 adapters onto a bf16 base output in fp32 and rounds once at the end; adding in place would
    round after each adapter."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(64, 64)).to(torch.bfloat16)
    for name in ("a", "b"):
        model = inject_adapter_in_model(LoraConfig(r=4, lora_alpha=4, target_modules=["0"]), model, name)
    layer = model[0]
    layer.set_adapter(["a", "b"])
    with torch.no_grad():
        for name, p in layer.named_parameters():
            if "lora_" in name:
                p.data = torch.randn_like(p, dtype=torch.float32)
    x = torch.randn(16, 64, dtype=torch.bfloat16)
    theirs = layer(x)
    layer.__class__ = LeanLoraLinear
    assert torch.equal(layer(x), theirs)


def test_a_disabled_adapter_is_the_base_layer_alone():
    transformer, _, layers = _model(LoRAConfig(rank=4, alpha=4), peft_forward=False)
    x = torch.randn(3, layers[0].in_features)
    layers[0].enable_adapters(False)
    assert torch.equal(layers[0](x), layers[0].base_layer(x))
    layers[0].enable_adapters(True)
    assert not torch.equal(layers[0](x), layers[0].base_layer(x))


def test_per_sample_adapter_names_and_an_adapter_missing_here_run_as_peft_does():
    """`adapter_names=` (peft's mixed batch: each sample its own adapter or "__base__") and an active adapter this
    layer lacks both go to peft's forward, which passes over the missing one."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.Linear(64, 64))
    model = inject_adapter_in_model(LoraConfig(r=4, lora_alpha=4, target_modules=["0", "1"]), model, "a")
    model = inject_adapter_in_model(LoraConfig(r=4, lora_alpha=4, target_modules=["1"]), model, "b")
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_()
    first, second = model
    first.set_adapter(["b", "a"])  # "b" is active but this layer has no "b"
    x = torch.randn(2, 64)
    theirs = (first(x), second(x, adapter_names=["a", "__base__"]))
    first.__class__ = second.__class__ = LeanLoraLinear
    ours = (first(x), second(x, adapter_names=["a", "__base__"]))
    assert not torch.equal(theirs[0], first.base_layer(x))  # "a" counted on the first layer
    assert torch.equal(ours[0], theirs[0]) and torch.equal(ours[1], theirs[1])
