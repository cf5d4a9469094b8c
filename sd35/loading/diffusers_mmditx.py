"""The diffusers ``SD3Transformer2DModel`` key layout, mapped to the official MMDiT-X layout and back.

One table (:func:`_key_table`) lists, for every official tensor, the diffusers tensor(s) it comes
from and how: copied, concatenated from separate q/k/v, or with its two halves swapped (diffusers
stores the final adaLN and the last, pre-only context adaLN as (scale, shift); the reference as
(shift, scale)). Loading reads the table one way, :mod:`sd35.loading.writers` the other way.
Facts: diffusers ``src/diffusers/loaders/single_file_utils.py``
``convert_sd3_transformer_checkpoint_to_diffusers`` (with ``swap_scale_shift``) and
``scripts/convert_sd3_to_diffusers.py``.
"""

from __future__ import annotations

import re

import torch

from sd35.errors import CheckpointError
from sd35.loading.tensors import LazyTensor, StateDict, concat, lazy, shape_of

COPY, QKV, SWAP = "copy", "qkv", "swap"


def swap_halves(t: torch.Tensor) -> torch.Tensor:
    """Exchange the two halves of ``t`` along dim 0: a SWAP tensor in one layout becomes the other's.

    diffusers stores the final adaLN and the last block's pre-only context adaLN as (scale, shift), the
    official layout (the model's) as (shift, scale); the swap is its own inverse. The one definition for
    everything that crosses between the two layouts: weights loaded and written here, and LoRA adapters
    made for diffusers' order (:class:`sd35.lora.adapters.SwapHalves`, :mod:`sd35.lora.export`).
    """
    a, b = t.chunk(2, dim=0)
    return torch.cat([b, a], dim=0)


def is_diffusers_mmditx(keys) -> bool:
    return "pos_embed.proj.weight" in keys and any(k.startswith("transformer_blocks.") for k in keys)


def _key_table(
    depth: int, attn2_layers: set[int], qk_norm: bool, *, context_pre_only_last: bool = True
) -> list[tuple[str, tuple[str, ...], str]]:
    """(official key, diffusers keys, how) of every tensor. ``context_pre_only_last`` False: the last block
    keeps its full context stream (an SD3 ControlNet's blocks, :mod:`sd35.control.files`)."""
    table: list[tuple[str, tuple[str, ...], str]] = [
        ("pos_embed", ("pos_embed.pos_embed",), COPY),
        ("context_embedder.weight", ("context_embedder.weight",), COPY),
        ("context_embedder.bias", ("context_embedder.bias",), COPY),
        ("final_layer.linear.weight", ("proj_out.weight",), COPY),
        ("final_layer.linear.bias", ("proj_out.bias",), COPY),
    ]
    for p in ("weight", "bias"):
        table += [
            (f"x_embedder.proj.{p}", (f"pos_embed.proj.{p}",), COPY),
            (f"final_layer.adaLN_modulation.1.{p}", (f"norm_out.linear.{p}",), SWAP),
        ]
        for ours, theirs in (("t_embedder", "timestep_embedder"), ("y_embedder", "text_embedder")):
            table += [
                (f"{ours}.mlp.0.{p}", (f"time_text_embed.{theirs}.linear_1.{p}",), COPY),
                (f"{ours}.mlp.2.{p}", (f"time_text_embed.{theirs}.linear_2.{p}",), COPY),
            ]
    for i in range(depth):
        o, d = f"joint_blocks.{i}", f"transformer_blocks.{i}"
        last = context_pre_only_last and i == depth - 1
        for p in ("weight", "bias"):
            table += [
                (f"{o}.x_block.attn.qkv.{p}", tuple(f"{d}.attn.to_{c}.{p}" for c in "qkv"), QKV),
                (f"{o}.context_block.attn.qkv.{p}", tuple(f"{d}.attn.add_{c}_proj.{p}" for c in "qkv"), QKV),
                (f"{o}.x_block.attn.proj.{p}", (f"{d}.attn.to_out.0.{p}",), COPY),
                (f"{o}.x_block.adaLN_modulation.1.{p}", (f"{d}.norm1.linear.{p}",), COPY),
                (
                    f"{o}.context_block.adaLN_modulation.1.{p}",
                    (f"{d}.norm1_context.linear.{p}",),
                    SWAP if last else COPY,
                ),
                (f"{o}.x_block.mlp.fc1.{p}", (f"{d}.ff.net.0.proj.{p}",), COPY),
                (f"{o}.x_block.mlp.fc2.{p}", (f"{d}.ff.net.2.{p}",), COPY),
            ]
            if not last:
                table += [
                    (f"{o}.context_block.attn.proj.{p}", (f"{d}.attn.to_add_out.{p}",), COPY),
                    (f"{o}.context_block.mlp.fc1.{p}", (f"{d}.ff_context.net.0.proj.{p}",), COPY),
                    (f"{o}.context_block.mlp.fc2.{p}", (f"{d}.ff_context.net.2.{p}",), COPY),
                ]
            if i in attn2_layers:
                table += [
                    (f"{o}.x_block.attn2.qkv.{p}", tuple(f"{d}.attn2.to_{c}.{p}" for c in "qkv"), QKV),
                    (f"{o}.x_block.attn2.proj.{p}", (f"{d}.attn2.to_out.0.{p}",), COPY),
                ]
        if qk_norm:
            table += [
                (f"{o}.x_block.attn.ln_q.weight", (f"{d}.attn.norm_q.weight",), COPY),
                (f"{o}.x_block.attn.ln_k.weight", (f"{d}.attn.norm_k.weight",), COPY),
                (f"{o}.context_block.attn.ln_q.weight", (f"{d}.attn.norm_added_q.weight",), COPY),
                (f"{o}.context_block.attn.ln_k.weight", (f"{d}.attn.norm_added_k.weight",), COPY),
            ]
            if i in attn2_layers:
                table += [
                    (f"{o}.x_block.attn2.ln_q.weight", (f"{d}.attn2.norm_q.weight",), COPY),
                    (f"{o}.x_block.attn2.ln_k.weight", (f"{d}.attn2.norm_k.weight",), COPY),
                ]
    return table


def _structure(keys, block_prefix: str, attn2_marker: str, qk_marker: str) -> tuple[int, set[int], bool]:
    blocks = {int(m.group(1)) for k in keys if (m := re.match(rf"{re.escape(block_prefix)}\.(\d+)\.", k))}
    if not blocks:
        raise CheckpointError("transformer weights: no blocks found.")
    attn2 = {
        int(m.group(1))
        for k in keys
        if (m := re.match(rf"{re.escape(block_prefix)}\.(\d+)\.{attn2_marker}", k))
    }
    return max(blocks) + 1, attn2, any(qk_marker in k for k in keys)


def mmditx_from_diffusers(sd: StateDict, what: str = "diffusers transformer") -> dict[str, LazyTensor]:
    """Official-layout lazy tensors from a diffusers ``transformer/`` state dict."""
    depth, attn2, qk = _structure(sd.keys(), "transformer_blocks", r"attn2\.", "norm_q")
    table = _key_table(depth, attn2, qk)
    used = {k for _, theirs, _ in table for k in theirs}
    unknown = sorted(set(sd) - used)
    if unknown:
        more = f" (and {len(unknown) - 5} more)" if len(unknown) > 5 else ""
        raise CheckpointError(
            f"{what}: tensor(s) {', '.join(unknown[:5])}{more} have no place in MMDiT-X; unknown variant."
        )
    return from_table(sd, table, what)


def from_table(
    sd: StateDict, table: list[tuple[str, tuple[str, ...], str]], what: str
) -> dict[str, LazyTensor]:
    """Official-layout lazy tensors of the diffusers tensors ``sd`` as ``table`` (:func:`_key_table`) says."""
    out: dict[str, LazyTensor] = {}
    for ours, theirs, op in table:
        missing = [k for k in theirs if k not in sd]
        if missing:
            raise CheckpointError(
                f"{what}: tensor '{missing[0]}' is missing; the transformer files are incomplete."
            )
        if op == QKV:
            out[ours] = concat([sd[k] for k in theirs], dim=0)
        elif op == SWAP:
            out[ours] = lazy(sd[theirs[0]]).derive(shape_of(sd[theirs[0]]), swap_halves)
        else:
            out[ours] = lazy(sd[theirs[0]])
    return out


def mmditx_to_diffusers(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The diffusers layout of an official-layout state dict (no prefix); used to write test folders."""
    depth, attn2, qk = _structure(sd.keys(), "joint_blocks", r"x_block\.attn2\.", "ln_q")
    out: dict[str, torch.Tensor] = {}
    for ours, theirs, op in _key_table(depth, attn2, qk):
        t = sd[ours]
        if op == QKV:
            out.update(zip(theirs, (c.clone() for c in t.chunk(3, dim=0)), strict=True))
        elif op == SWAP:
            out[theirs[0]] = swap_halves(t)
        else:
            out[theirs[0]] = t
    return out
