"""The whole-image benchmark: prompt to pixels (text encoding + sampling + VAE decode), ours against diffusers'.

Both pipelines load one diffusers-layout folder of random weights written for the run, and make the same
image: the same prompt, sampler (Euler; diffusers' ``FlowMatchEulerDiscreteScheduler``), shift, CFG scale and
seed, so the pixel difference between them is reported too. diffusers runs twice: doing our work (T5 padded
to the length we use), which compares the engines, and with its own default (T5 padded to 256), which is
what a user of each gets out of the box.
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

import torch

from sd35.bench.options import BenchOptions
from sd35.bench.random_models import write_random_pipeline
from sd35.bench.report import Report, error_text, log
from sd35.bench.timing import free_memory, time_once

PROMPT = "a red fox sitting in fresh snow at sunrise, photograph"
CFG_SCALE = 4.5
SHIFT = 3.0
IMAGE_SEED = 1234


def _image_diff(ours, theirs) -> dict[str, float]:
    """Our PIL image against diffusers' float array, both on a 0-1 scale."""
    import numpy as np

    a = np.asarray(ours, dtype=np.float32) / 255.0
    b = np.asarray(theirs, dtype=np.float32)
    return {
        "image_max_abs_diff_vs_ours": float(np.abs(a - b).max()),
        "image_mean_abs_diff_vs_ours": float(np.abs(a - b).mean()),
    }


def _memory_modes(opts: BenchOptions) -> tuple[str | None, ...]:
    """Our memory modes to run: the requested ones, else one run with the pipeline's default."""
    return opts.memory or (None,)


def _whole_ours(opts: BenchOptions, folder: Path, mode: str | None) -> tuple[dict, object]:
    """Load our pipeline (in ``mode``), warm it up with a 2-step image, then time one whole image."""
    from sd35.loading.assemble import load_pipeline

    row: dict = {"engine": "ours", "variant": "default" if mode is None else f"memory={mode}", "memory": mode}
    image = None
    try:
        t0 = time.perf_counter()
        pipe = load_pipeline(
            folder, device=opts.device, dtype=opts.dtype, **({} if mode is None else {"memory": mode})
        )
        row["load_s"] = time.perf_counter() - t0
        row["t5_tokens"] = int(pipe.tokenizer([PROMPT, ""], t5_max_tokens=256).t5.shape[1])

        def generate(steps: int):
            size = opts.image_size
            return pipe.generate(
                PROMPT,
                width=size,
                height=size,
                steps=steps,
                cfg=CFG_SCALE,
                sampler="euler",
                shift=SHIFT,
                seed=IMAGE_SEED,
            )

        _, row["warmup_s"], _ = time_once(opts.device, lambda: generate(2))
        images, row["seconds"], row["peak_gib"] = time_once(opts.device, lambda: generate(opts.steps))
        image = images[0]
        row["status"] = "ok"
    except Exception as e:  # one failing mode must not cost the other rows
        row["status"] = f"failed: {error_text(e)}"
        log(f"our whole image ({row['variant']}) failed: {error_text(e)}")
    pipe = None
    free_memory(opts.device)
    return row, image


def _whole_diffusers(
    opts: BenchOptions, folder: Path, runs: list, report: Report, ours_image, t5_tokens: int
) -> None:
    """diffusers doing our work (the same T5 length) and its own default (T5 padded to 256)."""
    import transformers
    from diffusers import StableDiffusion3Pipeline
    from diffusers.utils import logging as diffusers_logging

    diffusers_logging.disable_progress_bar()  # the loading bars would bury the table in the log
    transformers.logging.disable_progress_bar()
    row0 = {"engine": "diffusers"}
    try:
        t0 = time.perf_counter()
        pipe = StableDiffusion3Pipeline.from_pretrained(folder, dtype=opts.dtype).to(opts.device)
        row0["load_s"] = time.perf_counter() - t0
    except Exception as e:
        runs.append({**row0, "variant": "same work", "status": f"failed: {error_text(e)}"})
        report.save()
        return
    pipe.set_progress_bar_config(disable=True)
    size = opts.image_size

    def generate(steps: int, tokens: int, pipe=pipe):
        return pipe(
            prompt=PROMPT,
            negative_prompt="",
            height=size,
            width=size,
            num_inference_steps=steps,
            guidance_scale=CFG_SCALE,
            max_sequence_length=tokens,
            generator=torch.Generator().manual_seed(IMAGE_SEED),
            output_type="np",
        ).images[0]

    for variant, tokens in (("same work", t5_tokens), ("default", 256)):
        row = {**row0, "variant": variant, "t5_tokens": tokens}
        try:
            _, row["warmup_s"], _ = time_once(opts.device, lambda t=tokens: generate(2, t))
            image, row["seconds"], row["peak_gib"] = time_once(
                opts.device, lambda t=tokens: generate(opts.steps, t)
            )
            if variant == "same work" and ours_image is not None:
                row.update(_image_diff(ours_image, image))
            row["status"] = "ok"
        except Exception as e:
            row["status"] = f"failed: {error_text(e)}"
            log(f"diffusers whole image ({variant}) failed: {error_text(e)}")
        runs.append(row)
        report.save()
        row0.pop("load_s", None)  # loading counted once
    del pipe
    free_memory(opts.device)


def run_whole_image(opts: BenchOptions, report: Report) -> None:
    """Prompt to pixels with each pipeline, from one folder of random weights written for this run."""
    runs: list[dict] = []
    report.data["whole_image"] = {
        "config": "full" if opts.full else "tiny",
        "width": opts.image_size,
        "height": opts.image_size,
        "steps": opts.steps,
        "cfg": CFG_SCALE,
        "sampler": "euler (diffusers: FlowMatchEulerDiscreteScheduler)",
        "shift": SHIFT,
        "prompt": PROMPT,
        "memory_modes": list(opts.memory) or None,
        "runs": runs,
    }
    with tempfile.TemporaryDirectory(prefix="sd35-bench-") as tmp:
        t0 = time.perf_counter()
        folder = write_random_pipeline(Path(tmp) / "sd35-random", opts)
        report.data["whole_image"]["write_s"] = time.perf_counter() - t0
        report.save()
        modes = _memory_modes(opts)
        with torch.inference_mode():
            # our first mode, then diffusers, then our other modes: a slow offloading mode cut short by a
            # time limit then costs only its own row
            for i, mode in enumerate(modes):
                log(f"whole image with ours ({mode or 'default'})")
                row, image = _whole_ours(opts, folder, mode)
                runs.append(row)
                report.save()
                if i == 0:
                    log("whole image with diffusers")
                    _whole_diffusers(opts, folder, runs, report, image, row.get("t5_tokens", 77))
