"""The training loop: LoRA on the U-Net (and text encoder), one readable `step()`.

Data flow: images + captions -> buckets -> cached VAE latents -> batches of one bucket
-> step() -> optimizer -> Kohya-format adapters every `save_every_n_epochs`.

`Trainer(cfg)` builds everything a training needs, in this order: the accelerator, the base
and its family, the examples (`examples.TrainingData`), the adapters, the optimizer and the
prepared loader; `run()` is the loop. What the loop writes (adapters, state, previews) is
`saving.Saver`'s job, what stops it `guards`'.
"""

from __future__ import annotations

import contextlib
import time

import torch
import torch.nn.functional as F

from sdlora.adapters import keys
from sdlora.adapters.file import read_adapter
from sdlora.adapters.network import inject, resolve_settings
from sdlora.config import Config
from sdlora.errors import UserError
from sdlora.io import output_lock, refuse_to_overwrite, remove_stale_temps
from sdlora.models import blockswap, quantize
from sdlora.models.families import FAMILIES, unread_settings
from sdlora.models.families.base import TextConditioning, tokenize
from sdlora.models.load import DTYPES, compute_device, load_base
from sdlora.models.longprompt import encode_long, tokenize_long
from sdlora.models.prompts import check_prompt
from sdlora.training import speed
from sdlora.training.cache import TextEmbeddingCache
from sdlora.training.examples import (
    TrainingData,
    TrainingSamples,
    captions_fixed,
    collect_examples,
    example_latents,
    planned_steps,
    split_held_out,
    warn_cut_captions,
)
from sdlora.training.guards import (
    StopRequest,
    TrainingStopped,
    check_finite,
    total_norm,
)
from sdlora.training.loss import add_pyramid, noise_offset_strength
from sdlora.training.optimizers import make_optimizer, warmup_steps
from sdlora.training.saving import Progress, Saver
from sdlora.training.stats import TrainResult, describe_examples, write_report


def make_accelerator(cfg: Config):
    """The run's Accelerator: its device, mixed precision, gradient accumulation and TensorBoard logs."""
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState, is_initialized
    from accelerate.utils import DataLoaderConfiguration, ProjectConfiguration

    tc, out = cfg.train, cfg.output_dir
    # accelerate keeps one AcceleratorState per process, its mixed precision fixed by the first
    # Accelerator, and has no public way to start over: a second training in one process (a
    # notebook, a sweep) in another precision is refused here, in words, before accelerate's own.
    fixed = AcceleratorState().mixed_precision if is_initialized() else tc.mixed_precision
    if fixed != tc.mixed_precision:
        raise UserError(
            f"{cfg.source or 'training'}: [train] mixed_precision = {tc.mixed_precision!r}, but this Python "
            f"process already trained with {fixed!r}, and accelerate fixes the mixed precision once per "
            f"process. Train in a new process (a new `sdlora train` command, or restart the notebook "
            f"kernel), or keep mixed_precision = {fixed!r} in this one.")
    accelerator = Accelerator(
        cpu=compute_device() == "cpu",  # with no GPU, accelerate only goes multi-process (gloo) when told so
        mixed_precision=tc.mixed_precision,
        gradient_accumulation_steps=tc.gradient_accumulation_steps,
        log_with="tensorboard",
        project_config=ProjectConfiguration(project_dir=str(out), logging_dir=str(out / "logs")),
        dataloader_config=DataLoaderConfiguration(split_batches=True, non_blocking=torch.cuda.is_available()),
    )
    if tc.batch_size % accelerator.num_processes:
        raise UserError(f"{cfg.source}: [train] batch_size = {tc.batch_size} must be divisible by the "
                        f"number of processes ({accelerator.num_processes}): each process takes an equal share")
    return accelerator


def make_network(cfg: Config, base, family, settings, device, log=print):
    """The adapters on the frozen base (`network.inject`), their initial weights the same in every
    process and every run; then network.init_weights, the text layers nothing reads frozen,
    model.quantize and the U-Net's speed settings, gradient checkpointing."""
    from accelerate.utils import set_seed
    from diffusers.training_utils import cast_training_params

    encoders, train_te = base.text_encoders, settings.trains_text_encoder
    for m in (base.unet, base.vae, *encoders):
        m.requires_grad_(False)
    set_seed(cfg.train.seed)
    if family.per_encoder_text:  # adapters on the encoders that train only (FLUX.1's T5 with train_t5), as kohya
        parts = keys.text_parts(family.text_encoders)
        adapted = {part: te for part, te, lr in zip(parts, encoders, settings.text_encoder_lrs) if lr > 0}
        network = inject(base.unet, adapted, cfg.network, log=log, settings=settings, text_order=tuple(parts))
    else:
        network = inject(base.unet, encoders if train_te else None, cfg.network, log=log, settings=settings)
    cast_training_params([base.unet, *encoders], dtype=torch.float32)  # adapters train in fp32 under fp16/bf16
    if cfg.network.init_weights:  # kohya's network_weights: continue from an existing adapter
        try:
            network.load_kohya_state_dict(read_adapter(cfg.network.init_weights)[0])
        except UserError as e:
            raise UserError(f"{cfg.source}: [network] init_weights = {cfg.network.init_weights}: {e}") from None
        log(f"adapters start from {cfg.network.init_weights}")
    if train_te:
        layers = [te.config.num_hidden_layers for te in encoders]
        for part, unread in family.unread_text_layers(cfg.model.clip_skip, layers).items():
            network.freeze_text_layers(part, unread)
    # model.quantize on the frozen base (after injection: adapters stay full precision), then the
    # U-Net's [train] attention / tf32 / channels_last / compile (speed.py).
    for model in (base.unet, *encoders):
        quantize.quantize_frozen(model, cfg.model.quantize)
    done = speed.apply(cfg.train, base.unet, device)
    if done:
        log(f"speed: {', '.join(done)}")
    if cfg.train.gradient_checkpointing:
        base.unet.enable_gradient_checkpointing()
        for part, te in network.models.items():
            if part != "unet":
                te.gradient_checkpointing_enable()
    return network


def text_embedding_cache(cfg: Config, base, encoders: list, device, captions: list[str]) -> TextEmbeddingCache:
    """The frozen text encoders' outputs of every caption, encoded once (or read from the cache);
    then the encoders leave the accelerator: they never run again."""
    def encode(batch: list[str]) -> dict[str, torch.Tensor]:
        ids = tokenize_long(base.tokenizers, batch, cfg.dataset.max_token_length)
        return encode_long(base.family, encoders, [i.to(device) for i in ids], cfg.model.clip_skip).to_dict()

    tokens = "" if cfg.dataset.max_token_length == 75 else f"_tok{cfg.dataset.max_token_length}"
    cache = TextEmbeddingCache(cfg.output_dir / "cache" / "text", base.text_encoders,
                               f"{base.family}_skip{cfg.model.clip_skip}{tokens}", encode)
    cache.fill(captions)
    for te in base.text_encoders:  # the meta device keeps their configs
        te.to("meta")
    return cache


def encoder_output_cache(cfg: Config, base, family, encoders: list, slots: list[int], device,
                         captions: list[str]) -> TextEmbeddingCache:
    """A per-encoder family's (`Family.per_encoder_text`) frozen encoders `slots`: their own outputs of
    every caption ({"1.hidden": ...}), encoded once (or read from the cache); then those encoders leave
    the accelerator, while the trained ones run each step."""
    lengths = family.token_lengths(base.tokenizers)

    def encode(batch: list[str]) -> dict[str, torch.Tensor]:
        ids = tokenize(base.tokenizers, batch, lengths)
        return {f"{i}.{name}": t for i in slots
                for name, t in family.encode_slot(i, encoders[i], ids[i].to(device), cfg.model.clip_skip).items()}

    identity = f"{base.family}_encoders{'-'.join(map(str, slots))}_len{'-'.join(map(str, lengths))}"
    cache = TextEmbeddingCache(cfg.output_dir / "cache" / "text", [encoders[i] for i in slots], identity, encode)
    cache.fill(captions)
    for i in slots:  # the meta device keeps their configs
        encoders[i].to("meta")
    return cache


class Trainer:
    """One training, set up whole: the base and its family, the data, the adapters, the optimizer."""

    def __init__(self, cfg: Config, log=print, manifest=None):
        """manifest: the command's `dataset.Manifest` (None: resolved here)."""
        from diffusers.optimization import get_scheduler

        self.cfg, self.log = cfg, log
        tc = cfg.train
        if cfg.sample.every_n_epochs:  # previews sample these: refuse what they cannot render before training
            for prompt in cfg.sample.prompts:
                check_prompt(prompt, f"{cfg.source or 'config'}: [sample] prompts")
        self.accelerator = acc = make_accelerator(cfg)
        self.weight_dtype = DTYPES[tc.mixed_precision]  # the frozen base; adapters train in fp32
        self.base = base = load_base(cfg.model, dtype=self.weight_dtype)
        self.family = FAMILIES[base.family].for_training(tc)
        if base.detected:  # a single file: say how its family and prediction type were told
            self._main_log(f"base {base.info()}")
        self.objective = self.family.objective(base.noise_scheduler)
        self.latent_format = self.family.latent_format(base.vae)
        for note in [self.family.clip_skip_note(cfg.model.clip_skip), *self.objective.notes()]:
            if note:
                self._main_log(f"warning: {note}")
        # [sample] too when the previews render with it (`sdlora run` then leaves it to the trainer)
        for note in unread_settings(self.family, cfg, ("train", "sample") if cfg.sample.every_n_epochs else ("train",)):
            self._main_log(f"note: {note}")
        self.settings = resolve_settings(cfg, base)  # ranks with Kohya's defaults; checks a rate pair against the encoders
        if self.settings.trains_text_encoder and not self.family.trains_text_encoders:
            raise UserError(f"{cfg.source}: {base.name} is {self.family.title}, whose text encoders sdlora does not "
                            "train yet; set network.train_text_encoder = false (or train.text_encoder_lr = 0)")
        with acc.main_process_first():  # one process rebuilds a stale manifest, the others read it
            dataset = collect_examples(cfg, log=self._main_log, manifest=manifest)  # what config_hash covers
        examples, validation = split_held_out(dataset)
        # A transformer's patch grid (FLUX.1, SD3.x: 16 px); SD's U-Nets take every bucket the config allows, as before.
        m = self.family.size_multiple
        off_grid = sorted({str(ex.bucket) for ex in dataset if m > 8 and (ex.bucket.width % m or ex.bucket.height % m)})
        if off_grid:
            raise UserError(f"{cfg.source}: {self.family.title} needs image sides that are multiples of {m} px, and "
                            f"bucket(s) {', '.join(off_grid[:3])} are not; set [dataset] bucket_reso_steps, "
                            f"min_bucket_reso and resolution to multiples of {m}")
        self.validation_losses: list[tuple[int, float]] = []  # (epoch, loss) of the held-out images
        if validation:
            self._main_log(f"validation: {len(validation)} image(s) held out (dataset.validation_split = "
                           f"{cfg.dataset.validation_split:g}); their loss is logged every epoch")
        warn_cut_captions(base.tokenizers[0], examples, cfg.dataset.max_token_length, self._main_log)

        self.train_te = train_te = self.settings.trains_text_encoder  # text-encoder adapters train
        self.network = make_network(cfg, base, self.family, self.settings, acc.device, self._main_log)
        # before accelerate moves the denoiser to the device: the swapped blocks never arrive there whole
        self.block_swap = blockswap.enable(self.family, base.unet, tc.blocks_to_swap, acc.device, cfg.source)
        if self.block_swap:
            self._main_log(f"block swap: {len(self.block_swap.swapped)} of {len(self.block_swap.blocks)} transformer "
                           f"blocks ({self.block_swap.swapped_bytes() / 2**30:.2f} GiB) stay on the CPU")
        self.te_learning = train_te  # ... and still learn (train.stop_text_encoder_training not reached)
        if tc.stop_text_encoder_training and not train_te:
            self._main_log(f"warning: [train] stop_text_encoder_training = {tc.stop_text_encoder_training} has no "
                           "effect: the text encoder is not trained")
        encoders = [te.to(acc.device) for te in base.text_encoders]
        # Which encoders train (and run each step): each on its own where the family's conditioning joins
        # each encoder's outputs (FLUX.1: CLIP-L, T5 with train_t5), else all or none.
        per_encoder = self.family.per_encoder_text
        lrs = self.settings.text_encoder_lrs
        self.trained_slots = [lr > 0 for lr in lrs] if per_encoder else [train_te] * len(lrs)
        if per_encoder and cfg.dataset.max_token_length > 75:
            raise UserError(f"{cfg.source}: [dataset] max_token_length = {cfg.dataset.max_token_length} chunks CLIP "
                            f"captions for SD; {self.family.title} reads T5's [train] t5_max_length tokens (kohya "
                            "ignores max_token_length for it too); set max_token_length = 75")
        te_cache = None
        captions = [", ".join(ex.tags) for ex in examples + validation]
        frozen = [i for i, trained in enumerate(self.trained_slots) if not trained]
        if per_encoder and frozen and captions_fixed(examples):  # every caption is known now
            te_cache = encoder_output_cache(cfg, base, self.family, encoders, frozen, acc.device, captions)
        elif not per_encoder and not train_te and captions_fixed(examples):
            te_cache = text_embedding_cache(cfg, base, encoders, acc.device, captions)
        latents = example_latents(cfg, base.vae, acc.device, examples + validation, self._main_log)
        self.data = TrainingData(cfg, dataset, latents, te_cache, base.tokenizers, self.family, self.objective,
                                 self.settings.text_dropout_rates)

        # The optimizer and its schedule over the planned steps; accelerate wraps what trains.
        groups = self.network.param_groups(tc.unet_lr, list(self.settings.text_encoder_lrs))
        optimizer = make_optimizer(tc, groups, cfg.source, fused=acc.device.type == "cuda")
        self.steps_per_epoch, self.total_steps, self.epochs = planned_steps(tc, examples)
        lr_scheduler = get_scheduler(
            tc.lr_scheduler, optimizer, num_warmup_steps=warmup_steps(tc, self.total_steps),
            num_training_steps=self.total_steps, num_cycles=tc.lr_scheduler_num_cycles)
        trained = [te for te, t in zip(encoders, self.trained_slots) if t]
        prepared = acc.prepare(base.unet, *trained, optimizer, lr_scheduler)
        self.unet = prepared[0]  # DDP-wrapped when multi-process
        # [CLIP], SDXL's [CLIP-L, OpenCLIP bigG], FLUX.1's [CLIP-L, T5]; the prepared ones when trained, so their
        # gradients are all-reduced
        prepared_encoders = iter(prepared[1:-2])
        self.text_encoders = [next(prepared_encoders) if t else te for te, t in zip(encoders, self.trained_slots)]
        self.optimizer, self.lr_scheduler = prepared[-2], prepared[-1]
        self.trainable = list(self.network.trainable_parameters())  # what the optimizer updates
        self.loader = acc.prepare(torch.utils.data.DataLoader(
            TrainingSamples(self.data, self.data.batches), batch_sampler=self.data.batches,
            pin_memory=acc.device.type == "cuda"))

    def _main_log(self, msg: str) -> None:
        if self.accelerator.is_main_process:
            self.log(msg)

    def encode_text(self, input_ids: list[torch.Tensor]) -> TextConditioning:
        device = self.accelerator.device
        return encode_long(self.base.family, self.text_encoders, [ids.to(device) for ids in input_ids],
                           self.cfg.model.clip_skip)

    def encode_per_encoder(self, batch: dict) -> TextConditioning:
        """A per-encoder family's conditioning: each frozen encoder's cached outputs or its run (with
        autograd where it trains), each example's dropped encoders' outputs zeros (`text_dropout`, kohya's
        sd3 caption dropout), joined by the family."""
        device = self.accelerator.device
        cached = batch.get("text", {})
        outputs = []
        for i, encoder in enumerate(self.text_encoders):
            own = {name.split(".", 1)[1]: v.to(device) for name, v in cached.items() if name.startswith(f"{i}.")}
            if not own:
                with torch.set_grad_enabled(torch.is_grad_enabled() and self.te_learning and self.trained_slots[i]):
                    own = self.family.encode_slot(i, encoder, batch["input_ids"][i].to(device),
                                                  self.cfg.model.clip_skip)
            outputs.append(own)
        if "text_dropout" in batch:
            keep = 1 - batch["text_dropout"].to(device)  # (B, encoders)
            outputs = [{name: v * keep[:, i].reshape(-1, *[1] * (v.dim() - 1)).to(v.dtype) for name, v in out.items()}
                       for i, out in enumerate(outputs)]
        return self.family.join_text(outputs)

    def stop_text_encoder(self, step: int) -> None:
        """train.stop_text_encoder_training (kohya's): once that many optimizer steps are done, the
        text-encoder adapters keep their values: they leave autograd (the encoders then run without
        it, see step()), get no gradient, and optimizers skip parameters without one. They stay in
        the saved adapters and state."""
        stop = self.cfg.train.stop_text_encoder_training
        if not (stop and self.te_learning and step >= stop):
            return
        for part in self.network.models:
            if part != "unet":
                for p in self.network.parameters_of(part):
                    p.requires_grad_(False)
                    p.grad = None
        self.te_learning = False
        self._main_log(f"step {step}: the text-encoder adapters stop training (train.stop_text_encoder_training)")

    # -- the step
    def step(self, batch: dict) -> torch.Tensor:
        """One micro-batch: noise the latents at random timesteps, predict, weighted MSE.

        The batch's random draws (latent sample, noise, offset, timesteps) were made by
        `TrainingSamples` from a generator seeded by (seed, epoch, position in the epoch), not here:
        each example's draws are then the same whichever process takes it and whether or not the
        run was resumed, so one process equals several and a resumed run equals an unbroken one.
        The family says how latents are scaled, noised and conditioned, and what the U-Net predicts.
        """
        tc, objective = self.cfg.train, self.objective
        latents = self.latent_format.scale(batch["latents"])  # (B, 4, h, w)
        noise = batch["noise"]
        if tc.noise_offset:  # shifts the mean colour: learns brighter darks and darker lights
            noise = noise + noise_offset_strength(tc, latents) * batch["offset"]  # (B, 4, 1, 1) per channel
        if "pyramid" in batch:  # multires noise: low frequencies too (after the offset, as kohya)
            noise = add_pyramid(noise, batch["pyramid"])
        timesteps = batch["timesteps"]  # (B,)
        noisy_latents = objective.noisy(latents, noise, timesteps)
        if self.family.per_encoder_text:  # cached or run per encoder (FLUX.1)
            text = self.encode_per_encoder(batch)
        elif "text" in batch:  # cached outputs of the frozen text encoder(s)
            text = TextConditioning.from_dict({k: v.to(self.accelerator.device) for k, v in batch["text"].items()})
        else:
            with torch.set_grad_enabled(torch.is_grad_enabled() and self.te_learning):
                text = self.encode_text(batch["input_ids"])  # (B, 77, d) hidden states (+ SDXL's pooled (B, 1280))
        model_output = self.family.predict(self.unet, noisy_latents, timesteps, text, batch.get("time_ids"),
                                           self.weight_dtype)
        prediction = objective.prediction(model_output, noisy_latents, timesteps)
        target = objective.target(latents, noise, timesteps)
        loss = F.mse_loss(prediction.float(), target.float(), reduction="none").mean(dim=(1, 2, 3))  # (B,)
        weights = objective.loss_weights(timesteps, tc.min_snr_gamma)  # min-SNR (DDPM), the flow's scheme
        if weights is not None:
            loss = loss * weights
        return (loss * batch["loss_weight"]).mean()  # regularisation images: train.prior_loss_weight

    @torch.no_grad()
    def validate(self, epoch: int, step: int) -> None:
        """The held-out images' loss: `validation_batch` (fixed noise, fixed timesteps, full captions)
        through the same `step()`; every process computes it alike, the main one logs it."""
        if not self.data.validation:
            return
        from accelerate.utils import send_to_device

        for m in self.trained_models():
            m.eval()
        with self.accelerator.autocast():
            losses = [self.step(send_to_device(self.data.validation_batch(ex, i), self.accelerator.device)).item()
                      for i, ex in enumerate(self.data.validation)]
        value = sum(losses) / len(losses)
        self.validation_losses.append((epoch, value))
        self.accelerator.log({"loss/validation": value}, step=step)
        self._main_log(f"epoch {epoch}: validation loss {value:.4f}")

    def trained_models(self) -> list:
        return [self.unet] + [te for te, t in zip(self.text_encoders, self.trained_slots) if t]

    # -- the loop
    def run(self, resume: bool = False) -> TrainResult:
        """Train holding the output folder's lock; SIGINT / SIGTERM stop at the next step boundary
        with the state saved for --resume (`StopRequest`)."""
        from tqdm import tqdm

        cfg, acc = self.cfg, self.accelerator
        out = cfg.output_dir
        with contextlib.ExitStack() as stack:
            if acc.is_main_process:  # the other processes belong to the same training
                stack.enter_context(output_lock(out, log=self.log))
                remove_stale_temps(out, log=self.log)
            stop = stack.enter_context(StopRequest(self.log))
            final = cfg.adapter_path(None)
            refuse_final_overwrite(cfg, resume)
            result = TrainResult(adapter=final)
            saver = Saver(cfg, self.base, self.settings, self.network, self.optimizer, self.lr_scheduler, self.data,
                          (self.steps_per_epoch, self.total_steps, self.epochs),
                          Progress(time.time(), 0.0, time.time(), result.adapters), log=self.log)
            start = {"epoch": 0, "batch_in_epoch": 0, "step": 0, "losses": result.losses}
            if resume:
                start = saver.load_state()
                result.losses = start["losses"]
                self._main_log(f"resumed at epoch {start['epoch'] + 1}, step {start['step']}")
            if acc.is_main_process:
                acc.init_trackers("sdlora")
                self.log(f"training {describe_examples(self.data.examples)}, "
                         f"{self.epochs} epochs, {self.steps_per_epoch} steps/epoch, {self.total_steps} steps "
                         f"({acc.num_processes} process(es), {cfg.network.type} on "
                         f"{len(self.network.exported_keys())} modules)")
            # closed on the way out too: an error's line starts on a line of its own
            bar = stack.enter_context(tqdm(total=self.total_steps, initial=start["step"],
                                           disable=not acc.is_main_process, desc="train"))
            step = self.train_epochs(saver, stop, bar, start["epoch"], start["batch_in_epoch"], start["step"],
                                     result.losses)
            bar.close()
            result.vae_encodes = self.data.latents.cache.encodes
            result.te_encodes = self.data.te_cache.encodes if self.data.te_cache is not None else 0
            if acc.is_main_process:
                saver.adapter(final, self.epochs, step)
                saver.state(self.epochs, 0, step, result.losses)
                result.adapters.append(final)
                result.steps, result.seconds = step, saver.progress.seconds()
                result.report = write_report(self, result)
            acc.end_training()
            return result

    def train_epochs(self, saver: Saver, stop: StopRequest, bar, start_epoch: int, skip: int, step: int,
                     losses: list[float]) -> int:
        """The epochs from (start_epoch, its first `skip` batches done, `step` optimizer steps done);
        appends each step's loss to `losses`, returns the last step."""
        cfg, tc, acc = self.cfg, self.cfg.train, self.accelerator
        models = self.trained_models()
        for epoch in range(start_epoch, self.epochs):
            for m in models:
                m.train()
            self.optimizer.train()  # schedule-free optimizers: the training weights (a no-op for others)
            self.data.batches.start_epoch(epoch)
            loader = acc.skip_first_batches(self.loader, skip) if skip else self.loader
            stop.armed = True
            for i, batch in enumerate(loader, start=skip):
                self.stop_text_encoder(step)
                with acc.accumulate(*models):
                    loss = self.step(batch)
                    acc.backward(loss)
                    if acc.sync_gradients:
                        if tc.max_grad_norm:
                            grad_norm = acc.clip_grad_norm_(self.trainable, tc.max_grad_norm)
                        else:
                            grad_norm = total_norm([p.grad for p in self.trainable if p.grad is not None])
                        loss_value = acc.gather(loss.detach()).mean().item()
                        # before the update: a non-finite step never reaches the weights or a file
                        check_finite(cfg, step + 1, epoch + 1, loss_value, float(grad_norm), losses,
                                     overflow_skips=acc.scaler is not None, settings=self.settings)
                    self.optimizer.step()
                    self.lr_scheduler.step()
                    self.optimizer.zero_grad(set_to_none=True)
                if acc.sync_gradients:
                    step += 1
                    losses.append(loss_value)
                    self.log_step(step, loss_value, bar)
                    every_steps = tc.save_every_n_steps
                    if every_steps and step % every_steps == 0 and step < self.total_steps:
                        if acc.is_main_process:
                            path = cfg.adapter_path(step=step)
                            saver.adapter(path, epoch + 1, step)
                            saver.progress.adapters.append(path)
                            saver.state(epoch, i + 1, step, losses)
                        acc.wait_for_everyone()
                    signum = stop.requested(acc)
                    if signum:
                        if acc.is_main_process:
                            saver.state(epoch, i + 1, step, losses)
                        acc.wait_for_everyone()
                        raise TrainingStopped(signum, step, cfg)
                    if step >= self.total_steps:
                        break
            skip = 0
            self.optimizer.eval()  # schedule-free optimizers: validate and save the averaged weights
            self.validate(epoch + 1, step)
            last = epoch + 1 == self.epochs
            every = tc.save_every_n_epochs
            if acc.is_main_process:
                if every and (epoch + 1) % every == 0 and not last:
                    path = cfg.adapter_path(epoch + 1)
                    saver.adapter(path, epoch + 1, step)
                    saver.progress.adapters.append(path)
                    saver.state(epoch + 1, 0, step, losses)
                saver.preview(epoch + 1, step, last)
            acc.wait_for_everyone()
        return step

    def log_step(self, step: int, loss_value: float, bar) -> None:
        """After an optimizer step: the loss and learning rates to TensorBoard and the bar, and kohya's
        max-norm regularisation (train.scale_weight_norms) on the updated weights."""
        lrs = self.lr_scheduler.get_last_lr()
        logs = {"loss": loss_value}
        logs.update({f"lr/{group['name']}": lr for group, lr in zip(self.optimizer.param_groups, lrs)})
        if self.cfg.train.scale_weight_norms:
            keys_scaled, mean_norm, max_key_norm = self.network.apply_max_norm(self.cfg.train.scale_weight_norms)
            logs.update({"max_norm/keys_scaled": keys_scaled, "max_norm/max_key_norm": max_key_norm,
                         "norm/avg_key_norm": mean_norm})  # kohya's names
        self.accelerator.log(logs, step=step)
        bar.update(1)
        bar.set_postfix(loss=f"{loss_value:.4f}", lr=f"{lrs[0]:.2e}")


def refuse_final_overwrite(cfg: Config, resume: bool) -> None:
    """An existing final adapter is kept unless train.overwrite (or --resume) says otherwise; every
    process checks, so none waits for the others."""
    refuse_to_overwrite(cfg.adapter_path(None), cfg.train.overwrite or resume,
                        "set train.overwrite = true (or --set train.overwrite=true)")


def train(cfg: Config, resume: bool = False, log=print, manifest=None) -> TrainResult:
    """manifest: the command's `dataset.Manifest` (None: resolved by the trainer). A kept final
    adapter is refused before the base is loaded, and again when the loop starts."""
    refuse_final_overwrite(cfg, resume)
    return Trainer(cfg, log=log, manifest=manifest).run(resume=resume)
