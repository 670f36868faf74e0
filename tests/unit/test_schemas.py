from __future__ import annotations

from zimage_pipeline import schemas


def test_committed_schemas_match_the_code() -> None:
    """docs/schemas/ is generated from the models; regenerate with python -m zimage_pipeline.schemas."""
    for name, model in schemas.CONTRACT.items():
        committed = (schemas.SCHEMA_DIR / name).read_text(encoding="utf-8")
        assert committed == schemas.render(model), f"{name} is stale"


def test_check_mode_reports_stale(tmp_path, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    monkeypatch.setattr(schemas, "SCHEMA_DIR", tmp_path)
    assert schemas.main(["--check"]) == 1
    assert schemas.main([]) == 0
    assert schemas.main(["--check"]) == 0
