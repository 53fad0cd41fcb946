"""`model.quantize`: a quantized frozen base through diffusers' backends, fp32 LoRA on top, and an adapter that is a
plain LoRA of the unquantized model. On CPU: int8 and fp8 (torchao weight-only) train; nf4 (bitsandbytes 4-bit)
is refused before any weights load."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from accelerate.state import AcceleratorState, GradientState
from peft.tuners.lora import Linear as LoraLinear
from safetensors import safe_open
from torchao.quantization import quantize_
from torchao.utils import TorchAOBaseTensor

from qwen_image_lora import model as qmodel
from qwen_image_lora import quantization
from qwen_image_lora.config import ConfigError, LoRAConfig, load_config
from qwen_image_lora.errors import InputError
from qwen_image_lora.train import block_checkpointing, memory, memory_trace
from qwen_image_lora.train.adapter import WEIGHTS_NAME, add_lora
from qwen_image_lora.train.lora import LoRARecipe
from qwen_image_lora.train.preflight import check_before_loading

ROOT = Path(__file__).resolve().parents[1]
ON_CPU = ["int8", "fp8"]
# Per step, relative to the unquantized run's loss over the same batches and noise (measured on the tiny model:
# int8 3e-5, fp8 1e-4 over 8 steps at the demo's lr).
LOSS_TOLERANCE = 1e-3
STEPS = 6
# Wide enough for the weights to matter (1024), 4 blocks, so torchao's kept copy of one block is not the whole story.
WIDE = dict(
    in_channels=16,
    out_channels=16,
    num_layers=4,
    attention_head_dim=64,
    num_attention_heads=16,
    context_in_dim=64,
    mlp_ratio=3,
    axes_dims_rope=(16, 24, 24),
)


def _train(tiny_model_dir, sample_data_dir, out: Path, quantize: str) -> Path:
    cfg = load_config(ROOT / "configs" / "demo.yaml", [
        f"model.pretrained={tiny_model_dir}", f"data.path={sample_data_dir / 'brand'}", f"output_dir={out}",
        f"train.max_steps={STEPS}", f"model.quantize={quantize}", "checkpoint.every_steps=1000",
        "validation.every_steps=0", "validation.prompts=[]", "validation.edits=[]", "validation.held_out_fraction=0",
    ])  # fmt: skip
    recipe = LoRARecipe(cfg)
    try:
        recipe.setup()
        recipe.train()
    finally:
        recipe.cleanup()
        AcceleratorState._reset_state(True)  # accelerate keeps process-wide singletons
        GradientState._reset_state()
    return out


@pytest.fixture(scope="module")
def runs(tiny_model_dir, sample_data_dir, tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("quantized-runs")
    return {q: _train(tiny_model_dir, sample_data_dir, root / q, q) for q in ["none", *ON_CPU]}


def _losses(out: Path) -> list[float]:
    return [json.loads(line)["loss"] for line in (out / "losses.jsonl").read_text().splitlines()]


def _tensors(out: Path) -> tuple[dict[str, tuple], dict]:
    with safe_open(out / WEIGHTS_NAME, "pt") as f:
        return {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}, f.metadata()


@pytest.mark.parametrize("quantize", ON_CPU)
def test_only_the_block_linears_are_quantized(tiny_model_dir, quantize):

    transformer = qmodel.load_transformer(str(tiny_model_dir), torch.bfloat16, quantize)
    linears = {n: m for n, m in transformer.named_modules() if isinstance(m, torch.nn.Linear)}
    quantized = {n for n, m in linears.items() if isinstance(m.weight, TorchAOBaseTensor)}
    assert quantized == {n for n in linears if n.startswith("transformer_blocks.")}, sorted(set(linears) - quantized)


@pytest.mark.parametrize("quantize", ON_CPU)
def test_quantized_base_trains_within_tolerance_of_the_unquantized_run(runs, quantize):
    base, quantized = _losses(runs["none"]), _losses(runs[quantize])
    assert len(quantized) == len(base) == STEPS
    for step, (a, b) in enumerate(zip(quantized, base, strict=True), 1):
        assert abs(a - b) <= LOSS_TOLERANCE * b, (step, a, b)
    assert quantized != base  # the base really was quantized
    card = (runs[quantize] / "README.md").read_text()  # the model card said nothing of it
    assert (
        f"| frozen base | {quantize} |" in card
        and "| frozen base | float32 |" in (runs["none"] / "README.md").read_text()
    )


@pytest.mark.parametrize("quantize", ON_CPU)
def test_adapter_of_a_quantized_run_loads_unchanged_into_the_unquantized_pipeline(runs, quantize, tiny_model_dir):

    shapes, header = _tensors(runs[quantize])
    assert (shapes, json.loads(header["lora_adapter_metadata"])) == (
        _tensors(runs["none"])[0],
        json.loads(_tensors(runs["none"])[1]["lora_adapter_metadata"]),
    )
    assert all(k.startswith("transformer.") for k in shapes)

    pipe = qmodel.load_pipeline(tiny_model_dir, dtype="float32")
    transformer = pipe.transformer
    torch.manual_seed(0)
    noisy, prompt = (
        torch.randn(1, 16, 1, 8, 8),
        qmodel.PromptEmbeds(torch.randn(1, 8, 32), None, torch.zeros(1, 8, dtype=torch.bool)),
    )
    with torch.no_grad():
        before = qmodel.predict_velocity(transformer, noisy, prompt, torch.tensor([0.5]))
        pipe.load_lora_weights(str(runs[quantize]))
        after = qmodel.predict_velocity(transformer, noisy, prompt, torch.tensor([0.5]))
    layers = [m for m in transformer.modules() if isinstance(m, LoraLinear)]
    assert layers and all(type(m.base_layer) is torch.nn.Linear for m in layers)  # plain LoRA over plain weights
    assert torch.isfinite(after).all() and not torch.allclose(before, after)


@pytest.mark.skipif(torch.cuda.is_available(), reason="nf4 runs where CUDA is")
def test_nf4_is_refused_before_any_weights_load(tiny_model_dir, sample_data_dir, tmp_path):
    cfg = load_config(ROOT / "configs" / "demo.yaml", [
        f"model.pretrained={tiny_model_dir}", f"data.path={sample_data_dir / 'brand'}", f"output_dir={tmp_path}",
        "model.quantize=nf4", "validation.edits=[]"])  # fmt: skip
    with pytest.raises(InputError, match="model.quantize: nf4 .*CUDA") as e:
        check_before_loading(cfg)
    assert e.value.field == "model.quantize" and e.value.exit_code == 2


def test_a_quantized_base_under_ddp_or_with_a_factoring_init_is_refused_before_loading(tiny_model_dir, sample_data_dir,
                                                                                      tmp_path, monkeypatch):  # fmt: skip
    """Both were tracebacks after the weights loaded: DDP's start-up broadcast of a torchao tensor, and peft's SVD of
    one for PiSSA."""
    base = [f"model.pretrained={tiny_model_dir}", f"data.path={sample_data_dir / 'brand'}", f"output_dir={tmp_path}",
            "model.quantize=int8", "validation.edits=[]"]  # fmt: skip
    monkeypatch.setenv("WORLD_SIZE", "2")  # as `accelerate launch --num_processes 2` sets it for each process
    with pytest.raises(InputError, match="^model.quantize: int8 does not train under DDP") as e:
        check_before_loading(load_config(ROOT / "configs" / "demo.yaml", base))
    assert e.value.field == "model.quantize"
    monkeypatch.setenv("WORLD_SIZE", "1")
    check_before_loading(load_config(ROOT / "configs" / "demo.yaml", base))  # one process: it trains
    # at load, by every command (`validate` said OK to it, and training refused it)
    with pytest.raises(ConfigError, match=r"lora.init: pissa_niter_4 factors the base weights, which a int8 base"):
        load_config(ROOT / "configs" / "demo.yaml", [*base, "lora.init=pissa_niter_4"])


@pytest.mark.parametrize("quantize, checkpoint", [("int8", "all"), ("int8", "none"), ("fp8", "all")])
@pytest.mark.filterwarnings("ignore:TorchaoLoraLinear was instantiated without")  # torchao's quantize_, not diffusers'
def test_planned_quantized_step_is_within_10_percent_of_a_real_torchao_step(quantize, checkpoint):
    """The planner traces stand-ins (`quantization.PlannedQuantizedLinear`); the ground truth is the same step on a
    real torchao-quantized model on CPU, counted by the same `StorageTracker`: the stored weights exactly, and the
    dequantized copies torchao keeps for backward (measured: int8 within 0.2%, fp8 within 5%)."""

    inputs = memory.PlanInputs(WIDE, memory.StepShape(64, 64, 1, 16), LoRAConfig(rank=4), checkpoint=checkpoint,
                               quantize=quantize, profile="cpu")  # fmt: skip
    planned = memory.plan_memory(inputs)
    torch.manual_seed(0)
    transformer = qmodel.transformer_class()(**WIDE).to(torch.bfloat16)
    config = quantization.quantization_config(quantize, torch.bfloat16).quant_type  # what diffusers applies
    quantize_(transformer.transformer_blocks, config, filter_fn=lambda m, _: type(m) is torch.nn.Linear)
    params = add_lora(transformer, inputs.lora)
    transformer.train()
    block_checkpointing.apply_block_checkpointing(transformer, planned.checkpointed)
    batch = memory_trace.build_step_inputs(inputs.shape, WIDE, torch.bfloat16)
    optimizer = torch.optim.AdamW(params, fused=True)
    for p in params:  # the optimizer state exists, as in every step after the first
        p.grad = torch.zeros_like(p)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    tracker = memory_trace.StorageTracker(None)
    state = [t for s in optimizer.state.values() for t in s.values() if isinstance(t, torch.Tensor)]
    tracker.track(*(x for t in [*transformer.parameters(), *transformer.buffers(), *state] for x in _stored(t)),
                  batch.latents, batch.prompt.embeds)  # fmt: skip
    resident = tracker.live
    tracker.reset_peak()
    with tracker:
        memory_trace.training_step(transformer, batch, optimizer, params, torch.autocast("cpu", dtype=torch.bfloat16),
                                   1.0, torch.bfloat16)  # fmt: skip
    planned_resident = planned.frozen_weights + planned.lora_params + planned.optimizer_state + planned.step_inputs
    assert abs(resident - planned_resident) < 1024  # AdamW's step counters and the masks, a few bytes
    assert abs(planned.peak / tracker.peak - 1) < 0.10, (planned.peak, tracker.peak)


def _stored(t: torch.Tensor) -> list[torch.Tensor]:
    names = getattr(t, "tensor_data_names", None)  # a torchao weight holds its bytes in inner tensors
    return [getattr(t, n) for n in names] if names else [t]


def test_planner_counts_each_formats_bytes_per_weight():
    """The planned frozen weights are the unquantized ones with each block linear at its format's bytes per weight
    (plus torchao's fp32 scale per row); with every block checkpointed and weights that dominate (width 1024, few
    tokens), a smaller base lowers the peak."""
    config, shape = WIDE, memory.StepShape(64, 64, 1, 16)
    plans = {q: memory.plan_memory(memory.PlanInputs(config, shape, LoRAConfig(rank=4), checkpoint="all", quantize=q))
             for q in ("none", *quantization.QUANT_FORMATS)}  # fmt: skip
    transformer = qmodel.transformer_class()(**config)
    linears = [m for b in transformer.transformer_blocks for m in b.modules() if type(m) is torch.nn.Linear]
    numel, rows = sum(m.weight.numel() for m in linears), sum(m.out_features for m in linears)
    for q, fmt in quantization.QUANT_FORMATS.items():
        stored = numel * fmt.bytes_per_weight + rows * fmt.scale_bytes_per_row
        expected = plans["none"].frozen_weights - numel * 2 + stored  # bf16 base: 2 bytes a weight
        assert abs(plans[q].frozen_weights - expected) <= 512 * 2 * len(linears), (q, plans[q].frozen_weights, expected)
    assert plans["nf4"].peak < plans["int8"].peak < plans["fp8"].peak < plans["none"].peak  # fp8 dequantizes via fp32
    assert plans["nf4"].frozen_weights < plans["int8"].frozen_weights == plans["fp8"].frozen_weights
