"""The ``sd35`` command: ``inspect`` on every layout, and one clear line with exit code 2 for bad input."""

from __future__ import annotations

import subprocess
import sys

import pytest

from sd35.cli import main
from sd35.inspect import mmditx_family
from sd35.models.mmditx import MMDiTXConfig
from sd35.testing import write_tiny_set


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return write_tiny_set(tmp_path_factory.mktemp("tiny"))


def _run(capsys, *args):
    code = main(list(args))
    out = capsys.readouterr()
    return code, out.out, out.err


def test_inspect_official_file_names_layout_and_missing_parts(capsys, tiny):
    code, out, _ = _run(capsys, "inspect", str(tiny["official"]))
    assert code == 0
    assert "[official single file]" in out
    assert "MMDiT-X" in out and "attn2 in blocks 0-1" in out and "VAE" in out
    missing = out.split("still lacks:")[1]
    assert "CLIP-L" in missing and "clip_l.safetensors" in missing
    assert "CLIP-G" in missing and "T5-XXL" in missing and "t5xxl_fp16" in missing
    assert "MMDiT-X" not in missing


@pytest.mark.parametrize(
    "layout,expect",
    [
        ("all_in_one", "[all-in-one (MMDiT + VAE + text encoders)]"),
        ("diffusers", "[diffusers folder]"),
    ],
)
def test_inspect_complete_layouts(capsys, tiny, layout, expect):
    code, out, _ = _run(capsys, "inspect", str(tiny[layout]))
    assert code == 0
    assert expect in out
    for name in ("MMDiT-X", "VAE", "CLIP-L", "CLIP-G", "T5-XXL"):
        assert f"  {name}" in out
    assert "Complete" in out


def test_inspect_text_encoder_folder_and_combination(capsys, tiny):
    code, out, _ = _run(capsys, "inspect", str(tiny["text_encoders"]))
    assert code == 0 and "HF transformers CLIP" in out and "HF transformers T5 encoder" in out
    lacks = out.split("still lacks:")[1]
    assert "MMDiT-X" in lacks and "VAE" in lacks and "CLIP" not in lacks
    code, out, _ = _run(capsys, "inspect", str(tiny["official"]), str(tiny["text_encoders"]))
    assert code == 0 and "Complete" in out


def test_inspect_reports_dtype_and_parameters(capsys, tiny):
    _, out, _ = _run(capsys, "inspect", str(tiny["official"]))
    assert "fp32" in out and "M parameters" in out


def test_family_names_of_the_real_configs():
    base = dict(patch_size=2, in_channels=16, out_channels=16, pooled_dim=2048, context_dim=4096)
    sd35m = MMDiTXConfig(
        hidden_size=1536,
        depth=24,
        pos_embed_max_size=384,
        mlp_hidden=6144,
        qk_norm=True,
        attn2_layers=tuple(range(13)),
        **base,
    )
    sd3m = MMDiTXConfig(
        hidden_size=1536,
        depth=24,
        pos_embed_max_size=192,
        mlp_hidden=6144,
        qk_norm=False,
        attn2_layers=(),
        **base,
    )
    sd35l = MMDiTXConfig(
        hidden_size=2432,
        depth=38,
        pos_embed_max_size=192,
        mlp_hidden=9728,
        qk_norm=True,
        attn2_layers=(),
        **base,
    )
    assert mmditx_family(sd35m) == "SD3.5 Medium" and sd35m.max_image_size == 6144
    assert mmditx_family(sd3m) == "SD3 Medium"
    assert mmditx_family(sd35l).startswith("SD3.5 Large")


def test_bad_input_is_one_line_and_exit_2(capsys, tmp_path):
    bad = tmp_path / "model.safetensors"
    bad.write_bytes(b"<html>Access denied</html>")
    code, out, err = _run(capsys, "inspect", str(bad))
    assert code == 2
    assert err.startswith("sd35: error: ") and str(bad) in err and "text file" in err
    assert len(err.strip().splitlines()) == 1


def test_console_script_never_shows_a_traceback(tmp_path):
    missing = tmp_path / "nope.safetensors"
    proc = subprocess.run(
        [sys.executable, "-m", "sd35.cli", "inspect", str(missing)], capture_output=True, text=True
    )
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr and "no such file" in proc.stderr
