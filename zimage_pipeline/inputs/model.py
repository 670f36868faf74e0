"""Input grants as the policy states them, parsed once: `"bucket/prefix"` strings of the
policy's `[inputs]` table (publisher -> grants) become InputGrant objects when the policy
is loaded, so a malformed grant is an error of the policy file (startup, or a refused
reload that keeps the last good policy), never a surprise of one request.

A grant names a bucket (S3's naming rules) and, optionally, a folder in it: "in" and
"in/" both mean the folder `in/`, which allows "in/a.png", never "inx/a.png". A folder
has no empty, `.` or `..` segments and no control characters (the rules of keys,
s3names); a bucket alone ("bucket" or "bucket/") grants the whole bucket."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from zimage_pipeline import s3names


@dataclass(frozen=True, slots=True)
class InputGrant:
    bucket: str
    folder: str = ""  # without a trailing "/"; "" is the whole bucket

    def allows(self, bucket: str, key: str) -> bool:
        if bucket != self.bucket:
            return False
        return not self.folder or key.startswith(self.folder + "/")

    def __str__(self) -> str:
        return f"{self.bucket}/{self.folder}/" if self.folder else f"{self.bucket}/"


def parse_grant(text: str) -> InputGrant:
    """The grant `text` ("bucket/prefix") names, or ValueError saying what is wrong."""
    bucket, _, prefix = text.partition("/")
    problem = s3names.bucket_problem(bucket)
    if problem is not None:
        raise ValueError(f"grant {text!r}: bucket {bucket!r} {problem}")
    folder = prefix.removesuffix("/")
    if folder:
        problem = s3names.key_problem(folder)
        if problem is not None:
            raise ValueError(f"grant {text!r}: prefix {prefix!r} {problem}")
    return InputGrant(bucket, folder)


def parse_grants(table: Mapping[str, object]) -> dict[str, tuple[InputGrant, ...]]:
    """Each publisher's grants parsed (as read from TOML: a list of "bucket/prefix"
    strings; parsed ones pass as they are); ValueError naming the publisher and grant."""
    parsed: dict[str, tuple[InputGrant, ...]] = {}
    for publisher, grants in table.items():
        if isinstance(grants, str | bytes) or not isinstance(grants, Sequence):
            raise ValueError(
                f"publisher {publisher!r}: a list of 'bucket/prefix' strings, "
                f"not {type(grants).__name__}"
            )
        items: list[InputGrant] = []
        for grant in grants:
            if isinstance(grant, InputGrant):
                items.append(grant)
            elif isinstance(grant, str):
                try:
                    items.append(parse_grant(grant))
                except ValueError as exc:
                    raise ValueError(f"publisher {publisher!r}: {exc}") from None
            else:
                raise ValueError(
                    f"publisher {publisher!r}: grant {grant!r} is not a 'bucket/prefix' string"
                )
        parsed[publisher] = tuple(items)
    return parsed
