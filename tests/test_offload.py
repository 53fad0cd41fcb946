"""Block offload (`train.offload_blocks`, train/offload.py). On CPU both devices are the CPU, so these check the
mechanics: diffusers' group-offloading hooks sit on exactly the offloaded blocks, each block is onloaded before
it runs in forward and again for its recompute in backward, in the order the schedule says, the LoRA weights never
leave, and the losses equal the run without offload. The GPU test (run where CUDA is) checks real devices."""

from __future__ import annotations

import json
import logging
import math
import re
from pathlib import Path

import pytest
import torch
from accelerate.state import AcceleratorState, GradientState
from diffusers import QwenImage21Transformer2DModel
from diffusers.hooks.group_offloading import _GROUP_OFFLOADING, _get_group_onload_device

from qwen_image_lora import objective
from qwen_image_lora.cli import main as cli_main
from qwen_image_lora.config import ConfigError, LoRAConfig, load_config
from qwen_image_lora.train import block_checkpointing, memory, memory_fit, memory_trace, offload, preflight
from qwen_image_lora.train.adapter import add_lora
from qwen_image_lora.train.lora import LoRARecipe

SMALL = dict(in_channels=16, out_channels=16, num_layers=4, attention_head_dim=32, num_attention_heads=4,
             context_in_dim=64, mlp_ratio=3, axes_dims_rope=(8, 12, 12))  # fmt: skip
STEPS = 3
ROOT = Path(__file__).resolve().parents[1]


def _model(checkpoint: str, offloaded=(), device="cpu"):
    torch.manual_seed(0)
    transformer = QwenImage21Transformer2DModel(**SMALL)
    params = add_lora(transformer, LoRAConfig(rank=4, init="gaussian"))
    if checkpoint == "diffusers":  # train.gradient_checkpointing: true
        transformer.enable_gradient_checkpointing()
    else:  # auto's per-block checkpointing, which recomputes through the block class's forward
        block_checkpointing.apply_block_checkpointing(transformer, range(SMALL["num_layers"]))
    offloader = offload.place_transformer(transformer, torch.device(device), offloaded)
    return transformer, params, offloader


def _train(transformer, params, offloader=None, device="cpu", watch=None):
    optimizer = torch.optim.AdamW(params, lr=1e-2)
    batch = memory_trace.build_step_inputs(memory.StepShape(128, 128, 1, 16), SMALL, torch.float32)
    latents, prompt = batch.latents.to(device), batch.prompt.to(device)
    batch.latents, batch.prompt = latents, prompt
    losses, onloads = [], []
    for step in range(STEPS):
        torch.manual_seed(step)
        noise = torch.randn(latents.shape).to(device)
        loss = objective.flow_matching_loss(transformer, batch, noise, torch.full((1,), 0.5, device=device),
                                            dtype=torch.float32)  # fmt: skip
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
        onloads.append(list(offloader.onloads) if offloader else [])
    return losses, onloads


@pytest.mark.parametrize("checkpoint", ["diffusers", "per-block"])
def test_offloaded_blocks_stream_in_schedule_order_and_the_losses_do_not_change(checkpoint):
    plain, _ = _train(*_model(checkpoint)[:2])
    transformer, params, offloader = _model(checkpoint, offloaded=[0, 1])
    seen = []  # which offloaded blocks are resident while block 2 (kept on the device) runs forward
    transformer.transformer_blocks[2].register_forward_pre_hook(lambda m, a: seen.append(sorted(offloader.resident)))
    losses, onloads = _train(transformer, params, offloader)

    assert losses == plain  # the same maths, bit for bit
    hooked = {n.split(".")[1] for n, m in transformer.named_modules()
              if _GROUP_OFFLOADING in getattr(getattr(m, "_diffusers_hook", None), "hooks", {})}  # fmt: skip
    assert hooked == {"0", "1"}  # diffusers' hooks on the children of exactly the two offloaded blocks
    # Forward: 0 then 1 (kept: backward starts with it); the recompute in backward: 0 again, which stays for the
    # next forward. 2k - 2 copies a step, and the first step's block 0.
    assert onloads == [[0, 1, 0]] + [[1, 0]] * (STEPS - 1)
    assert seen[0] == [1]  # block 0 went back after its forward; 1 waits for backward
    assert offloader.bytes_moved == (1 + STEPS * 2) * offloader.block_bytes[0] > 0
    assert offloader.block_bytes[0] == sum(
        p.numel() * p.element_size() for p in transformer.transformer_blocks[0].parameters() if not p.requires_grad
    )
    assert _get_group_onload_device(transformer) == torch.device("cpu")  # diffusers sees a group-offloaded model


def test_recompute_in_backward_goes_through_the_hooks():
    """With three offloaded blocks the backward recompute onloads 1 then 0 (2 stays from forward, 0 from the last
    backward): the hooks sit inside the checkpointed forward, and backward prefetches in reverse."""
    transformer, params, offloader = _model("per-block", offloaded=[0, 1, 2])
    _, onloads = _train(transformer, params, offloader)
    assert onloads[-1] == [1, 2, 1, 0]


def test_planner_counts_offloaded_blocks_without_tracing_again():
    inputs = memory.PlanInputs(SMALL, memory.StepShape(128, 128, 1, 16), LoRAConfig(rank=4), checkpoint="all")
    base = memory.plan_memory(inputs)
    for k in (1, 3, 4):
        plan = memory.with_settings(base, offload_blocks=k)
        in_flight = min(k, offload.IN_FLIGHT_BLOCKS) * base.block_weights
        assert plan.frozen_weights == base.frozen_weights - k * base.block_weights
        assert plan.peak == base.peak - k * base.block_weights + in_flight
        assert plan.host_bytes_per_step == (2 * k - 2) * base.block_weights
        assert plan.activations == base.activations
    assert (
        memory.plan_memory(memory.PlanInputs(**{**vars(inputs), "offload_blocks": 3})).peak
        == memory.with_settings(base, offload_blocks=3).peak
    )
    partial = memory.plan_memory(memory.PlanInputs(**{**vars(inputs), "checkpoint": [0]}))
    with pytest.raises(ValueError, match="checkpointed"):
        memory.with_settings(partial, offload_blocks=2)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_on_a_gpu_offloaded_weights_rest_pinned_in_cpu_memory_and_visit_the_gpu():
    device = torch.device("cuda")
    plain_model, plain_params, _ = _model("per-block", device="cuda")
    plain, _ = _train(plain_model, plain_params, device="cuda")
    del plain_model, plain_params
    torch.cuda.empty_cache()
    transformer, params, offloader = _model("per-block", offloaded=[0, 1], device="cuda")
    frozen = [p for p in transformer.transformer_blocks[0].parameters() if not p.requires_grad]
    lora = [p for p in transformer.transformer_blocks[0].parameters() if p.requires_grad]
    assert all(p.device.type == "cpu" and p.is_pinned() for p in frozen)
    assert all(p.device == device or p.device.type == "cuda" for p in lora)
    during = []
    transformer.transformer_blocks[0].attn.register_forward_hook(lambda m, a, o: during.append(frozen[0].device.type))
    losses, onloads = _train(transformer, params, offloader, device="cuda")
    assert during and set(during) == {"cuda"}  # on the GPU while it runs, forward and recompute alike
    assert offloader.resident == {0} and frozen[0].device.type == "cuda"  # the last backward ended on block 0
    assert all(p.device.type == "cpu" for p in transformer.transformer_blocks[1].parameters() if not p.requires_grad)
    assert onloads[-1] == [1, 0]
    for a, b in zip(losses, plain, strict=True):
        assert abs(a - b) <= 1e-4 * abs(b)


# ------------------------------------------------------------------------------------------ in the recipe


def _recipe_losses(tiny_model_dir, sample_data_dir, out, *extra):
    cfg = load_config(ROOT / "configs" / "demo.yaml", [
        f"model.pretrained={tiny_model_dir}", f"data.path={sample_data_dir / 'brand'}", f"output_dir={out}",
        "train.max_steps=4", "checkpoint.every_steps=1000", "validation.every_steps=0", "validation.prompts=[]",
        "validation.edits=[]", "validation.held_out_fraction=0", *extra,
    ])  # fmt: skip
    recipe = LoRARecipe(cfg)
    try:
        recipe.setup()
        recipe.train()
        blocks = recipe.pipe.transformer.transformer_blocks
        hooked = [i for i, b in enumerate(blocks) if any(hasattr(c, "_diffusers_hook") for c in b.children())]
    finally:
        recipe.cleanup()
        AcceleratorState._reset_state(True)  # accelerate keeps process-wide singletons
        GradientState._reset_state()
    return [json.loads(line)["loss"] for line in (out / "losses.jsonl").read_text().splitlines()], hooked


def test_the_recipe_trains_the_same_with_an_offloaded_block(tiny_model_dir, sample_data_dir, tmp_path, caplog):
    plain, hooked = _recipe_losses(
        tiny_model_dir, sample_data_dir, tmp_path / "plain", "train.gradient_checkpointing=true"
    )
    assert hooked == []
    offloaded, hooked = _recipe_losses(
        tiny_model_dir,
        sample_data_dir,
        tmp_path / "offload",
        "train.gradient_checkpointing=true",
        "train.offload_blocks=1",
    )
    assert hooked == [0] and offloaded == plain
    assert "group offloaded" not in caplog.text  # accelerate is not asked to move a placed transformer


def test_a_budget_the_auto_settings_cannot_meet_stops_the_recipe_naming_it(tiny_model_dir, sample_data_dir, tmp_path):
    with pytest.raises(ConfigError, match=r"train.memory_budget_gb: .* over 0.5 GB; `qwen-lora plan"):
        _recipe_losses(
            tiny_model_dir,
            sample_data_dir,
            tmp_path / "run",
            "train.gradient_checkpointing=auto",
            "train.offload_blocks=auto",
            "train.memory_budget_gb=0.5",
        )  # under the CUDA context alone


def test_auto_offloads_the_fewest_blocks_that_fit_the_budget(tmp_path):
    """At launch `auto` resolves against train.memory_budget_gb as `qwen-lora plan` does; only the `auto` settings
    move. A 6-block model (its config alone: the planner reads no weights), budgets cut between plans."""
    (tmp_path / "model" / "transformer").mkdir(parents=True)
    (tmp_path / "model" / "transformer" / "config.json").write_text(json.dumps({**SMALL, "num_layers": 6}))

    def resolve(target_peak: int, *extra):
        gb = (math.ceil(target_peak * (1 + memory.FRAGMENTATION) + memory.CUDA_CONTEXT_BYTES) + 64) / 2**30
        cfg = load_config(None, [f"model.pretrained={tmp_path / 'model'}", "data.resolution=128", "lora.rank=4",
                                 f"train.memory_budget_gb={gb}", *extra])  # fmt: skip
        return memory_fit.resolve(cfg, references=0)

    cfg = load_config(None, [f"model.pretrained={tmp_path / 'model'}", "data.resolution=128", "lora.rank=4"])
    every = memory.plan_memory(memory.plan_inputs_from_config(cfg, checkpoint="all"))
    assert resolve(every.peak, "train.gradient_checkpointing=true") is None  # nothing auto: nothing planned
    four = memory.with_settings(every, offload_blocks=4).peak
    recipe = resolve(four, "train.gradient_checkpointing=true", "train.offload_blocks=auto")
    assert recipe.fits and recipe.plan.offloaded == 4 and len(recipe.plan.checkpointed) == 6
    assert recipe.overrides() == ["train.gradient_checkpointing=true", "train.offload_blocks=4", "optim.name=adamw",
                                  "model.quantize=none"]  # fmt: skip
    # Offloading trains on one process: under DDP `auto` picked it, then the trainer refused what it had picked.
    cfg = load_config(None, [f"model.pretrained={tmp_path / 'model'}", "data.resolution=128", "lora.rank=4",
                             "train.gradient_checkpointing=true", "train.offload_blocks=auto",
                             f"train.memory_budget_gb={recipe.gpu_bytes / 2**30}"])  # fmt: skip
    assert memory_fit.resolve(cfg, references=0).plan.offloaded == 4
    ddp = memory_fit.resolve(cfg, references=0, processes=2)
    assert ddp.plan.offloaded == 0 and not ddp.fits


def test_offloaded_blocks_and_a_quantized_base_are_said_when_set_by_hand(caplog):
    """`auto` said its recipe and FSDP its sharding; offload_blocks=2 or model.quantize=int8 trained without a word."""
    transformer = QwenImage21Transformer2DModel(**SMALL).requires_grad_(False)
    cfg = load_config(None, ["train.gradient_checkpointing=true", "train.offload_blocks=2", "model.quantize=int8"])
    with caplog.at_level(logging.INFO, "qwen_image_lora.train"):
        memory_fit.apply(transformer, cfg, torch.device("cpu"), references=0)
    said = [r.getMessage() for r in caplog.records if r.getMessage().startswith("memory: ")]
    blocks = len(transformer.transformer_blocks)
    assert said == [f"memory: the first 2 of {blocks} blocks stream from CPU memory; the frozen base is int8"]


def test_an_fsdp_launch_leaves_placement_to_fully_shard(monkeypatch):
    """Under FSDP each rank must never hold the whole base on its device: `apply` leaves the weights where they
    loaded and `fully_shard` (in `ranks.prepare`) moves one block at a time, keeping that rank's shard. The device
    here is `meta`, so whatever `apply` moves shows."""
    cfg = load_config(None, ["train.gradient_checkpointing=true", "train.offload_blocks=0"])
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    transformer = QwenImage21Transformer2DModel(**SMALL)
    memory_fit.apply(transformer, cfg, torch.device("meta"), references=0)
    assert {p.device.type for p in transformer.parameters()} == {"cpu"}
    with pytest.raises(ConfigError, match="train.offload_blocks"):  # offloading places blocks itself
        memory_fit.apply(transformer, load_config(None, ["train.offload_blocks=1"]), torch.device("meta"), 0)
    monkeypatch.delenv("ACCELERATE_USE_FSDP")
    memory_fit.apply(transformer, cfg, torch.device("meta"), references=0)
    assert {p.device.type for p in transformer.parameters()} == {"meta"}


@pytest.mark.parametrize(
    "setting, field",
    [("model.quantize=int8", "model.quantize"), ("optim.name=adamw8bit", "optim.name"),
     ("train.offload_blocks=2", "train.offload_blocks")],
)  # fmt: skip
def test_an_fsdp_launch_refuses_what_does_not_shard_before_loading(monkeypatch, setting, field):
    """A quantized base crashed inside fully_shard (torchao's Int8Tensor has no aten.split) after the weights
    loaded, with a traceback per rank; now one error naming the field, before any weights load."""
    cfg = load_config(None, ["data.path=.", setting])
    preflight.check_before_loading(cfg)  # one process: fine
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    with pytest.raises(ConfigError, match=rf"^{field}: .*(FSDP2|one process)"):
        preflight.check_before_loading(cfg)


def test_settings_that_cannot_train_together_are_refused_where_validate_sees_them(tiny_model_dir, tmp_path,
                                                                                   monkeypatch, capsys):  # fmt: skip
    """`validate` said OK to each of these, and the trainer refused them later, two after the weights had loaded;
    `plan` planned the first as "every block checkpointed" and crashed on the second with a traceback."""
    base = [f"model.pretrained={tiny_model_dir}"]
    for given, said in (
        (["train.gradient_checkpointing=false", "train.offload_blocks=auto"],  # `auto` could never offload
         "train.offload_blocks: offloaded blocks are recomputed in backward, so they need train.gradient_checkpointing"),
        (["train.gradient_checkpointing=true", "train.offload_blocks=1", "model.compile=blocks"],
         "train.offload_blocks: not with model.compile (the streaming hooks sit inside the compiled blocks)"),
        (["model.quantize=int8", "lora.init=pissa"], "lora.init: pissa factors the base weights, which a int8 base"),
    ):  # fmt: skip
        with pytest.raises(ConfigError, match=re.escape(said)):
            load_config(None, [*base, *given])
    offload = [*base, "train.gradient_checkpointing=true", "train.offload_blocks=2"]
    (tmp_path / "c.yaml").write_text("{}")
    plan = ["plan", "--config", str(tmp_path / "c.yaml")]
    assert cli_main([*plan, "--checkpointing", "none", *offload]) == 2
    assert capsys.readouterr().err.startswith("error: --checkpointing none: train.offload_blocks: offloaded blocks")
    assert cli_main([*plan, "--as-configured", *offload[:-1], "train.offload_blocks=3"]) == 2
    assert capsys.readouterr().err == "error: train.offload_blocks: 3 is more than the transformer's 2 blocks\n"
    monkeypatch.setenv("WORLD_SIZE", "2")  # under DDP: refused before loading, not after
    with pytest.raises(ConfigError, match="^train.offload_blocks: offloading trains on one process"):
        preflight.check_before_loading(load_config(None, offload))


def test_a_budget_missed_by_auto_checkpointing_names_offloading_among_the_ways_out(tiny_model_dir):
    """The 16 GB card's answer is offloaded blocks, which the hint left out when they were not `auto` already."""
    cfg = load_config(None, [f"model.pretrained={tiny_model_dir}", "train.gradient_checkpointing=auto",
                             "train.memory_budget_gb=0.5"])  # fmt: skip
    with pytest.raises(ConfigError, match=r"also tries offloaded blocks, an 8-bit optimizer and a quantized base"):
        memory_fit.apply(None, cfg, "cpu", references=0)  # refused before the transformer is touched
    from_file = load_config("configs/demo.yaml", [f"model.pretrained={tiny_model_dir}", "train.memory_budget_gb=0.5",
                                                  "train.gradient_checkpointing=auto"])  # fmt: skip
    with pytest.raises(ConfigError) as e:  # it said `--config ...`, then a KEY=VALUE placeholder
        memory_fit.apply(None, from_file, "cpu", references=0)
    assert (f"`qwen-lora plan --config configs/demo.yaml model.pretrained={tiny_model_dir} "
            "train.gradient_checkpointing=auto --gpu-memory 0.5GB`") in str(e.value)  # fmt: skip


def test_a_budget_nothing_fits_does_not_promise_that_plan_finds_a_recipe(tiny_model_dir):
    """The hint said `plan` "names a recipe that fits" when every rung had been tried and `plan` found none."""
    cfg = load_config(None, [f"model.pretrained={tiny_model_dir}", "train.gradient_checkpointing=auto",
                             "train.offload_blocks=auto", "train.memory_budget_gb=0.05"])  # fmt: skip
    with pytest.raises(ConfigError, match="names a recipe if one fits; if none does, lower data.resolution") as e:
        memory_fit.apply(None, cfg, "cpu", references=0)
    assert "offloaded blocks," not in str(e.value).split("; ", 1)[1]  # already tried: `auto`


def test_a_budget_of_auto_is_the_cards_size_and_said_where_there_is_no_card(tiny_model_dir, capsys):
    """24 GB was planned on any card unless the user set the budget (an 80 GB card checkpointed what it need not, a
    12 GB card was planned past its size); `auto` was refused as not a number."""
    given = load_config(None, ["train.memory_budget_gb=12"])
    assert memory_fit.budget_bytes(given) == 12 * 2**30
    cfg = load_config(None, [f"model.pretrained={tiny_model_dir}", "train.memory_budget_gb=auto",
                             "train.gradient_checkpointing=auto"])  # fmt: skip
    if torch.cuda.is_available():  # the GPU script's run: the card's own size
        assert memory_fit.budget_bytes(cfg) == torch.cuda.get_device_properties(0).total_memory
        return
    with pytest.raises(ConfigError, match=r"^train.memory_budget_gb: auto reads the GPU's size, and there is no GPU"):
        memory_fit.apply(None, cfg, "cpu", references=0)  # at launch, before the transformer is touched
    argv = [
        "plan",
        "--config",
        "configs/demo.yaml",
        f"model.pretrained={tiny_model_dir}",
        "train.memory_budget_gb=auto",
    ]
    assert cli_main(argv) == 2
    err = capsys.readouterr().err.strip()  # it began "--gpu-memory:", a flag not given
    assert err.startswith("error: train.memory_budget_gb: auto reads") and err.endswith("e.g. --gpu-memory 24GB")
    with pytest.raises(ConfigError, match=r"train.memory_budget_gb: must be > 0 or auto \(got -1.0\)"):
        load_config(None, ["train.memory_budget_gb=-1"])
