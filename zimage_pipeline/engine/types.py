"""What the engine is asked for and what it hands back.

Defaults follow Z-Image-Turbo's model card for diffusers 0.42.1: 1024x1024, guidance 0.0
and 8 inference steps. In that version ``num_inference_steps=N`` means N transformer
forwards over the sigmas ``linspace(1, 1/N, N)`` (shifted) followed by the terminal 0,
so N=8 is the distilled 8-forward schedule with no wasted forward (older releases needed
``9`` to get the same 8 forwards). bench/NOTES.md shows the numbers.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Protocol

from zimage_pipeline.engine.errors import InvalidGenerationSpec

DEFAULT_WIDTH = 1024
DEFAULT_HEIGHT = 1024
DEFAULT_STEPS = 8
DEFAULT_GUIDANCE_SCALE = 0.0
# The VAE downsamples by 8 and the transformer patchifies by 2.
SIZE_MULTIPLE = 16
MIN_SIDE = 64
MAX_SIDE = 4096
MAX_STEPS = 100
MAX_GUIDANCE_SCALE = 50.0
MAX_SEED = 2**63 - 1
# What an image is made from: a prompt alone, a prompt and an init image, or a prompt, an
# init image and a mask (white = repaint). One set of weights serves all three.
TEXT_TO_IMAGE = "text_to_image"
IMAGE_TO_IMAGE = "image_to_image"
INPAINT = "inpaint"
TASKS = (TEXT_TO_IMAGE, IMAGE_TO_IMAGE, INPAINT)
DEFAULT_STRENGTH = 0.6


BatchKey = tuple[int, int, int, float, str, float, tuple[tuple[str, float], ...]]


class SpecLike(Protocol):
    """Anything with GenerationSpec's fields (the service's ImageSpec fits)."""

    @property
    def prompt(self) -> str: ...
    @property
    def negative_prompt(self) -> str | None: ...
    @property
    def width(self) -> int: ...
    @property
    def height(self) -> int: ...
    @property
    def steps(self) -> int: ...
    @property
    def guidance_scale(self) -> float: ...
    @property
    def seed(self) -> int: ...


@dataclass(frozen=True, slots=True)
class GenerationSpec:
    """One image to generate. The caller always chooses the seed."""

    prompt: str
    seed: int
    negative_prompt: str | None = None
    width: int = DEFAULT_WIDTH
    height: int = DEFAULT_HEIGHT
    steps: int = DEFAULT_STEPS
    guidance_scale: float = DEFAULT_GUIDANCE_SCALE
    task: str = TEXT_TO_IMAGE
    # RGB PIL images of the spec's size (image_to_image, inpaint); the mask in mode L.
    init_image: Any = None
    mask_image: Any = None
    strength: float = DEFAULT_STRENGTH  # how much of the init image is repainted (0..1]
    # LoRA adapters of the engine's catalogue, (name, weight) in the request's order.
    adapters: tuple[tuple[str, float], ...] = ()

    def __post_init__(self) -> None:
        validate_spec(self)

    @classmethod
    def of(cls, spec: SpecLike) -> GenerationSpec:
        if isinstance(spec, GenerationSpec):
            return spec
        return cls(
            prompt=spec.prompt,
            seed=spec.seed,
            negative_prompt=spec.negative_prompt,
            width=spec.width,
            height=spec.height,
            steps=spec.steps,
            guidance_scale=spec.guidance_scale,
            task=getattr(spec, "task", TEXT_TO_IMAGE),
            init_image=getattr(spec, "init_image", None),
            mask_image=getattr(spec, "mask_image", None),
            strength=getattr(spec, "strength", DEFAULT_STRENGTH),
            adapters=tuple(getattr(spec, "adapters", ())),
        )

    @property
    def batch_key(self) -> BatchKey:
        """Specs with equal keys can share one batch (one latent shape, one schedule, one
        task and strength, one set of adapters and weights: the same pipeline call)."""
        return (
            self.width,
            self.height,
            self.steps,
            self.guidance_scale,
            self.task,
            self.strength,
            self.adapters,
        )


def validate_spec(spec: GenerationSpec) -> None:
    problems: list[str] = []
    if not isinstance(spec.prompt, str) or not spec.prompt.strip():
        problems.append("prompt must be a non-empty string")
    for name, side in (("width", spec.width), ("height", spec.height)):
        if not MIN_SIDE <= side <= MAX_SIDE or side % SIZE_MULTIPLE:
            problems.append(
                f"{name} must be a multiple of {SIZE_MULTIPLE} in [{MIN_SIDE}, {MAX_SIDE}], got {side}"
            )
    if not 1 <= spec.steps <= MAX_STEPS:
        problems.append(f"steps must be in [1, {MAX_STEPS}], got {spec.steps}")
    if not math.isfinite(spec.guidance_scale) or not (
        0.0 <= spec.guidance_scale <= MAX_GUIDANCE_SCALE
    ):
        problems.append(
            f"guidance_scale must be in [0, {MAX_GUIDANCE_SCALE}], got {spec.guidance_scale}"
        )
    if isinstance(spec.seed, bool) or not 0 <= spec.seed <= MAX_SEED:
        problems.append(f"seed must be an integer in [0, 2**63-1], got {spec.seed}")
    problems += _task_problems(spec)
    names = [name for name, _ in spec.adapters]
    if len(set(names)) != len(names):
        problems.append(f"adapters named twice: {names}")
    for name, weight in spec.adapters:
        if not (math.isfinite(weight) and -2.0 <= weight <= 2.0):
            problems.append(f"adapter {name!r}: weight must be in [-2, 2], got {weight}")
    if problems:
        raise InvalidGenerationSpec("; ".join(problems))


def _task_problems(spec: GenerationSpec) -> list[str]:
    if spec.task not in TASKS:
        return [f"task must be one of {', '.join(TASKS)}, got {spec.task!r}"]
    problems = []
    needs_image = spec.task != TEXT_TO_IMAGE
    if needs_image != (spec.init_image is not None):
        problems.append(f"{spec.task} takes {'an' if needs_image else 'no'} init image")
    if (spec.task == INPAINT) != (spec.mask_image is not None):
        problems.append(f"{spec.task} takes {'a' if spec.task == INPAINT else 'no'} mask")
    for name, image in (("init image", spec.init_image), ("mask", spec.mask_image)):
        size = getattr(image, "size", None)
        if image is not None and size != (spec.width, spec.height):
            problems.append(f"the {name} is {size}, not the spec's {spec.width}x{spec.height}")
    if needs_image and not (math.isfinite(spec.strength) and 0.0 < spec.strength <= 1.0):
        problems.append(f"strength must be in (0, 1], got {spec.strength}")
    return problems


@dataclass(frozen=True, slots=True)
class StageTimings:
    """Seconds of the batch an image was generated in (shared by its images): encode and
    denoise between CUDA events on the GPU's stream (host clock on the CPU), decode the
    rest of the wall-clock total."""

    batch_size: int
    encode_prompt_s: float
    denoise_s: float
    decode_s: float
    total_s: float


@dataclass(frozen=True, slots=True)
class GeneratedImage:
    """One image: ``image`` is a ``PIL.Image.Image`` in RGB mode."""

    image: Any
    seed: int
    width: int
    height: int
    steps: int
    guidance_scale: float
    timings: StageTimings
    oom_splits: int = 0  # how often its batch was halved after running out of memory
