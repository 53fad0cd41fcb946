"""LoRA fine-tuning recipe for Qwen-Image-2.1 (text-to-image and instruction editing).

    accelerate launch train/lora.py --config configs/brand.yaml [--resume latest|PATH] [section.key=value ...]

`setup()` builds the model, adapter, data, optimizer, scheduler, tracker and checkpointer from the config;
`train()` is the loop; `save_checkpoint()` writes a resumable checkpoint; `cleanup()` closes the trackers.
The maths lives in `objective.py`, the Qwen-Image specifics in `qwen_image_lora.model`, so the loop below
never mentions a tensor shape. accelerate handles devices, mixed precision, accumulation and DDP.

Exit status: 0 trained (or `--resume latest` found the run already finished); 2 a config, data, run-folder or
checkpoint problem, or a write of the run that failed (a full disk: one `error:` line naming the file and the last
checkpoint); 3 a guard stopped the run; 75 (EXIT_PREEMPTED) SIGTERM/SIGINT stopped it after writing a checkpoint:
rerun with `--resume latest`.
"""

from __future__ import annotations

import contextlib
import logging
import math
import signal
import sys
import tempfile
import time
from pathlib import Path

from qwen_image_lora.train import early

if __name__ == "__main__":  # Ctrl-C while the libraries below import: nothing to keep yet, so no traceback
    signal.signal(signal.SIGINT, signal.SIG_DFL)
    early.refuse_early(sys.argv[1:], __doc__)  # a config, model or data that cannot work: said before the imports

import torch
from accelerate import Accelerator
from accelerate.utils import set_seed

from qwen_image_lora import model as qmodel
from qwen_image_lora import objective, speed
from qwen_image_lora import run_layout as layout
from qwen_image_lora.config import Config, ConfigError, load_config, save_config, to_dict
from qwen_image_lora.console import SurvivingStream
from qwen_image_lora.data.dataset import build_training_data
from qwen_image_lora.errors import UserError
from qwen_image_lora.io import describe_write_error, is_write_error
from qwen_image_lora.progress import progress_bar
from qwen_image_lora.train import adapter, export, memory_fit, optim, preflight, ranks, validation
from qwen_image_lora.train.checkpoint import (
    Checkpointer,
    CheckpointError,
    TrainingProgress,
    TrainingState,
)
from qwen_image_lora.train.guards import Guards, TrainingStopped
from qwen_image_lora.train.preemption import Preempted, StopSignal
from qwen_image_lora.train.resume_check import check_resume
from qwen_image_lora.train.run_folder import RunFolder
from qwen_image_lora.train.tracking import Tracker, log_with

logger = logging.getLogger("qwen_image_lora.train")


class LoRARecipe:
    def __init__(
        self, cfg: Config, resume: str | None = None, overwrite: bool = False, allow_config_change: bool = False
    ):
        self.cfg = cfg
        self.resume = resume if resume is not None else cfg.checkpoint.resume
        self.overwrite, self.allow_config_change = overwrite, allow_config_change
        self.out = Path(cfg.output_dir)
        self.run_folder = RunFolder(self.out, keep=cfg.data.cache_dir)
        self.stop = StopSignal()
        self.step = 0
        self.saved_step = None  # the step of the newest checkpoint this process wrote
        self.cursor = (0, 0)  # the sampler position of the next batch
        self.samples: dict[str, Path] = {}
        self.tracker = None

    # ------------------------------------------------------------------------------------------ setup

    def setup(self) -> None:
        cfg = self.cfg
        preflight.check_before_loading(cfg, resuming=bool(self.resume))
        if not self.resume:
            self.run_folder.check_fresh_start(self.overwrite)
        self.stop.install()
        self.accelerator = acc = Accelerator(
            gradient_accumulation_steps=cfg.train.gradient_accumulation_steps,
            mixed_precision=cfg.train.mixed_precision,
            log_with=log_with(cfg.tracking) or None,
            project_dir=str(self.out),
        )
        ranks.check_one_group(acc)
        if cfg.model.attention == "flex" and acc.device.type != "cuda":
            raise ConfigError(
                f"model.attention: flex trains on CUDA only (torch has no flex_attention backward on "
                f"{acc.device.type}); use sdpa-segments here"
            )
        self.checkpointer = Checkpointer(self.out, cfg.checkpoint.keep_last)
        self.resume_from, self.run_id = ranks.main_then_share(
            acc, lambda: self.run_folder.open(self.resume, self.overwrite, self.checkpointer, cfg.train.max_steps)
        )
        if self.resume_from is not None:
            progress, warnings = check_resume(self.resume_from, to_dict(cfg), self.allow_config_change)
            for warning in warnings if acc.is_main_process else []:
                logger.warning("resume: %s", warning)
            cfg.train.seed = progress.seed  # the data order and caption choices continue the checkpoint's
        set_seed(cfg.train.seed)  # the same LoRA initialisation on every rank
        self.tracker = Tracker(acc, cfg.tracking, self.out)
        if acc.is_main_process:  # before the weights: a W&B that cannot start says so in seconds, not minutes
            self.tracker.start(to_dict(cfg), self.run_folder.tracking_id())
        self.pipe = self._setup_model()
        self.data = self._setup_data()
        self._place_encoders()
        self.params = adapter.add_lora(self.pipe.transformer, cfg.lora)
        self._setup_checkpointing(self.pipe.transformer)
        m = cfg.model  # after LoRA and checkpointing, so the compiled graph holds both
        speed.configure_transformer(self.pipe.transformer, m.attention, m.attention_backend, m.compile)
        optimizer = optim.build_optimizer(self.params, cfg.optim)
        # Stepped by us once per optimizer step (accelerate's wrapper would step it once per process).
        self.lr_scheduler = optim.build_lr_scheduler(optimizer, cfg.optim, cfg.train.max_steps)
        self.transformer, self.optimizer = ranks.prepare(acc, self.pipe.transformer, optimizer)
        self.params = [p for p in self.pipe.transformer.parameters() if p.requires_grad]  # FSDP2 swapped in shards
        # Read once: diffusers' `ModelMixin.dtype` walks every submodule, a cost per step that grows with depth.
        self.model_dtype = self.pipe.transformer.dtype
        self.ema = optim.LoRAEMA(self.params, cfg.train.ema_decay) if cfg.train.ema_decay else None
        set_seed(cfg.train.seed, device_specific=True)  # LoRA dropout etc. differ per rank from here on
        self.noise = objective.NoiseSampler(
            cfg.train.seed * 1_000_003 + acc.process_index + 1,
            cfg.train.timestep_sampling,
            self.pipe.scheduler.config,
            cfg.train.logit_mean,
            cfg.train.logit_std,
        )
        self.guards = Guards(cfg.train)
        self.guards.remember_initial(self.pipe.transformer.named_parameters())
        self.state = TrainingState(
            acc, self.pipe.transformer, self.optimizer, self.lr_scheduler, self.ema, self.guards, self.noise
        )
        if self.resume_from is not None:
            self._restore(self.resume_from)
        if acc.is_main_process:
            save_config(cfg, self.out / layout.CONFIG)
            self.run_folder.trim_losses(self.step)

    def _setup_model(self):
        cfg = self.cfg
        # Placed with its LoRA in `_setup_checkpointing` (offloaded blocks stay in CPU memory); the encoders once
        # the data is known.
        return qmodel.load_pipeline(
            cfg.model.pretrained, cfg.model.dtype, revision=cfg.model.revision, quantize=cfg.model.quantize
        )

    def _place_encoders(self) -> None:
        """With every entry cached, the text encoder and VAE only serve validation samples: on a GPU they stay
        in CPU memory and stream in layer by layer, so training holds just the transformer (the 24 GB bar).
        Otherwise they encode on the fly and live on the device."""
        device, missing = self.accelerator.device, self.data.uncached_entries()
        if device.type == "cuda" and missing == 0:
            qmodel.offload_encoders(self.pipe, device)
            logger.info("data cache complete: text encoder and VAE offloaded to CPU memory")
            return
        if device.type == "cuda":
            logger.warning(
                "%d entries are not in the data cache, so the text encoder and VAE stay on the GPU to encode them; "
                "run `qwen-lora data prepare --config ...` first to train with just the transformer there",
                missing,
            )
        for module in (self.pipe.text_encoder, self.pipe.vae):
            module.to(device)

    def _setup_data(self):
        acc = self.accelerator
        return build_training_data(self.cfg, self.pipe, num_replicas=acc.num_processes, rank=acc.process_index)

    def _setup_checkpointing(self, transformer) -> None:
        entries, acc, train = self.data.dataset.entries, self.accelerator, self.cfg.train
        references = max(len(e.item.sources) for e in entries)
        auto = "auto" in (train.gradient_checkpointing, train.offload_blocks)
        step = memory_fit.largest_step(self.cfg, entries, self.pipe.processor.tokenizer) if auto else None
        recipe = memory_fit.apply(transformer, self.cfg, acc.device, references, acc.num_processes, step)
        if recipe is not None:
            logger.info(
                "memory auto: %s (planned %.1f GiB of %g GB)",
                recipe.describe(),
                recipe.plan.total / 2**30,
                recipe.gpu_bytes / 2**30,
            )

    # ------------------------------------------------------------------------------------------ the loop

    def train(self) -> None:
        cfg, acc = self.cfg, self.accelerator
        self.data.sampler.load_state_dict({"epoch": self.cursor[0], "position": self.cursor[1]})
        with torch.random.fork_rng(devices=[]):  # starting a DataLoader draws from the global RNG
            batches = iter(self.data.loader())
        bar = progress_bar(
            cfg.train.max_steps, initial=self.step, desc="steps", unit="step", enabled=acc.is_main_process
        )
        micro_losses: list[torch.Tensor] = []
        self.transformer.train()
        tick = time.perf_counter()
        while self.step < cfg.train.max_steps:
            batch = next(batches)
            with acc.accumulate(self.transformer):
                loss = self._loss_step(batch)
                acc.backward(loss)
                micro_losses.append(loss.detach())
                if not acc.sync_gradients:
                    continue
                # null max_grad_norm: clip at inf, i.e. only measure (and, under fp16, unscale) the gradients
                grad_norm = float(acc.clip_grad_norm_(self.params, cfg.optim.max_grad_norm or math.inf))
                step_loss = acc.reduce(torch.stack(micro_losses).mean(), "mean").item()
                micro_losses.clear()
                # Under fp16 an inf gradient is the loss scaler's business: it skips that step and lowers the scale.
                scaled = acc.scaler is not None and math.isfinite(step_loss)
                stepped = self.guards.step_is_finite(step_loss, 0.0 if scaled else grad_norm)
                lr = self.lr_scheduler.get_last_lr()[0]  # the rate this step applies (the scheduler then moves on)
                if stepped:  # a non-finite step is skipped (and counted) rather than poisoning the weights
                    self.optimizer.step()
                    self.lr_scheduler.step()
                    if self.ema is not None:
                        self.ema.update()
                self.optimizer.zero_grad(set_to_none=True)
            self.cursor = batch.cursor
            if not stepped:
                continue
            self.step += 1
            self._log(step_loss, grad_norm, lr, time.perf_counter() - tick)
            # Before update, which draws it (a log line shows this step's loss); no redraw of its own each step.
            bar.set_postfix(loss=f"{step_loss:.4f}", refresh=False)
            bar.update(1)
            self._check_guards(step_loss, grad_norm)
            self._maybe_validate()
            self._maybe_checkpoint()
            tick = time.perf_counter()  # s_per_step times the training step, not the previews or checkpoint after it
            if self.stop.agreed(acc):  # every rank sees the same answer after the same step
                bar.close()
                return self._stop_on_signal()
        bar.close()
        self._finish()

    def _loss_step(self, batch) -> torch.Tensor:
        batch = batch.to(self.accelerator.device)
        noise, sigmas = self.noise.draw(batch.latents)
        return objective.flow_matching_loss(
            self.transformer, batch, noise, sigmas, self.cfg.train.loss_weighting, dtype=self.model_dtype
        )  # the prepared module may be DDP

    def _log(self, loss: float, grad_norm: float, lr: float, seconds: float) -> None:
        acc, cfg = self.accelerator, self.cfg
        if not acc.is_main_process:
            return
        self.run_folder.append_loss({"step": self.step, "loss": loss, "lr": lr, "grad_norm": grad_norm})
        if self.step % cfg.train.log_every == 0:
            samples = cfg.train.batch_size * cfg.train.gradient_accumulation_steps * acc.num_processes
            metrics = {
                "loss": loss,
                "lr": lr,
                "grad_norm": grad_norm,
                "s_per_step": seconds,
                "samples_per_s": samples / seconds,
            }
            if torch.cuda.is_available():
                metrics["peak_memory_gib"] = torch.cuda.max_memory_allocated() / 2**30
            self.tracker.log(metrics, step=self.step)

    def _check_guards(self, loss: float, grad_norm: float) -> None:
        self.guards.check_learning(self.step, self.pipe.transformer.named_parameters(), grad_norm)
        self.guards.check_divergence(loss)

    def _maybe_validate(self) -> None:
        every = self.cfg.validation.every_steps
        if every and self.step % every == 0 and self.step < self.cfg.train.max_steps:
            self.validate()

    def _maybe_checkpoint(self) -> None:
        # The last step too: a finished run then continues exactly where it ended when train.max_steps is raised.
        if self.step % self.cfg.checkpoint.every_steps == 0 or self.step == self.cfg.train.max_steps:
            self.save_checkpoint()

    # ------------------------------------------------------------------------------------------ verbs

    def validate(self) -> dict:
        """Samples (and the held-out loss) with the current adapter, EMA weights if enabled; main process (under
        FSDP2 every rank runs the forward passes, as each holds a shard of the weights; the main one keeps the images)."""
        acc, metrics = self.accelerator, {}
        if acc.is_main_process or ranks.is_sharded(self.pipe.transformer):
            with self._ema_weights(), tempfile.TemporaryDirectory() as scratch:
                folder = layout.samples_dir(self.out, self.step) if acc.is_main_process else Path(scratch)
                images = validation.generate_samples(self.pipe, self.cfg, folder)
                self.samples = {name: folder / f"{name}.png" for name in images}
                if self.data.held_out:
                    metrics["heldout_loss"] = objective.heldout_loss(
                        self.pipe.transformer, self.data.held_out_batches(), self.cfg.validation.seed
                    )
        if acc.is_main_process:
            self.tracker.log_images(images, step=self.step)
            if metrics:
                self.tracker.log(metrics, step=self.step)
                logger.info("step %d: held-out loss %.5f", self.step, metrics["heldout_loss"])
        acc.wait_for_everyone()
        return metrics

    def save_checkpoint(self) -> Path | None:
        acc, cfg = self.accelerator, self.cfg
        progress = TrainingProgress(
            step=self.step,
            seed=cfg.train.seed,
            max_steps=cfg.train.max_steps,
            epoch=self.cursor[0],
            position=self.cursor[1],
            samples_seen=self.step * cfg.train.batch_size * cfg.train.gradient_accumulation_steps * acc.num_processes,
            num_processes=acc.num_processes,
            run_id=self.run_id,
        )
        path = self.state.save(self.checkpointer, progress, to_dict(cfg))
        self.saved_step = self.step
        if path is not None:
            logger.info("saved checkpoint %s", path)
        return path

    def _restore(self, path: Path) -> None:
        progress = self.state.restore(path)
        self.step, self.cursor = progress.step, (progress.epoch, progress.position)
        if self.accelerator.is_main_process:
            logger.info("resumed from %s at step %d", path, self.step)

    def _stop_on_signal(self) -> None:
        """All ranks stopped after the same step: save it (unless just saved) and leave with EXIT_PREEMPTED."""
        if self.saved_step != self.step:
            self.save_checkpoint()
        path = self.checkpointer.path_for(self.step)  # on every rank: only the main one gets it back from the save
        raise Preempted(
            f"stopped by {self.stop.name} after step {self.step} of {self.cfg.train.max_steps}; "
            f"checkpoint {path} written; continue with --resume latest"
        )

    def _finish(self) -> None:
        """Final validation, then the output folder: adapter, config, metadata, model card."""
        acc, cfg = self.accelerator, self.cfg
        if cfg.validation.prompts or cfg.validation.edits or self.data.held_out:
            self.validate()
        with self._ema_weights():
            state = adapter.get_lora_state(self.pipe.transformer)
        hashes = ranks.gather_adapter_hashes(state)
        if len(set(hashes)) != 1:
            raise TrainingStopped(
                f"the processes ended with different adapters (hashes {hashes}); DDP went out of sync"
            )
        if acc.is_main_process:
            rows = self.run_folder.read_losses()  # the whole run, across resumes (from its checkpoint, elsewhere)
            losses = [row["loss"] for row in rows]
            metadata = export.run_metadata(self.run_id, self.step, losses, acc.num_processes, self.guards.nonfinite,
                                           hashes, self.params)  # fmt: skip
            try:
                published = export.write_run_folder(self.pipe.transformer, cfg, metadata, self.samples, state)
            except Exception as e:
                raise CheckpointError(
                    f"{describe_write_error(e, self.out)}; the files already there and the "
                    f"checkpoints in {self.checkpointer.root} are intact"
                ) from e
            self.tracker.upload_adapter(self.out, published)
            logger.info("adapter written to %s", self.out / adapter.WEIGHTS_NAME)
            window = export.loss_window(len(rows))
            if rows:  # the steps by number: a run continued in a new folder logs from its checkpoint's step on
                logger.info("loss: %.4f (mean of steps %d-%d) -> %.4f (steps %d-%d)", metadata["first_loss"],
                            rows[0]["step"], rows[window - 1]["step"], metadata["final_loss"], rows[-window]["step"],
                            rows[-1]["step"])  # fmt: skip
        acc.wait_for_everyone()

    def cleanup(self, exit_code: int = 0) -> None:
        """`exit_code`: the process's, which the tracker records (a stopped run is not a finished one)."""
        self.stop.uninstall()
        self.run_folder.unlock()
        if self.tracker is not None:
            self.tracker.finish(exit_code)
        cache = self.data.dataset.encoder.cache if hasattr(self, "data") else None
        if hasattr(cache, "close"):  # a prepared on-disk cache flushes what training added
            cache.close()

    def write_failed(self, error: BaseException) -> str:
        """One line for a failed write of the run (a full disk while logging or sampling): the file, the next step
        and the checkpoint `--resume latest` continues from."""
        return f"{describe_write_error(error, getattr(error, 'filename', None) or self.out)}; {self.last_checkpoint()}"

    def last_checkpoint(self) -> str:
        kept = self.checkpointer.of_run(self.run_id) if hasattr(self, "run_id") else []
        return f"the last checkpoint {kept[-1]} is intact" if kept else "no checkpoint was written yet"

    # ------------------------------------------------------------------------------------------ helpers

    def _ema_weights(self):
        return self.ema.swapped_in() if self.ema is not None else contextlib.nullcontext()


def main(argv: list[str] | None = None) -> int:
    parser = early.build_parser(__doc__)
    args = early.parse(parser, argv)
    sys.stdout, sys.stderr = SurvivingStream(sys.stdout), SurvivingStream(sys.stderr)  # a signal still checkpoints
    if signal.getsignal(signal.SIGINT) is signal.SIG_DFL:  # imported: Ctrl-C raises again (a cache flushes on it)
        signal.signal(signal.SIGINT, signal.default_int_handler)
    if args.resume and args.overwrite:  # one continues this folder's run, the other moves it aside
        parser.error("--resume continues a run and --overwrite starts a new one: give one of them")
    # Every rank reads the same config and data: the main one says what they all would; the others only errors.
    main_rank = early.is_main_rank()
    logging.basicConfig(
        level=logging.INFO if main_rank else logging.ERROR,
        format="%(asctime)s %(levelname)s %(message)s",
        datefmt="%H:%M:%S",
    )
    try:
        cfg = load_config(args.config, args.overrides)
    except ConfigError as e:
        if main_rank:
            print(e.line(), file=sys.stderr)
        return early.after_main_spoke(e.exit_code)
    recipe = LoRARecipe(cfg, resume=args.resume, overwrite=args.overwrite, allow_config_change=args.allow_config_change)
    try:
        try:
            recipe.setup()
            recipe.train()
        except BaseException as e:
            # W&B records the status (any but 0 is failed; 75, preempted); cleanup's own writes (the data cache's
            # last shard) fail like the others
            recipe.cleanup(getattr(e, "exit_code", 1))
            raise
        recipe.cleanup()
    except UserError as e:  # a config, data or run-folder error, or a stop: the main rank speaks for all
        message, status = e.line() if main_rank else None, e.exit_code
    except KeyboardInterrupt:  # Ctrl-C twice: stopped at once (`preemption`), no traceback
        message = f"stopped: Ctrl-C twice, without a checkpoint now; {recipe.last_checkpoint()} (--resume latest)"
        message, status = message if main_rank else None, 130
    except Exception as e:
        if not is_write_error(e):  # a bug keeps its traceback
            raise
        message, status = f"error: {recipe.write_failed(e)}", 2
    else:
        message, status = None, 0
    if message:  # after cleanup's own output, so under accelerate launch it is the last line before accelerate's
        # One write, newline included: ranks of a multi-process run share the pipe, and print's two writes interleave.
        sys.stderr.write(message.replace("\n", " ") + "\n")
        sys.stderr.flush()
    return early.after_main_spoke(status)


if __name__ == "__main__":
    ranks.exit_process(main())  # not sys.exit: see there why a rank of a multi-process run skips Python's teardown
