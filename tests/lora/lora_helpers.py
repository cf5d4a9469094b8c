"""Shared pieces of the LoRA tests: tiny models, seeded random tensors, independent reference formulas."""

from __future__ import annotations

import torch

from sd35.models.configs import tiny_configs
from tests.helpers import COMPONENTS, mmditx_inputs, tiny_models

D = 128  # tiny MMDiT-X hidden size (sd35.models.configs.tiny_configs)


def make_models(t5: bool = True, attn2: tuple[int, ...] = (0, 1)) -> dict:
    """Fresh tiny models (each test may change them): mmditx (3 blocks, attn2 in 0-1, block 2 pre-only), clip_l/g, t5
    (None with ``t5=False``)."""
    models = tiny_models(3, *COMPONENTS[: 4 if t5 else 3], attn2=attn2)
    return models if t5 else {**models, "t5": None}


def lora_models(pipe) -> dict:
    """The networks of an SD3Pipeline a LoRA can change, by role (``SD3Pipeline.components`` without the VAE)."""
    return {role: m for role, m in pipe.components.items() if role != "vae"}


def snapshot(models: dict) -> dict[str, torch.Tensor]:
    return {
        f"{c}.{k}": v.detach().clone()
        for c, m in models.items()
        if m is not None
        for k, v in m.state_dict().items()
    }


def assert_same(models: dict, snap: dict[str, torch.Tensor]) -> None:
    now = snapshot(models)
    assert now.keys() == snap.keys()
    for k, v in snap.items():
        a, b = now[k], v
        if a.dtype in (torch.float8_e4m3fn, torch.float8_e5m2):
            a, b = a.view(torch.uint8), b.view(torch.uint8)
        assert torch.equal(a, b), k


def weight(models: dict, comp: str, name: str) -> torch.Tensor:
    return models[comp].get_submodule(name).weight.detach().clone()


class Rand:
    """Seeded random tensors at a scale that makes every LoRA change visible."""

    def __init__(self, seed: int = 0):
        self.g = torch.Generator().manual_seed(seed)

    def __call__(self, *shape: int, scale: float = 0.1) -> torch.Tensor:
        return torch.randn(*shape, generator=self.g) * scale


def swap(t: torch.Tensor) -> torch.Tensor:
    a, b = t.chunk(2, dim=0)
    return torch.cat([b, a])


def lora_delta(up, down, alpha=None):
    r = down.shape[0]
    scale = 1.0 if alpha is None else alpha / r
    return scale * (up.reshape(up.shape[0], -1) @ down.reshape(r, -1))


def loha_delta(w1a, w1b, w2a, w2b, alpha=None):
    scale = 1.0 if alpha is None else alpha / w1b.shape[0]
    return scale * (w1a @ w1b) * (w2a @ w2b)


def tucker(t, wa, wb):
    """W[p, q, ...] = sum_ij t[i, j, ...] wa[i, p] wb[j, q], by explicit loops over the rank."""
    out = torch.zeros(wa.shape[1], wb.shape[1], *t.shape[2:])
    for i in range(t.shape[0]):
        for j in range(t.shape[1]):
            out += t[i, j] * (wa[i][:, None] * wb[j][None, :]).reshape(
                wa.shape[1], wb.shape[1], *([1] * (t.dim() - 2))
            )
    return out


def kron(a, b):
    """Kronecker product by blocks (not torch.kron)."""
    rows = [torch.cat([a[i, j] * b for j in range(a.shape[1])], dim=1) for i in range(a.shape[0])]
    return torch.cat(rows, dim=0)


def dora(w, delta, m, axis):
    """m * V / ||V||, norm per input column (axis 1: m [1, in]) or per output row (axis 0: m [out])."""
    v = w + delta
    if axis == 1:
        norm = v.pow(2).sum(dim=0, keepdim=True).sqrt()
        return v * (m.reshape(1, -1) / norm)
    norm = v.pow(2).sum(dim=1, keepdim=True).sqrt()
    return v * (m.reshape(-1, 1) / norm)


def inputs(seed: int = 1, batch: int = 2, hw: int = 8):
    """Seeded MMDiT-X inputs: an ``hw`` x ``hw`` latent at timesteps 700 and 20, 7 context tokens."""
    return mmditx_inputs(tiny_configs().mmditx, torch.tensor([700.0, 20.0][:batch]), (hw, hw), 7, seed)


def tokens(seed: int = 2):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 500, (2, 9), generator=g)


def outputs(models: dict) -> list[torch.Tensor]:
    """The MMDiT-X output plus every text encoder's output, for comparing two ways of applying a LoRA."""
    with torch.no_grad():
        out = [models["mmditx"](*inputs())]
        tok = tokens()
        clip_tok = torch.cat([tok, torch.full((2, 1), 999)], dim=1)  # pooled at the end-of-text token
        for c in ("clip_l", "clip_g"):
            res = models[c](clip_tok)
            out += list(res) if isinstance(res, tuple) else [res]
        if models.get("t5") is not None:
            out.append(models["t5"](tok))
    return out


def mixed_lora(models: dict, seed: int = 0, scale: float = 0.1) -> dict[str, torch.Tensor]:
    """One state dict with every adapter kind and several layouts (kohya, diffusers, LyCORIS, generic)."""
    r = Rand(seed)

    def lo(out, inp, rank=3):
        return r(out, rank, scale=scale), r(rank, inp, scale=scale)

    sd: dict[str, torch.Tensor] = {}
    for key, out, inp in [
        ("lora_unet_joint_blocks_0_x_block_attn_qkv", 3 * D, D),
        ("lora_unet_joint_blocks_1_x_block_attn2_qkv", 3 * D, D),
        ("lora_unet_joint_blocks_2_context_block_attn_qkv", 3 * D, D),
        ("lora_unet_final_layer_adaLN_modulation_1", 2 * D, D),
        ("lora_te1_text_model_encoder_layers_0_self_attn_q_proj", 64, 64),
        ("lora_te2_text_model_encoder_layers_0_mlp_fc1", 256, 128),
        ("lora_te3_encoder_block_0_layer_0_SelfAttention_k", 128, 256),
    ]:
        up, down = lo(out, inp)
        sd.update(
            {f"{key}.lora_up.weight": up, f"{key}.lora_down.weight": down, f"{key}.alpha": torch.tensor(2.0)}
        )
    up, down = r(D, 2, 1, 1, scale=scale), r(2, 16, 2, 2, scale=scale)
    sd.update(
        {"lora_unet_x_embedder_proj.lora_up.weight": up, "lora_unet_x_embedder_proj.lora_down.weight": down}
    )
    # kohya DoRA (column magnitudes)
    w = models["mmditx"].get_submodule("joint_blocks.1.x_block.attn.proj").weight.detach()
    up, down = lo(D, D)
    key = "lora_unet_joint_blocks_1_x_block_attn_proj"
    sd.update({f"{key}.lora_up.weight": up, f"{key}.lora_down.weight": down})
    sd[f"{key}.dora_scale"] = w.norm(dim=0, keepdim=True) * (1 + r(1, D))
    # diffusers split q/k with a PEFT DoRA magnitude on k, swapped last-block adaLN
    w = models["mmditx"].get_submodule("joint_blocks.1.context_block.attn.qkv").weight.detach()
    for c in "qk":
        up, down = lo(D, D)
        sd[f"transformer.transformer_blocks.1.attn.add_{c}_proj.lora_B.weight"] = up
        sd[f"transformer.transformer_blocks.1.attn.add_{c}_proj.lora_A.weight"] = down
    sd["transformer.transformer_blocks.1.attn.add_k_proj.lora_magnitude_vector"] = w[D : 2 * D].norm(
        dim=1
    ) * (1 + r(D))
    up, down = lo(2 * D, D)
    sd["transformer.transformer_blocks.2.norm1_context.linear.lora_B.weight"] = up
    sd["transformer.transformer_blocks.2.norm1_context.linear.lora_A.weight"] = down
    # LyCORIS LoHa and LoKr
    key = "lycoris_transformer_blocks_0_ff_net_2"
    sd.update(
        {
            f"{key}.hada_w1_a": r(D, 2, scale=0.5),
            f"{key}.hada_w1_b": r(2, 512, scale=0.5),
            f"{key}.hada_w2_a": r(D, 2, scale=0.5),
            f"{key}.hada_w2_b": r(2, 512, scale=0.5),
        }
    )
    key = "lycoris_transformer_blocks_0_attn2_to_v"
    sd.update({f"{key}.lokr_w1": r(8, 8, scale=0.3), f"{key}.lokr_w2": r(16, 16, scale=0.3)})
    # full diff with a bias
    sd["diffusion_model.joint_blocks.2.x_block.mlp.fc1.diff"] = r(512, D, scale=scale)
    sd["diffusion_model.joint_blocks.2.x_block.mlp.fc1.diff_b"] = r(512, scale=scale)
    return sd
