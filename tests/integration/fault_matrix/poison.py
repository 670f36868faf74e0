"""A fuzzed stream of malformed requests, each one known to be wrong and why.

Every generator breaks a valid request in one way that the contract forbids and says
which words the rejection must contain (the field it names, or what is wrong with the
body), so a test can check that each bad message is refused for the right reason rather
than merely refused. The choices are drawn from a seeded `random.Random`: a failure
names its seed, and ZIMAGE_FUZZ_SEED replays it.
"""

from __future__ import annotations

import json
import random
import string
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from tests.integration.fault_matrix.stack import request

MAX_BODY_BYTES = 65536


@dataclass(frozen=True, slots=True)
class Poison:
    body: bytes
    expect: str  # a word the rejection's message must contain
    reason: str = "INVALID_REQUEST"
    routing_key: str = "standard"  # the queue it goes to (an unbound key would drop it)
    anonymous: bool = False  # published without an AMQP user_id


def _dumps(document: Any) -> bytes:
    return json.dumps(document, ensure_ascii=False).encode()


def _base(rng: random.Random, n: int) -> dict[str, Any]:
    return {"priority": "standard", **request(f"bad-{n}", prompt=_text(rng))}


def _text(rng: random.Random) -> str:
    alphabet = string.ascii_letters + " äöü中文字"
    return "".join(rng.choice(alphabet) for _ in range(rng.randint(1, 40))).strip() or "x"


def random_bytes(rng: random.Random, n: int) -> Poison:
    junk = bytes(rng.randrange(256) for _ in range(rng.randint(1, 200)))
    return Poison(b"\xff" + junk, "UTF-8")  # 0xff never starts a UTF-8 sequence


def truncated_json(rng: random.Random, n: int) -> Poison:
    text = _dumps(_base(rng, n)).decode()
    # Cut between characters, not inside one: a cut multi-byte character would make the
    # body invalid UTF-8 (rejected as that, rightly), not the truncated JSON meant here.
    return Poison(text[: rng.randint(1, len(text) - 1)].encode(), "not valid JSON")


def not_an_object(rng: random.Random, n: int) -> Poison:
    value = rng.choice([[1, 2], "request", 42, None, True])
    return Poison(_dumps(value), "expected a JSON object")


def wrong_type(rng: random.Random, n: int) -> Poison:
    field, value = rng.choice(
        [
            ("width", "64"),
            ("steps", 2.5),
            ("prompt", 123),
            ("num_images", True),
            ("labels", ["a"]),
            ("seed", "7"),
            ("on_behalf_of", {"uid": "alice"}),
        ]
    )
    return Poison(_dumps({**_base(rng, n), field: value}), field)


def out_of_range(rng: random.Random, n: int) -> Poison:
    field, value = rng.choice(
        [
            ("width", 72),
            ("height", 4096),
            ("steps", 0),
            ("num_images", 9),
            ("guidance_scale", -1.0),
            ("seed", -1),
            ("quality", 101),
            ("prompt", ""),
            ("prompt", "   "),
            ("prompt", "x" * 4001),
            ("format", "gif"),
            ("priority", "urgent"),
            ("expires_at", "2030-01-01T00:00:00"),
            ("on_behalf_of", "alice\x00"),
        ]
    )
    return Poison(_dumps({**_base(rng, n), field: value}), field)


def unknown_field(rng: random.Random, n: int) -> Poison:
    name = "x_" + "".join(rng.choice(string.ascii_lowercase) for _ in range(6))
    return Poison(_dumps({**_base(rng, n), name: 1}), f"unknown field(s): {name}")


def missing_field(rng: random.Random, n: int) -> Poison:
    document = _base(rng, n)
    field = rng.choice(["on_behalf_of", "prompt", "request_id"])
    del document[field]
    return Poison(_dumps(document), field)


def bad_request_id(rng: random.Random, n: int) -> Poison:
    value = rng.choice(["../escape", "a b", "", "-lead", "x" * 129, "ids/with/slash"])
    return Poison(_dumps({**_base(rng, n), "request_id": value}), "request_id")


def bad_labels(rng: random.Random, n: int) -> Poison:
    labels = rng.choice(
        [{"Upper": "v"}, {f"k{i}": "v" for i in range(17)}, {"sku": "v" * 257}, {"sku": 5}]
    )
    return Poison(_dumps({**_base(rng, n), "labels": labels}), "labels")


def not_a_number(rng: random.Random, n: int) -> Poison:
    body = _dumps({**_base(rng, n), "guidance_scale": 1.5})
    constant = rng.choice(["NaN", "Infinity", "-Infinity"])
    return Poison(body.replace(b"1.5", constant.encode()), "not valid JSON")


def oversized(rng: random.Random, n: int) -> Poison:
    document = {**_base(rng, n), "negative_prompt": "y" * 3000}
    body = _dumps(document)
    body += b" " * (MAX_BODY_BYTES + rng.randint(1, 5000) - len(body))
    return Poison(body, "exceeds the limit")


def priority_mismatch(rng: random.Random, n: int) -> Poison:
    document = {**_base(rng, n), "priority": "bulk"}
    return Poison(_dumps(document), "does not match the routing key")


def anonymous(rng: random.Random, n: int) -> Poison:
    return Poison(
        _dumps(_base(rng, n)), "user_id", reason="UNAUTHENTICATED_PUBLISHER", anonymous=True
    )


GENERATORS: list[Callable[[random.Random, int], Poison]] = [
    random_bytes,
    truncated_json,
    not_an_object,
    wrong_type,
    out_of_range,
    unknown_field,
    missing_field,
    bad_request_id,
    bad_labels,
    not_a_number,
    oversized,
    priority_mismatch,
    anonymous,
]


def poison_stream(rng: random.Random, count: int) -> list[Poison]:
    """`count` bad messages; every generator at least once when count allows."""
    chosen = list(GENERATORS) + [rng.choice(GENERATORS) for _ in range(count - len(GENERATORS))]
    rng.shuffle(chosen)
    return [make(rng, n) for n, make in enumerate(chosen[:count])]
