"""Which release of the SD3 family an MMDiT-X is: SD3.5 Medium, SD3.5 Large, SD3.5 Large Turbo or SD3 Medium.

The releases differ in shape (Stability-AI/sd3.5 ``sd3_impls.py`` ``BaseModel.__init__`` reads each from the
keys; diffusers ``single_file_utils.py`` ``infer_diffusers_model_type`` tells them apart the same way):

============  =====  ======  =========  =====================  ========
release       depth  hidden  pos grid   dual attention (attn2)  qk-norm
============  =====  ======  =========  =====================  ========
SD3.5 Medium  24     1536    384x384    blocks 0-12             rms
SD3.5 Large   38     2432    192x192    none                    rms
SD3 Medium    24     1536    192x192    none                    none
============  =====  ======  =========  =====================  ========

SD3.5 Large Turbo is SD3.5 Large distilled (same shapes, other weights), so only what the file says of
itself tells it apart: its safetensors metadata (``modelspec.title``, ``modelspec.architecture``), a GGUF's
``general.name``, or its file name (``sd3.5_large_turbo.safetensors``, as the reference's ``CONFIGS`` keys
it). A model of no release's size (a pruned model, the tiny test models) is named by those same hints when
they name a release whose structure it has; otherwise it is "an MMDiT-X of another configuration". A user
can always say which it is (:func:`identify`'s ``override``), e.g. for a renamed Turbo file.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal, get_args

from sd35.errors import InvalidRequest

if TYPE_CHECKING:  # only its attributes are read: no import of the network here
    from sd35.models.mmditx import MMDiTXConfig

Variant = Literal["medium", "large", "large-turbo", "sd3-medium"]
VARIANTS: tuple[Variant, ...] = get_args(Variant)
OTHER = "an MMDiT-X of another configuration"

# The metadata keys whose text may name the release (safetensors modelspec, then GGUF general.*).
NAME_KEYS = ("modelspec.title", "modelspec.architecture", "general.name", "general.basename")


@dataclass(frozen=True)
class Release:
    """One release's name and the shape facts it is recognised by."""

    variant: Variant
    title: str
    depth: int
    hidden_size: int
    pos_embed_max_size: int
    dual_attention: bool  # whether some blocks' x stream has attn2 (MMDiT-X); SD3.5 Medium's only
    qk_norm: bool

    def has_structure_of(self, cfg: MMDiTXConfig) -> bool:
        """Whether ``cfg`` is built like this release (attn2 and qk-norm), whatever its size."""
        return bool(cfg.attn2_layers) == self.dual_attention and cfg.qk_norm == self.qk_norm

    def has_shape_of(self, cfg: MMDiTXConfig) -> bool:
        """Whether ``cfg`` is this release's network at its released size."""
        return self.has_structure_of(cfg) and (cfg.depth, cfg.hidden_size, cfg.pos_embed_max_size) == (
            self.depth,
            self.hidden_size,
            self.pos_embed_max_size,
        )


RELEASES: dict[Variant, Release] = {
    "medium": Release("medium", "SD3.5 Medium", 24, 1536, 384, True, True),
    "large": Release("large", "SD3.5 Large", 38, 2432, 192, False, True),
    "large-turbo": Release("large-turbo", "SD3.5 Large Turbo", 38, 2432, 192, False, True),
    "sd3-medium": Release("sd3-medium", "SD3 Medium", 24, 1536, 192, False, False),
}


def release_from_shape(cfg: MMDiTXConfig) -> Variant | None:
    """The release whose network ``cfg`` is ("large" for a Large Turbo too: their shapes are the same)."""
    for variant in ("medium", "large", "sd3-medium"):
        if RELEASES[variant].has_shape_of(cfg):
            return variant
    return None


def mmditx_family(cfg: MMDiTXConfig) -> str:
    """The release a transformer's shapes name, for messages that have no file to read (LoRA metadata and
    errors): "SD3.5 Large (or Large Turbo)" since shapes cannot tell those two apart."""
    variant = release_from_shape(cfg)
    if variant is None:
        return OTHER
    return "SD3.5 Large (or Large Turbo)" if variant == "large" else RELEASES[variant].title


def variant_from_text(text: str) -> Variant | None:
    """The release a name or metadata value names: ``sd3.5_large_turbo``, "Stable Diffusion 3.5 Large",
    ``stable-diffusion-v3-medium``, ``sd3_medium_incl_clips`` ... (None when it names none)."""
    s = re.sub(r"[\s_]+", "-", text.lower())
    if "turbo" in s:  # the only Turbo release of the family is Large's
        return "large-turbo"
    if "large" in s:
        return "large"
    if "medium" in s:
        if re.search(r"3\.5|3-5|sd35|v35", s):
            return "medium"
        if re.search(r"sd3|v3|diffusion-3", s):
            return "sd3-medium"
    return None


def check_variant(name: str) -> Variant:
    """``name`` as a :data:`Variant`, or a clear error listing them."""
    if name not in VARIANTS:
        raise InvalidRequest(
            f"unknown model variant {name!r}; use one of {', '.join(VARIANTS)}.", param="variant"
        )
    return name  # type: ignore[return-value]


@dataclass(frozen=True)
class Identity:
    """Which release a loaded MMDiT-X is (None: no release), and what said so (for ``sd35 inspect``)."""

    variant: Variant | None
    evidence: str

    @property
    def title(self) -> str:
        return RELEASES[self.variant].title if self.variant else OTHER


def identify(
    cfg: MMDiTXConfig,
    metadata: dict[str, object] | None = None,
    name: str = "",
    override: str | None = None,
) -> Identity:
    """Which release ``cfg`` is, from its shapes, then its file's ``metadata`` (:data:`NAME_KEYS`) and ``name``.

    ``override`` (a :data:`Variant`) wins, if the network has that release's structure: defaults chosen for
    a network built otherwise would be a guess, so that is refused. Shapes of a release decide over any
    hint, except that Large's shapes with a hint of Turbo are Turbo.
    """
    if override is not None:
        release = RELEASES[check_variant(override)]
        if not release.has_structure_of(cfg):
            raise InvalidRequest(
                f"this model is not built like {release.title} (attn2 in {len(cfg.attn2_layers)} blocks, qk-norm "
                f"{'on' if cfg.qk_norm else 'off'}), so it cannot be that variant; leave the variant out to "
                "detect it from the weights.",
                param="variant",
            )
        return Identity(release.variant, "as the variant option says")
    hints = [(f"{k} '{metadata[k]}'", str(metadata[k])) for k in NAME_KEYS if metadata and k in metadata]
    if name:
        hints.append((f"the name '{name}'", name))
    fitting = _fitting_hints(cfg, hints)
    by_shape = release_from_shape(cfg)
    if by_shape == "large" and "large-turbo" in fitting:
        return Identity("large-turbo", f"its shapes, and {fitting['large-turbo']}")
    if by_shape is not None:
        return Identity(by_shape, "its shapes")
    for variant in ("large-turbo", *VARIANTS):  # the more specific hint first
        if variant in fitting:
            return Identity(variant, fitting[variant])
    return Identity(None, "its shapes match no release and nothing names one")


def _fitting_hints(cfg: MMDiTXConfig, hints: Iterable[tuple[str, str]]) -> dict[Variant, str]:
    """Variant -> the first hint that names it, for the variants whose structure ``cfg`` has."""
    found: dict[Variant, str] = {}
    for where, text in hints:
        variant = variant_from_text(text)
        if variant is not None and RELEASES[variant].has_structure_of(cfg):
            found.setdefault(variant, where)
    return found
