"""Live preview (sd35/preview.py): a latent becomes a small RGB image without the VAE."""

from __future__ import annotations

import numpy as np
import torch

from sd35.preview import latent_preview


def test_latent_preview_is_an_image_of_the_right_size():
    preview = latent_preview(torch.randn(1, 16, 6, 4))
    assert preview.size == (32, 48) and preview.mode == "RGB"
    assert np.asarray(preview).std() > 0
