"""``sd35 convert`` as a user runs it: every target from the command line (the output then inspects and loads),
and one clear ``sd35: error:`` line with exit code 2, and nothing written, for each request it cannot do."""

from __future__ import annotations

import pytest
from safetensors.torch import save_file

from sd35.loading.components import scan
from sd35.loading.tensors import materialize
from tests.helpers import run_cli


@pytest.mark.parametrize(
    "args,expect",
    [
        (["{official}", "{tmp}/m-Q5_1.gguf"], "MMDiT-X as GGUF Q5_1"),
        (["{official}", "{tmp}/m.gguf", "--quant", "q4_0"], "MMDiT-X as GGUF Q4_0"),
        (["{official}", "{tmp}/m.gguf"], "MMDiT-X as GGUF F16"),
        (["{official}", "{text_encoders}", "{tmp}/sd3.5_diffusers"], "diffusers folder"),
        (["{diffusers}", "{tmp}/all.safetensors", "--dtype", "bf16"], "as bfloat16"),
        (["{all_in_one}", "{tmp}/fp8.safetensors", "--to", "scaled_fp8"], "fp8 scaled: MMDiT-X, T5-XXL"),
    ],
)
def test_convert_writes_each_target(capsys, tmp_path, tiny, args, expect):
    paths = {k: str(v) for k, v in tiny.items()} | {"tmp": str(tmp_path)}
    args = [a.format(**paths) for a in args]
    code, out, err = run_cli(capsys, "convert", *args)
    assert code == 0 and err == "" and expect in out
    written = next(a for a in args if a.startswith(str(tmp_path)))
    code, out, _ = run_cli(capsys, "inspect", written)
    assert code == 0 and "MMDiT-X" in out


def _vae_only(tmp_path, tiny):
    vae = next(c for c in scan([tiny["official"]]) if c.kind == "vae")
    save_file({k: materialize(t) for k, t in vae.tensors.items()}, tmp_path / "vae.safetensors")
    return tmp_path / "vae.safetensors"


REFUSALS = [
    (["{official}", "{tmp}/taken.gguf"], "already exists; sd35 convert never overwrites"),
    (["{official}", "{tmp}/no_folder/m.gguf"], "the output's folder does not exist"),
    (["{official}", "{tmp}/m.ckpt"], "writes .safetensors, .gguf or a diffusers folder, not .ckpt"),
    (["{official}", "{tmp}/m-Q4_K_M.gguf"], "GGUF type Q4_K_M is not one sd35 convert writes"),
    (["{official}", "{tmp}/m.gguf", "--quant", "IQ2_XS"], "GGUF type IQ2_XS is not one sd35 convert writes"),
    (["{official}", "{tmp}/m.safetensors", "--quant", "Q8_0"], "--quant Q8_0 applies to GGUF output only"),
    (["{official}", "{tmp}/m.gguf", "--dtype", "fp16"], "--dtype fp16 applies to safetensors output"),
    (["{official}", "{tmp}/m.safetensors", "--to", "gguf"], "--to gguf writes a .gguf file"),
    (["{official}", "{tmp}/m.gguf", "--to", "diffusers"], "--to diffusers writes a folder"),
    (["{official}", "{tmp}/out_diffusers"], "the inputs lack CLIP-L, CLIP-G, T5-XXL"),
    (["{text_encoders}", "{tmp}/te.gguf"], "a GGUF file holds one network"),
    (["{vae}", "{tmp}/vae.gguf"], "a GGUF file holds one network"),
    (["{clip_l}", "{tmp}/c.safetensors", "--to", "scaled_fp8"], "the inputs hold neither"),
    (["{official}", "{official}", "{tmp}/two.safetensors"], "weights were given: "),
    (["{tmp}/missing.safetensors", "{tmp}/m.safetensors"], "no such file or folder"),
    (["{tmp}/taken.gguf", "{tmp}/m.safetensors"], "truncated or of another format"),
    (["{tmp}/m.safetensors"], "name the model files or folders to convert, then the output"),
]


@pytest.mark.parametrize("args,message", REFUSALS)
def test_convert_refusals_are_one_clear_line(capsys, tmp_path, tiny, args, message):
    (tmp_path / "taken.gguf").write_bytes(b"not really")
    paths = {k: str(v) for k, v in tiny.items()} | {"tmp": str(tmp_path)}
    paths |= {
        "vae": str(_vae_only(tmp_path, tiny)),
        "clip_l": str(tiny["text_encoders"] / "clip_l.safetensors"),
    }
    before = sorted(p.name for p in tmp_path.iterdir())
    code, out, err = run_cli(capsys, "convert", *[a.format(**paths) for a in args])
    assert code == 2 and out == ""
    assert err.startswith("sd35: error:") and err.count("\n") == 1 and message in err, err
    assert sorted(p.name for p in tmp_path.iterdir()) == before  # nothing written, no temporary file left
    assert (tmp_path / "taken.gguf").read_bytes() == b"not really"
