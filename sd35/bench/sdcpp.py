"""stable-diffusion.cpp's ``sd-cli`` as a benchmark-only peer: the weights it reads, its command, its log.

sd.cpp is not a dependency (``benchmarks/build_sdcpp.sh`` builds it outside the repository); this module
only writes random weights in a layout it reads, runs the binary and reads its timings back.

What sd.cpp expects of an SD3.5-Medium-layout MMDiT-X (``src/mmdit.hpp``, ``MMDiT::MMDiT``, in the
stable-diffusion-cpp-python 0.4.7 sdist): the depth is the highest ``joint_blocks.N`` + 1 and the width is
*computed*, hidden = 64 * depth with depth heads; the text width is fixed at 4096 (T5-XXL), the pooled width
at 2048 (CLIP-L + CLIP-G), the position grid at 384 x 384 once any block has ``attn2`` (which it expects in
blocks 0..d for some d), and the MLP ratio at 4. :func:`comparison_config` is our config that satisfies all
of that at any depth: depth 24 is SD3.5 Medium itself.

What it feeds the model: one 77-token chunk of CLIP-L|CLIP-G features and one of T5 (:data:`SDCPP_TEXT_TOKENS`
= 154 tokens), cond and uncond as two separate forwards per CFG step. Text encoders it does not get are
replaced by zeros (``SD3CLIPEmbedder``), but with none at all it makes an empty condition and crashes
(segmentation fault), and with CLIP-L alone it aborts concatenating the pooled vectors (a rank mismatch
between CLIP-L's pooled output and CLIP-G's zeros). So it gets random CLIP-L and CLIP-G at their real shapes
(their architectures are fixed in its source: no tiny stand-in is possible) and no T5 (zeros); the text
encoders run once per image, outside the steps timed here.

Timing: its progress line ``|====| k/N - X.XXs/it`` (or ``it/s`` under a second) carries the *average* time
per step since sampling began, so step k ended at k * X seconds. The steady-state step is
``(t_N - t_1) / (N - 1)``: the first step (graph allocation) is left out, nothing else is subtracted.
The run is stopped once ``sampling completed`` is logged: the VAE decode that follows is not part of a step.
"""

from __future__ import annotations

import dataclasses
import os
import re
import shutil
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from sd35.errors import SD35Error
from sd35.loading.safetensors_io import save_file_atomic
from sd35.models.clip import CLIPTextEncoder
from sd35.models.configs import medium_configs, medium_mmditx_config
from sd35.models.mmditx import HEAD_DIM, MMDiTX, MMDiTXConfig
from sd35.models.random_init import build_random
from sd35.models.vae import VAE, VAEConfig

SDCPP_TYPES = ("f16", "q8_0", "f32")  # --type values timed: its fast ones first
SDCPP_TEXT_TOKENS = 77 + 77  # one CLIP chunk + one T5 chunk (sd.cpp's SD3CLIPEmbedder)
DEFAULT_BINARY = Path("build/bin/sd-cli")  # under $SDCPP_HOME (benchmarks/build_sdcpp.sh)
_PROGRESS = re.compile(r"(\d+)/(\d+) - ([0-9.]+)(s/it|it/s)")
_SAMPLING_DONE = re.compile(r"sampling completed, taking ([0-9.]+)s")


def comparison_config(depth: int) -> MMDiTXConfig:
    """SD3.5 Medium's MMDiT-X at ``depth`` blocks, in the shape sd.cpp infers from the weights (module doc):
    hidden 64 * depth, text 4096, pooled 2048, 384 grid, attn2 in the first 13/24 of the blocks as SD3.5M."""
    hidden = HEAD_DIM * depth
    return dataclasses.replace(
        medium_mmditx_config(),
        hidden_size=hidden,
        depth=depth,
        mlp_hidden=4 * hidden,
        attn2_layers=tuple(range(round(depth * 13 / 24))),
    )


def sdcpp_home() -> Path:
    """Where ``benchmarks/build_sdcpp.sh`` builds sd.cpp: ``$SDCPP_HOME``, by default /work/sdcpp."""
    return Path(os.environ.get("SDCPP_HOME", "/work/sdcpp"))


def sdcpp_weights_dir() -> Path:
    """Where the weight files sd.cpp reads are written once and reused: ``$SDCPP_WEIGHTS``, by default
    ``weights/`` in :func:`sdcpp_home`."""
    return Path(os.environ.get("SDCPP_WEIGHTS", sdcpp_home() / "weights"))


def find_sdcpp(path: str | os.PathLike | None = None) -> Path | None:
    """The ``sd-cli`` binary: ``path`` if given (an SD35Error if it is not an executable file), else
    ``$SDCPP_HOME/build/bin/sd-cli`` (default home /work/sdcpp), else ``sd-cli`` on PATH, else None."""
    if path is not None:
        p = Path(path)
        if not (p.is_file() and os.access(p, os.X_OK)):
            raise SD35Error(
                f"--sdcpp {p}: no executable there; build it with benchmarks/build_sdcpp.sh "
                "(it prints the binary's path) or leave --sdcpp out."
            )
        return p
    home = sdcpp_home()
    for candidate in (home / DEFAULT_BINARY, shutil.which("sd-cli")):
        if candidate is not None and Path(candidate).is_file() and os.access(candidate, os.X_OK):
            return Path(candidate)
    return None


@dataclass(frozen=True)
class SdcppTiming:
    """One sd.cpp run's sampling, read from its log (seconds)."""

    steps: int
    step_s: float  # steady state: (t_N - t_1) / (N - 1)
    first_step_s: float
    sampling_s: float | None  # its "sampling completed, taking" total, when logged

    @property
    def mean_step_s(self) -> float | None:
        """The whole sampling time over the steps (first step included), as its log states it."""
        return None if self.sampling_s is None else self.sampling_s / self.steps


def parse_sdcpp_log(text: str) -> SdcppTiming:
    """Step times from sd.cpp's log (module doc); only progress lines before ``sampling completed`` count,
    so a tiled VAE decode's progress bar after it is never read as sampling."""
    done = _SAMPLING_DONE.search(text)
    sampling_part = text[: done.start()] if done else text
    ends: dict[int, float] = {}
    total = None
    for m in _PROGRESS.finditer(sampling_part):
        k, n, value = int(m.group(1)), int(m.group(2)), float(m.group(3))
        per_step = value if m.group(4) == "s/it" else 1.0 / value
        ends[k] = k * per_step
        total = n
    if total is None or total not in ends or 1 not in ends:
        raise SD35Error(
            "stable-diffusion.cpp's log has no complete sampling progress (k/N - X s/it); "
            "the run failed or its log format changed: see the log above."
        )
    steady = (ends[total] - ends[1]) / (total - 1) if total > 1 else ends[1]
    return SdcppTiming(
        steps=total,
        step_s=steady,
        first_step_s=ends[1],
        sampling_s=float(done.group(1)) if done else None,
    )


def write_sdcpp_files(
    folder: Path, cfg: MMDiTXConfig, seed: int, dtype: torch.dtype = torch.float32
) -> dict[str, Path]:
    """Random weights sd.cpp reads, in ``dtype`` (its ``--type`` converts them at load): the official single
    file (``model.diffusion_model.*`` with SD3.5M's VAE as ``first_stage_model.*``) and HF-layout CLIP-L and
    CLIP-G files (the module doc says why it needs them).

    The MMDiT-X is drawn as :func:`sd35.models.random_init.build_random` draws ours with ``seed`` and ``dtype``,
    so all engines hold the same weights (bfloat16 halves the full-width file to 5 GB). Written once per
    config and reused (the files are large)."""
    folder.mkdir(parents=True, exist_ok=True)
    tag = {torch.float32: "f32", torch.bfloat16: "bf16", torch.float16: "f16"}[dtype]
    model = folder / f"sd3.5m-depth{cfg.depth}-seed{seed}-{tag}.safetensors"
    clips = {name: folder / f"{name}.safetensors" for name in ("clip_l", "clip_g")}
    if not model.exists():
        mmditx = build_random(MMDiTX, cfg, "cpu", dtype, seed).state_dict()
        vae = build_random(VAE, VAEConfig(), "cpu", dtype, seed + 1).state_dict()
        tensors = {f"model.diffusion_model.{k}": v for k, v in mmditx.items()}
        tensors.update({f"first_stage_model.{k}": v for k, v in vae.items()})
        save_file_atomic({k: v.contiguous() for k, v in tensors.items()}, model)
    for name, path in clips.items():  # float16 halves CLIP-G's 2.8 GB; sd.cpp converts at load
        if not path.exists():
            cfg_clip = getattr(medium_configs(), name)
            enc = build_random(CLIPTextEncoder, cfg_clip, "cpu", torch.float16, seed + 2)
            keep = name == "clip_g"  # SD3's clip_l file has no text_projection, its clip_g file has one
            state = {
                k: v.contiguous() for k, v in enc.state_dict().items() if keep or "text_projection" not in k
            }
            save_file_atomic(state, path)
    return {"model": model, **clips}


def sdcpp_command(
    binary: Path,
    files: dict[str, Path],
    *,
    size: int,
    steps: int,
    wtype: str,
    threads: int,
    output: Path,
    seed: int = 0,
) -> list[str]:
    """One txt2img run at ``size`` px with CFG 4.5 (so each step is a CFG step) and Euler, as SD3.5's default."""
    return [
        str(binary),
        "-m",
        str(files["model"]),
        "--clip_l",
        str(files["clip_l"]),
        "--clip_g",
        str(files["clip_g"]),
        "-p",
        "a photo of a cat",
        "--cfg-scale",
        "4.5",
        "--sampling-method",
        "euler",
        "--steps",
        str(steps),
        "-W",
        str(size),
        "-H",
        str(size),
        "--type",
        wtype,
        "-t",
        str(threads),
        "-s",
        str(seed),
        "-o",
        str(output),
    ]


def run_sdcpp(command: list[str], *, timeout_s: float = 1800.0) -> tuple[SdcppTiming, float, str]:
    """Run sd.cpp and stop it once its log says sampling completed (the VAE decode that follows is no step);
    returns the timing read from its log, the wall seconds of the process and the log (for errors)."""
    t0 = time.perf_counter()
    proc = subprocess.Popen(
        command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, errors="replace"
    )
    assert proc.stdout is not None
    chunks: list[str] = []
    try:
        for line in proc.stdout:
            chunks.append(line)
            if _SAMPLING_DONE.search(line):
                proc.terminate()
                break
            if time.perf_counter() - t0 > timeout_s:
                proc.kill()
                raise SD35Error(f"stable-diffusion.cpp ran past {timeout_s:.0f} s: {' '.join(command)}")
    finally:
        proc.wait()
    wall = time.perf_counter() - t0
    log_text = "".join(chunks)
    try:
        return parse_sdcpp_log(log_text), wall, log_text
    except SD35Error as e:
        raise SD35Error(f"{e}\n{log_text[-2000:]}") from None
