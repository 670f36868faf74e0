"""Where a publisher's input images may be read from: the policy's grants, parsed when it
loads (inputs/model.py). A grant's prefix is a folder: "in" and "in/" allow "in/a.png",
never "inx/a.png"."""

from __future__ import annotations

from collections.abc import Iterable

from zimage_pipeline.inputs.model import InputGrant
from zimage_pipeline.messages import ImageRef


def is_allowed(ref: ImageRef, grants: Iterable[InputGrant]) -> bool:
    return any(grant.allows(ref.bucket, ref.key) for grant in grants)
