"""Generate the JSON Schemas of the message contract into docs/schemas/.

python -m zimage_pipeline.schemas            # write
python -m zimage_pipeline.schemas --check    # exit 1 if the files are stale
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from pydantic import BaseModel

from zimage_pipeline.messages import (
    CancelRequest,
    CancelResult,
    GenerationRequest,
    GenerationResult,
)

SCHEMA_DIR = Path(__file__).resolve().parents[1] / "docs" / "schemas"

CONTRACT: dict[str, type[BaseModel]] = {
    "zimage.request.v1.json": GenerationRequest,
    "zimage.cancel.v1.json": CancelRequest,
    "zimage.result.v1.json": GenerationResult,
    "zimage.cancel-result.v1.json": CancelResult,
}


def render(model: type[BaseModel]) -> str:
    # mode="validation" + by_alias: the schema describes what a sender must put on the wire.
    schema = model.model_json_schema(by_alias=True, mode="validation")
    schema["$schema"] = "https://json-schema.org/draft/2020-12/schema"
    return json.dumps(schema, indent=2, ensure_ascii=False, sort_keys=True) + "\n"


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    check = "--check" in args
    stale = []
    SCHEMA_DIR.mkdir(parents=True, exist_ok=True)
    for name, model in CONTRACT.items():
        path = SCHEMA_DIR / name
        text = render(model)
        current = path.read_text(encoding="utf-8") if path.exists() else None
        if current != text:
            stale.append(name)
            if not check:
                path.write_text(text, encoding="utf-8")
    if check and stale:
        print(f"stale schemas: {', '.join(stale)}; run python -m zimage_pipeline.schemas")
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
