"""``sd35 train``: LoRA/DoRA or full fine-tuning of the MMDiT-X with the rectified-flow loss.

One run, in order:

1. checks that cost nothing (config values, the output folder, optional packages), then joins the
   torchrun process group if there is one (:mod:`sd35.train.distributed`);
2. loads the pipeline, and encodes every image and caption once with the frozen VAE and text encoders into
   the disk cache (:func:`sd35.train.cache.build_cache`; a second run reuses it);
3. makes the MMDiT-X trainable: LoRA adapters (:func:`sd35.lora.add_lora`) or every weight; wraps it in
   DDP or FSDP when several processes run; builds AdamW (or bitsandbytes' 8-bit AdamW), the lr schedule
   and the optional EMA; restores a checkpoint with ``resume``;
4. trains ``max_steps`` optimizer steps, each of ``gradient_accumulation`` micro-batches from the bucket
   sampler (:class:`sd35.train.data.BucketBatchSampler`), under bf16 autocast if asked, logging to tqdm
   (loss, it/s, ETA), ``train_log.jsonl`` and optionally TensorBoard; every ``validation_every`` steps it
   renders the validation prompts (with Skip Layer Guidance) to ``samples/``, every ``save_every`` steps it
   writes a checkpoint (:mod:`sd35.train.checkpoint`);
5. writes the final weights: for LoRA ``NAME.safetensors`` (kohya / ComfyUI keys) and
   ``NAME_diffusers.safetensors`` (diffusers / PEFT keys); for full fine-tuning ``NAME.safetensors`` in the
   official single-file layout (``model.diffusion_model.*`` plus the base model's VAE as
   ``first_stage_model.*``), loadable by ``sd35 generate --model`` like the release file. With EMA on, the
   averaged weights are the ones saved. Existing files are never replaced.

Determinism: the noise, noise level, caption dropout and position-grid crop of every sample come from a
generator seeded by (seed, step, micro-batch, sample index) (:func:`sd35.train.loss.draw`), the data order from
the sampler's (seed, epoch), and the LoRA initialisation from ``seed``. So on the CPU a run is exactly
reproducible, and a run resumed from a checkpoint continues exactly as the uninterrupted run would have.
"""

from __future__ import annotations

import json
import math
import random
import re
import time
import warnings
from contextlib import ExitStack, nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from sd35.devices import DTYPES
from sd35.errors import SD35Error, SD35Warning
from sd35.train import checkpoint as ckpt
from sd35.train.config import TrainConfig, validation_error
from sd35.train.distributed import (
    all_mean,
    apply_fsdp,
    barrier,
    full_tensor,
    gather_objects,
    init_distributed,
    like,
    no_sync,
    reshard,
    shutdown,
    wrap_ddp,
)
from sd35.train.ema import EMA
from sd35.train.loss import FlowLoss, NoiseDraw, draw, flow_loss, pos_offset

MMDITX_PREFIX = "model.diffusion_model."
VAE_PREFIX = "first_stage_model."
SAMPLES = "samples"
LOG_FILE = "train_log.jsonl"
# keys that fix which parameters exist: a checkpoint made with other values cannot be resumed
LORA_NAME = "train"
STRUCTURAL_KEYS = ("mode", "lora_rank", "lora_alpha", "lora_targets", "lora_blocks", "dora")


@dataclass
class TrainResult:
    """What a call of :func:`train` did (on rank 0; other ranks get the same step and losses)."""

    start_step: int
    step: int
    losses: list[float] = field(default_factory=list)  # per optimizer step of this call, mean over processes
    outputs: list[Path] = field(default_factory=list)  # final weight files
    samples: list[Path] = field(default_factory=list)  # validation PNGs
    checkpoints: list[Path] = field(default_factory=list)
    trainable: dict[str, torch.Tensor] = field(default_factory=dict)  # final trained weights (CPU, not EMA)


def final_paths(cfg: TrainConfig) -> list[Path]:
    """The finished run's weight files: kohya + diffusers LoRA (DoRA: kohya only, diffusers has no DoRA), or the
    full checkpoint."""
    out = Path(cfg.output_dir)
    if cfg.mode == "full":
        return [out / f"{cfg.name}.safetensors"]
    if cfg.dora:
        return [out / f"{cfg.name}.safetensors"]
    return [out / f"{cfg.name}.safetensors", out / f"{cfg.name}_diffusers.safetensors"]


def check_output_dir(cfg: TrainConfig) -> Path | None:
    """Refuse to overwrite a finished run or to restart an unfinished one; return the checkpoint to resume."""
    out = Path(cfg.output_dir)
    if out.exists() and not out.is_dir():
        raise SD35Error(f"output_dir {out} is a file, not a folder.")
    done = [p for p in final_paths(cfg) if p.exists()]
    if done:
        raise SD35Error(
            f"{out} already holds a finished run ({', '.join(p.name for p in done)}); sd35 never overwrites it. "
            "Choose another output_dir, or another output_name to train on from a checkpoint with --resume."
        )
    found = ckpt.list_checkpoints(out)
    if cfg.resume is None:
        if found:
            raise SD35Error(
                f"{out} holds checkpoints of an unfinished run (up to step {found[-1][0]}); resume = latest (--resume latest) to "
                "continue it, or choose another output_dir."
            )
        return None
    path = ckpt.resolve_resume(cfg.resume, out)
    if _step_of(path) >= cfg.max_steps:
        raise SD35Error(
            f"{path} is at step {_step_of(path)}, already max_steps {cfg.max_steps}; raise max_steps to train further."
        )
    later = [step for step, p in found if p.resolve() != path.resolve() and step > _step_of(path)]
    if later:
        raise SD35Error(
            f"{out} already holds later checkpoints (steps {', '.join(map(str, later))}) than {path.name}; resume "
            "from the latest one, or move them away first (they would be overwritten)."
        )
    return path


def _step_of(path: Path) -> int:
    m = re.fullmatch(r"step-(\d+)", path.name)
    return int(m.group(1)) if m else -1


def check_packages(cfg: TrainConfig) -> None:
    """The optional packages the config asks for, before anything is loaded."""
    if cfg.optimizer == "adamw8bit":
        if cfg.fsdp:
            raise SD35Error("optimizer = adamw8bit does not work with fsdp = true; use optimizer = adamw.")
        try:
            import bitsandbytes  # noqa: F401
        except ImportError:
            raise SD35Error(
                "optimizer = adamw8bit needs the bitsandbytes package: pip install bitsandbytes "
                "(or use optimizer = adamw)."
            ) from None
    if cfg.log_with == "tensorboard":
        try:
            from torch.utils.tensorboard import SummaryWriter  # noqa: F401
        except ImportError:
            raise SD35Error(
                "log_with = tensorboard needs the tensorboard package: pip install tensorboard "
                "(or set log_with = none)."
            ) from None


def lr_lambda(cfg: TrainConfig):
    """The lr factor of 0-based optimizer step s: linear warmup to 1, then constant or cosine to 0."""
    warmup, total, cosine = cfg.lr_warmup_steps, cfg.max_steps, cfg.lr_scheduler == "cosine"

    def factor(s: int) -> float:
        if s < warmup:
            return (s + 1) / warmup
        if not cosine:
            return 1.0
        progress = (s - warmup) / max(1, total - warmup)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))

    return factor


def make_optimizer(cfg: TrainConfig, params: list[nn.Parameter]) -> torch.optim.Optimizer:
    kwargs = dict(
        lr=cfg.learning_rate,
        betas=(cfg.adam_beta1, cfg.adam_beta2),
        eps=cfg.adam_epsilon,
        weight_decay=cfg.weight_decay,
    )
    if cfg.optimizer == "adamw8bit":
        import bitsandbytes as bnb

        return bnb.optim.AdamW8bit(params, **kwargs)
    return torch.optim.AdamW(params, **kwargs)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def _named_trainable(model: nn.Module, params: list[nn.Parameter]) -> dict[str, nn.Parameter]:
    """Trainable parameters by name, in the order of ``params``: their name in ``model``, or for LoRA adapters
    (which sd35.lora keeps outside the module tree) ``<layer>.lora.<up|down|dora_scale>``."""
    names = {id(p): n for n, p in model.named_parameters()}
    try:
        from sd35.lora.patching import iter_patches

        for mname, _, patch, _ in iter_patches(model):
            if patch.name == LORA_NAME:
                for pname, p in patch.adapter.named_parameters():
                    names.setdefault(id(p), f"{mname}.lora.{pname}")
    except ImportError:  # no sd35.lora: full fine-tuning only
        pass
    return {names.get(id(p), f"trainable.{i}"): p for i, p in enumerate(params)}


class TrainModule(nn.Module):
    """The MMDiT-X plus the LoRA adapters it calls through forward hooks, as one module, so that DDP sees (and
    averages the gradients of) the adapters' parameters, which sd35.lora keeps outside the MMDiT-X's tree."""

    def __init__(self, mmditx: nn.Module, adapters: list[nn.Module]):
        super().__init__()
        self.mmditx = mmditx
        self.adapters = nn.ModuleList(adapters)

    def forward(self, *args, **kwargs):
        return self.mmditx(*args, **kwargs)


class Trainer:
    """One training run (see the module doc). ``pipe`` may be a pipeline loaded already (one process only);
    the run changes its MMDiT-X in place."""

    def __init__(self, cfg: TrainConfig, pipe=None):
        cfg.validate()
        self.cfg = cfg
        self.pipe = pipe
        self.out = Path(cfg.output_dir)

    # ------------------------------------------------------------------------------------ set-up

    def run(self) -> TrainResult:
        cfg = self.cfg
        resume = check_output_dir(cfg)
        check_packages(cfg)
        info = init_distributed(cfg.device)
        self.info = info
        ok = False
        try:
            with warnings.catch_warnings():
                if not info.main:
                    warnings.simplefilter("ignore", SD35Warning)
                result = self._run(resume)
            ok = True
            return result
        finally:
            if ok:
                shutdown(info)
            elif info.distributed:
                import torch.distributed as dist

                if dist.is_initialized():
                    dist.destroy_process_group()

    def _load_pipeline(self):
        cfg, info = self.cfg, self.info
        if self.pipe is not None:
            if info.distributed:
                raise SD35Error("a pre-loaded pipeline can only train in a single process.")
            return self.pipe
        from sd35.loading.assemble import load_pipeline

        return load_pipeline(
            cfg.model,
            cfg.text_encoders or None,
            cfg.tokenizers,
            device=info.device,
            dtype=DTYPES[cfg.model_dtype],
        )

    def _check_model_fit(self, pipe) -> None:
        """Settings that depend on the model, checked before anything is cached or created on disk.

        The resolution defaults to the model's image size; a resolution beyond the model's position grid
        would only fail at the first training step, after caching every latent. The validation images are
        one request, checked as ``sd35 generate`` checks it.
        """
        cfg = self.cfg
        if cfg.resolution is None:
            cfg.resolution = max(pipe.defaults.width, pipe.defaults.height)
            cfg.buckets()
        largest = pipe.mmditx.config.max_image_size
        if cfg.resolution > largest:
            raise SD35Error(
                f"resolution {cfg.resolution} px is larger than this model's images can be (at most {largest} px per "
                f"side, its position grid); use at most {largest} (this model's own size is {pipe.defaults.width})."
            )
        if cfg.validation_prompts:
            try:
                pipe.check(cfg.validation_request(cfg.validation_prompts[0]))
            except SD35Error as e:
                raise validation_error(e) from None

    def _build_data(self, pipe):
        from sd35.train.cache import build_cache
        from sd35.train.data import BucketBatchSampler, scan_dataset

        cfg, info = self.cfg, self.info
        samples = scan_dataset(cfg.data_dir)
        cache_dir = Path(cfg.cache_dir) if cfg.cache_dir else self.out / "cache"
        kwargs = dict(
            t5_max_tokens=cfg.caption_t5_tokens,
            batch_size=cfg.batch_size,
            random_crop=cfg.random_crop,
            seed=cfg.seed,
        )
        buckets = cfg.buckets()
        if info.distributed:  # each rank encodes its share, then all read the whole cache
            build_cache(
                pipe,
                samples,
                buckets,
                cache_dir,
                progress=info.main,
                rank=info.rank,
                world_size=info.world_size,
                **kwargs,
            )
            barrier(info)
        dataset = build_cache(
            pipe, samples, buckets, cache_dir, progress=info.main and not info.distributed, **kwargs
        )
        sampler = BucketBatchSampler(
            dataset.bucket_of,
            cfg.batch_size,
            seed=cfg.seed,
            shuffle=cfg.shuffle,
            rank=info.rank,
            world_size=info.world_size,
        )
        return dataset, sampler

    def _offload_text_encoders(self, pipe) -> None:
        """Free the GPU of the text encoders (T5-XXL alone is 9-19 GB) once the captions are cached: the validation
        prompts are encoded now into the pipeline's prompt cache, which answers them from then on, and the encoders
        move to the CPU (any other prompt is encoded there)."""
        cfg = self.cfg
        groups = [[p, cfg.validation_negative_prompt] for p in cfg.validation_prompts]
        groups += [[p] for p in cfg.validation_prompts]  # cfg 1 encodes the prompt alone
        pipe.prompt_cache.size = max(pipe.prompt_cache.size, len(groups))
        with torch.no_grad():
            for group in groups:
                pipe.encode_prompt(group)
        pipe.text.to("cpu")
        if torch.cuda.is_available():
            torch.cuda.empty_cache()

    def _make_trainable(self, mmditx: nn.Module) -> tuple[list[nn.Parameter], list[nn.Module]]:
        """Mark what trains: ``(parameters, LoRA adapter modules)``."""
        cfg = self.cfg
        mmditx.requires_grad_(False)
        if cfg.mode == "full":
            params = list(mmditx.parameters())
            for p in params:
                if p.dtype != torch.float32:
                    raise SD35Error("mode = full needs the model in fp32 (model_dtype = fp32).")
                p.requires_grad_(True)
            return params, []
        from sd35.lora import add_lora
        from sd35.lora.patching import iter_patches

        params = list(
            add_lora(
                mmditx,
                rank=cfg.lora_rank,
                alpha=cfg.alpha,
                targets=tuple(cfg.lora_targets),
                blocks=list(cfg.lora_blocks) if cfg.lora_blocks is not None else None,
                dora=cfg.dora,
                name=LORA_NAME,
            )
        )
        for p in params:
            p.requires_grad_(True)
        adapters = [patch.adapter for _, _, patch, _ in iter_patches(mmditx) if patch.name == LORA_NAME]
        return params, adapters

    def _restore(self, path: Path, named, optimizer, scheduler, ema, sampler) -> int:
        """Load checkpoint ``path`` into the (already wrapped) model and the training state; return its step."""
        cfg, info = self.cfg, self.info
        trainable, ema_state, state = ckpt.load_checkpoint(path)
        saved = state["config"]
        changed = [k for k in STRUCTURAL_KEYS if saved.get(k) != getattr(cfg, k)]
        if changed:
            raise SD35Error(
                f"{path} was trained with other "
                + ", ".join(f"{k} ({saved.get(k)!r}, now {getattr(cfg, k)!r})" for k in changed)
                + "; these must match to resume."
            )
        if set(trainable) != set(named):
            missing = sorted(set(named) - set(trainable))[:3]
            raise SD35Error(f"{path}: the checkpoint's weights do not match this model (missing {missing}).")
        with torch.no_grad():
            for name, p in named.items():
                p.copy_(like(trainable[name], p))
        if ema is not None:
            if ema_state is None:
                warnings.warn(
                    f"{path} has no EMA weights; the EMA starts from the checkpoint's weights.",
                    SD35Warning,
                    stacklevel=3,
                )
                ema.load_state_dict({k: v.detach().clone() for k, v in named.items()})
            else:
                ema.load_state_dict({k: like(v, ema.shadow[k]) for k, v in ema_state.items()})
        if cfg.fsdp and info.distributed:
            from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

            set_optimizer_state_dict(
                self.model, optimizer, state["optimizer"], options=StateDictOptions(full_state_dict=True)
            )
        else:
            optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        if state["world_size"] != info.world_size:
            warnings.warn(
                f"{path} was saved by {state['world_size']} process(es), this run has {info.world_size}: the data "
                "order and random states cannot continue exactly.",
                SD35Warning,
                stacklevel=3,
            )
        rank = info.rank if info.rank < len(state["sampler"]) else 0
        sampler.load_state_dict(state["sampler"][rank])
        ckpt.set_rng_state(state["rng"][rank])
        return int(state["step"])

    def _run(self, resume: Path | None) -> TrainResult:
        cfg, info = self.cfg, self.info
        seed_everything(cfg.seed)
        pipe = self._load_pipeline()
        self._check_model_fit(pipe)  # before the output folder exists, so a refused run leaves nothing behind
        if info.main:
            self.out.mkdir(parents=True, exist_ok=True)
        barrier(info)
        for module in (pipe.vae, pipe.text):
            module.requires_grad_(False)
        dataset, sampler = self._build_data(pipe)
        if info.device.type == "cuda":
            self._offload_text_encoders(pipe)
        mmditx = pipe.mmditx
        params, adapters = self._make_trainable(mmditx)
        mmditx.gradient_checkpointing = cfg.gradient_checkpointing
        mmditx.train()

        # wrapping first: FSDP replaces the parameters by shards, which the optimizer and EMA must hold
        if cfg.fsdp and info.distributed:
            self.model = apply_fsdp(mmditx, info, cfg.mixed_precision == "bf16")
            params = [p for p in mmditx.parameters() if p.requires_grad]
        else:
            if cfg.fsdp:
                warnings.warn(
                    "fsdp = true with a single process: training without sharding.", SD35Warning, stacklevel=2
                )
            self.model = wrap_ddp(TrainModule(mmditx, adapters) if adapters else mmditx, info)
        named = _named_trainable(mmditx, params)
        optimizer = make_optimizer(cfg, params)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(cfg))
        ema = EMA(named, cfg.ema_decay) if cfg.ema else None
        self.mmditx, self.named, self.ema = mmditx, named, ema
        self.optimizer, self.scheduler = optimizer, scheduler
        self.dataset, self.sampler = dataset, sampler

        step = self._restore(resume, named, optimizer, scheduler, ema, sampler) if resume else 0
        result = TrainResult(start_step=step, step=step)
        if step >= cfg.max_steps:
            raise SD35Error(
                f"the checkpoint is at step {step}, which is already max_steps {cfg.max_steps}; "
                "raise max_steps to train further."
            )
        self._train_loop(pipe, step, result)
        result.outputs = self._save_final(pipe)
        result.trainable = {k: full_tensor(p).clone() for k, p in named.items()}
        return result

    # ------------------------------------------------------------------------------------ training

    def _autocast(self):
        if self.cfg.mixed_precision != "bf16":
            return nullcontext()
        return torch.autocast(device_type=self.info.device.type, dtype=torch.bfloat16)

    def _micro_batch(self, indices: list[int], step: int, micro: int) -> tuple[dict, NoiseDraw]:
        """Items of ``indices`` with their random draws applied (caption dropout) and collated."""
        from sd35.train.cache import collate

        cfg = self.cfg
        items = [dict(self.dataset[i]) for i in indices]
        shape = (len(items), *items[0]["latent"].shape)
        noise, sigmas, drops = [], [], []
        crop = (0.0, 0.0)
        for item in items:
            d = draw(
                self.objective,
                (1, *shape[1:]),
                cfg.seed,
                step,
                micro,
                int(item["index"]),
                cfg.caption_dropout,
            )
            noise.append(d.noise)
            sigmas.append(d.sigmas)
            drops.append(d.drop)
            crop = d.crop
            if bool(d.drop[0]):
                empty = self.dataset.empty_text
                item["context"], item["pooled"] = empty["context"], empty["pooled"]
        batch = collate(items)
        return batch, NoiseDraw(torch.cat(noise), torch.cat(sigmas), torch.cat(drops), crop)

    def _next_indices(self) -> list[int]:
        try:
            return next(self._batches)
        except StopIteration:  # the sampler moved on to the next epoch
            self._batches = iter(self.sampler)
            return next(self._batches)

    def _train_loop(self, pipe, step: int, result: TrainResult) -> None:
        cfg, info = self.cfg, self.info
        self.objective = FlowLoss(
            cfg.timestep_sampling,
            cfg.logit_mean,
            cfg.logit_std,
            cfg.mode_scale,
            cfg.shift,
            cfg.loss_weighting,
        )
        self._batches = iter(self.sampler)
        params = list(self.named.values())
        grid = self.mmditx.config.pos_embed_max_size
        patch = self.mmditx.config.patch_size
        writer = self._tensorboard() if info.main else None
        from tqdm import tqdm

        bar = tqdm(
            total=cfg.max_steps,
            initial=step,
            unit="step",
            desc="training",
            dynamic_ncols=True,
            disable=not info.main,
        )
        with ExitStack() as stack:
            stack.callback(bar.close)
            log = stack.enter_context(open(self.out / LOG_FILE, "a", encoding="utf-8")) if info.main else None
            if writer is not None:
                stack.callback(writer.close)
            while step < cfg.max_steps:
                total = 0.0
                for micro in range(cfg.gradient_accumulation):
                    batch, d = self._micro_batch(self._next_indices(), step, micro)
                    latents = batch["latent"].to(info.device)
                    h, w = latents.shape[-2] // patch, latents.shape[-1] // patch
                    offset = pos_offset(grid, h, w, *d.crop) if cfg.pos_embed_crop else None
                    last = micro == cfg.gradient_accumulation - 1
                    with no_sync(self.model, info.distributed and not last):
                        with self._autocast():
                            loss = flow_loss(
                                self.model,
                                latents,
                                batch["pooled"].to(info.device),
                                batch["context"].to(info.device),
                                d.noise.to(info.device),
                                d.sigmas.to(info.device),
                                cfg.loss_weighting,
                                offset,
                            )
                        (loss / cfg.gradient_accumulation).backward()
                    total += float(loss.detach())
                value = all_mean(total / cfg.gradient_accumulation, info)  # every process stops together
                if not math.isfinite(value):
                    raise SD35Error(
                        f"the loss became {value} at step {step + 1}; lower the learning rate "
                        "(or use mixed_precision = bf16 rather than fp16 weights)."
                    )
                if cfg.max_grad_norm > 0:
                    torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm)
                lr = self.scheduler.get_last_lr()[0]
                self.optimizer.step()
                self.scheduler.step()
                self.optimizer.zero_grad(set_to_none=True)
                if self.ema is not None:
                    self.ema.update()
                step += 1
                result.losses.append(value)
                result.step = step
                if info.main:
                    bar.update(1)
                    bar.set_postfix(loss=f"{value:.4f}", lr=f"{lr:.2e}", refresh=False)
                    log.write(json.dumps({"step": step, "loss": value, "lr": lr, "time": time.time()}) + "\n")
                    log.flush()
                    if writer is not None:
                        writer.add_scalar("train/loss", value, step)
                        writer.add_scalar("train/lr", lr, step)
                if cfg.validation_every and step % cfg.validation_every == 0 and step < cfg.max_steps:
                    result.samples += self._validate(pipe, step)
                if cfg.save_every and step % cfg.save_every == 0:
                    path = self._save_checkpoint(step)
                    if path is not None:
                        result.checkpoints.append(path)
            result.samples += self._validate(pipe, step)

    def _tensorboard(self):
        if self.cfg.log_with != "tensorboard":
            return None
        from torch.utils.tensorboard import SummaryWriter

        return SummaryWriter(log_dir=str(self.cfg.logging_dir or self.out / "logs"))

    # ------------------------------------------------------------------------------------ validation

    def _validate(self, pipe, step: int) -> list[Path]:
        """Render the validation prompts (EMA weights if on) to ``samples/``; returns the PNGs written."""
        from sd35.image_io import save_png

        cfg, info = self.cfg, self.info
        if not cfg.validation_prompts:
            return []
        sharded = cfg.fsdp and info.distributed  # the sharded forward needs every process
        written: list[Path] = []
        if info.main or sharded:
            folder = self.out / SAMPLES
            if info.main:
                folder.mkdir(exist_ok=True)
            autocast = self._autocast() if info.device.type == "cuda" else nullcontext()
            was_training = self.mmditx.training
            self.mmditx.eval()
            try:
                with self.ema.applied() if self.ema is not None else nullcontext(), autocast:
                    for i, prompt in enumerate(cfg.validation_prompts):
                        result = pipe.run(cfg.validation_request(prompt))
                        if info.main:
                            path = folder / f"step{step:08d}-{i:02d}.png"
                            written.append(save_png(result.images[0], path, result.infotexts[0]))
                    if sharded:  # inference leaves FSDP's root gathered (with the EMA values): drop that
                        reshard(self.mmditx)
            finally:
                self.mmditx.train(was_training)
        barrier(info)
        return written

    # ------------------------------------------------------------------------------------ saving

    def _optimizer_state(self) -> dict:
        if self.cfg.fsdp and self.info.distributed:
            from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

            return get_optimizer_state_dict(
                self.model, self.optimizer, options=StateDictOptions(full_state_dict=True, cpu_offload=True)
            )
        return self.optimizer.state_dict()

    def _save_checkpoint(self, step: int) -> Path | None:
        cfg, info = self.cfg, self.info
        sharded = cfg.fsdp and info.distributed
        path = None
        if info.main or sharded:
            trainable = {k: full_tensor(p) for k, p in self.named.items()}
            ema = (
                {k: full_tensor(v) for k, v in self.ema.state_dict().items()}
                if self.ema is not None
                else None
            )
            optim = self._optimizer_state()
        rngs = gather_objects(ckpt.rng_state(), info)
        samplers = gather_objects(self.sampler.state_dict(), info)
        if info.main:
            state: dict[str, Any] = {
                "step": step,
                "epoch": self.sampler.epoch,
                "optimizer": optim,
                "scheduler": self.scheduler.state_dict(),
                "sampler": samplers,
                "rng": rngs,
                "world_size": info.world_size,
                "config": cfg.to_dict(),
            }
            path = ckpt.save_checkpoint(self.out, step, trainable, ema, state, cfg.keep_checkpoints)
        barrier(info)
        return path

    def _metadata(self) -> dict[str, str]:
        """What every final file records about the run (besides sd35.lora's own LoRA metadata)."""
        from sd35._version import __version__

        cfg = self.cfg
        return {
            "sd35_version": __version__,
            "sd35_training": json.dumps(cfg.to_dict(), sort_keys=True),
            "sd35_steps": str(cfg.max_steps),
            "sd35_ema": "true" if cfg.ema else "false",
            "sd35_base_file": Path(cfg.model).name,
            "sd35_mode": cfg.mode,
        }

    def _save_final(self, pipe) -> list[Path]:
        cfg, info = self.cfg, self.info
        sharded = cfg.fsdp and info.distributed
        paths = final_paths(cfg)
        dtype = DTYPES[cfg.save_dtype]
        with self.ema.applied() if self.ema is not None and (info.main or sharded) else nullcontext():
            if cfg.mode == "lora":
                if info.main:
                    from sd35.lora import export_lora, export_metadata, save_lora

                    for path, fmt in zip(paths, ("kohya", "diffusers"), strict=False):
                        tensors = export_lora(self.mmditx, LORA_NAME, format=fmt, dtype=dtype)
                        meta = {**self._metadata(), **export_metadata(self.mmditx, LORA_NAME, format=fmt)}
                        save_lora(path, tensors, meta)
            else:
                tensors = None
                if info.main or sharded:
                    tensors = {
                        MMDITX_PREFIX + k: full_tensor(v).to(dtype)
                        for k, v in self.mmditx.state_dict().items()
                    }
                if info.main:
                    vae = pipe.vae.state_dict().items()
                    tensors.update({VAE_PREFIX + k: v.detach().cpu().to(dtype) for k, v in vae})
                    ckpt.write_new_safetensors(tensors, paths[0], self._metadata())
        barrier(info)
        return paths if info.main else []


def train(cfg: TrainConfig, pipe=None) -> TrainResult:
    """Run one training (see the module doc); ``pipe``: an already loaded pipeline (single process)."""
    return Trainer(cfg, pipe).run()
