"""Templates: the catalogue as one checked unit, rendering by substitution only, hostile
slot values, and reload keeping the last good catalogue."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from zimage_pipeline.decoding import decode_request
from zimage_pipeline.errors import InvalidRequestError
from zimage_pipeline.messages import GenerationRequest, ImageFormat, TemplateRef
from zimage_pipeline.templates.catalogue import Catalogue, CatalogueError, load_catalogue
from zimage_pipeline.templates.holder import CatalogueHolder
from zimage_pipeline.templates.render import render_request

SHIPPED = Path(__file__).resolve().parents[2] / "config" / "templates"

HERO = """id = "hero"
version = 1
tags = ["marketing"]
prompt = "Photo of {product} in {colour}"
negative_prompt = "text"
sizes = ["512x512", "768x512"]
format = "webp"
steps = 6

[slots.product]
max_length = 20
pattern = "[a-z ]+"

[slots.colour]
allowed = ["red", "blue"]
default = "red"
"""


def catalogue_dir(tmp_path: Path, **files: str) -> Path:
    directory = tmp_path / "templates"
    directory.mkdir(exist_ok=True)
    for name, text in files.items():
        (directory / f"{name}.toml").write_text(text, encoding="utf-8")
    return directory


def request(**fields: object) -> GenerationRequest:
    document = {"request_id": "t1", "on_behalf_of": "mia", **fields}
    return decode_request(json.dumps(document).encode())


def render(tmp_path: Path, **fields: object) -> GenerationRequest:
    catalogue = load_catalogue(catalogue_dir(tmp_path, hero=HERO))
    return render_request(catalogue, request(**fields))


def test_the_shipped_catalogue_loads() -> None:
    catalogue = load_catalogue(SHIPPED)
    assert {e.template.id for e in catalogue.latest()} >= {"ecommerce-hero", "social-teaser"}


def test_rendering_substitutes_and_applies_the_templates_defaults(tmp_path: Path) -> None:
    rendered = render(tmp_path, template={"id": "hero"}, variables={"product": "a teapot"})
    assert rendered.prompt == "Photo of a teapot in red"
    assert rendered.negative_prompt == "text"
    assert (rendered.width, rendered.height, rendered.steps) == (512, 512, 6)
    assert rendered.format is ImageFormat.WEBP
    assert rendered.template is not None and rendered.template.version == 1
    assert rendered.template.sha256 is not None and len(rendered.template.sha256) == 64
    assert rendered.variables == {"product": "a teapot", "colour": "red"}


def test_substitution_is_one_pass_and_reaches_no_attribute(tmp_path: Path) -> None:
    text = HERO.replace('pattern = "[a-z ]+"', 'pattern = "[{}a-z _.]+"').replace(
        "Photo of {product}", "Photo of {product} {product.__class__}"
    )
    catalogue = load_catalogue(catalogue_dir(tmp_path, hero=text))
    rendered = render_request(
        catalogue, request(template={"id": "hero"}, variables={"product": "{colour}"})
    )
    # The value stays text; `{product.__class__}` is not a slot, so it is literal text.
    assert rendered.prompt == "Photo of {colour} {product.__class__} in red"


@pytest.mark.parametrize(
    ("variables", "named"),
    [
        ({"product": "tea\npot"}, "variables.product: must not contain control characters"),
        ({"product": "tea\u202epot"}, "variables.product: must not contain control characters"),
        ({"product": "x" * 21}, "variables.product: at most 20 characters"),
        ({"product": "TEAPOT"}, "variables.product: does not match"),
        ({"product": "   "}, "variables.product: must not be blank"),
        ({"product": "teapot", "colour": "green"}, "variables.colour: one of red, blue"),
        ({"product": "teapot", "mood": "calm"}, "variables.mood: template 'hero' has no such"),
        ({}, "variables.product: required by template 'hero'"),
    ],
)
def test_a_slot_value_that_does_not_fit_is_invalid_naming_the_slot(
    tmp_path: Path, variables: dict[str, str], named: str
) -> None:
    with pytest.raises(InvalidRequestError, match=named.replace(".", r"\.")):
        render(tmp_path, template={"id": "hero"}, variables=variables)


@pytest.mark.parametrize(
    ("fields", "named"),
    [
        ({"prompt": "anything"}, "prompt: template 'hero' takes no free prompt"),
        ({"width": 1024, "height": 1024}, "width/height: template 'hero' allows 512x512"),
        ({"format": "png"}, "format: template 'hero' uses webp"),
        ({"negative_prompt": "blur"}, "negative_prompt: template 'hero' has its own"),
        ({"template": {"id": "hero", "version": 2}}, "has no version 2 \\(versions: 1\\)"),
        ({"template": {"id": "nope"}}, "template: 'nope' is not in the catalogue"),
        ({"template": {"id": "hero", "sha256": "0" * 64}}, "not the content pinned by sha256"),
    ],
)
def test_what_the_request_sets_must_be_what_the_template_allows(
    tmp_path: Path, fields: dict[str, object], named: str
) -> None:
    document: dict[str, object] = {"template": {"id": "hero"}, "variables": {"product": "pot"}}
    with pytest.raises(InvalidRequestError, match=named):
        render(tmp_path, **{**document, **fields})


def test_a_template_with_a_prompt_slot_takes_a_bounded_free_prompt(tmp_path: Path) -> None:
    text = 'id = "notes"\nversion = 1\nprompt = "A banner, {prompt}"\nprompt_max_length = 10\n'
    catalogue = load_catalogue(catalogue_dir(tmp_path, notes=text))
    rendered = render_request(catalogue, request(template={"id": "notes"}, prompt="warm"))
    assert rendered.prompt == "A banner, warm"
    with pytest.raises(InvalidRequestError, match="at most 10 characters of free prompt"):
        render_request(catalogue, request(template={"id": "notes"}, prompt="x" * 11))
    with pytest.raises(InvalidRequestError, match="prompt: required by template"):
        render_request(catalogue, request(template={"id": "notes"}))


def test_versions_live_side_by_side_and_the_newest_is_the_default(tmp_path: Path) -> None:
    v2 = HERO.replace("version = 1", "version = 2").replace("Photo of", "Picture of")
    catalogue = load_catalogue(catalogue_dir(tmp_path, hero=HERO, hero_v2=v2))
    newest = render_request(
        catalogue, request(template={"id": "hero"}, variables={"product": "pot"})
    )
    pinned = render_request(
        catalogue, request(template={"id": "hero", "version": 1}, variables={"product": "pot"})
    )
    assert newest.prompt.startswith("Picture of") and pinned.prompt.startswith("Photo of")


@pytest.mark.parametrize(
    ("text", "line", "problem"),
    [
        (HERO.replace("steps = 6", 'steps = "six'), 8, "Illegal character|unterminated|Expected"),
        (
            HERO.replace("in {colour}", "in {colour} by {artist}"),
            4,
            "undeclared slots \\['artist'\\]",
        ),
        (HERO.replace("max_length = 20", "max_length = 0"), 11, "max_length"),
        (HERO.replace("steps = 6", "stepz = 6"), 8, "stepz"),
        (HERO.replace('"512x512"', '"500x500"'), 6, "multiple of 16"),
        # Found by a probe: sizes and defaults the template's own requests could not use.
        (HERO.replace('"512x512"', '"16x16"'), 6, "from 64 to 2048"),
        (HERO.replace('"512x512"', '"4096x4096"'), 6, "from 64 to 2048"),
        (HERO.replace('default = "red"', 'default = "green"'), 14, "default 'green': one of"),
        (HERO.replace('default = "red"', 'default = "r\\u0000d"'), 14, "control characters"),
        (HERO + "[labels]\n" + "".join(f'k{i} = "v"\n' for i in range(17)), 17, "labels"),
    ],
)
def test_a_broken_file_is_refused_naming_the_file_and_line(
    tmp_path: Path, text: str, line: int, problem: str
) -> None:
    directory = catalogue_dir(tmp_path, good=HERO.replace('"hero"', '"good"'), broken=text)
    with pytest.raises(CatalogueError, match=problem) as caught:
        load_catalogue(directory)
    assert (caught.value.file, caught.value.line) == ("broken.toml", line)
    assert str(caught.value).startswith(f"broken.toml:{line}: ")


def test_the_same_version_twice_is_refused(tmp_path: Path) -> None:
    with pytest.raises(CatalogueError, match="version 1 is also in"):
        load_catalogue(catalogue_dir(tmp_path, a=HERO, b=HERO))


def hero_version(catalogue: Catalogue) -> int:
    return catalogue.resolve(TemplateRef(id="hero")).template.version


def test_reload_takes_a_good_change_and_refuses_a_broken_one(tmp_path: Path) -> None:
    directory = catalogue_dir(tmp_path, hero=HERO)
    results: list[bool] = []
    holder = CatalogueHolder(directory, on_result=results.append)
    before = holder.current()
    assert not holder.poll()  # nothing changed

    (directory / "hero.toml").write_text(HERO.replace("version = 1", "version = 2"))
    assert holder.poll() and results == [True]
    assert hero_version(holder.current()) == 2
    assert hero_version(before) == 1  # a delivery that took it before finishes under it

    (directory / "new.toml").write_text('id = "new"\nversion = 1\nprompt = "{missing}"\n')
    good = holder.current()
    assert not holder.poll() and results == [True, False]
    assert holder.current() is good  # the last good catalogue stays
    assert holder.error is not None and holder.error.startswith("new.toml:3: ")
    assert not holder.poll() and results == [True, False]  # the same broken files: no retry

    holder.request_reload()  # SIGHUP: read again even though nothing changed
    assert not holder.poll() and results == [True, False, False]

    (directory / "new.toml").unlink()  # back to the files in use: no longer refused
    assert not holder.poll() and holder.error is None and holder.current() is good


def test_a_broken_catalogue_at_startup_stops_the_worker(tmp_path: Path) -> None:
    directory = catalogue_dir(tmp_path, bad='id = "bad"\nversion = 1\nprompt = \n')
    with pytest.raises(CatalogueError, match=r"^bad\.toml:3: "):
        CatalogueHolder(directory)


def test_a_missing_directory_means_no_templates_until_it_appears(tmp_path: Path) -> None:
    holder = CatalogueHolder(tmp_path / "later")
    assert len(holder.current()) == 0
    shutil.copytree(catalogue_dir(tmp_path, hero=HERO), tmp_path / "later")
    assert holder.poll() and len(holder.current()) == 1


def test_a_directory_named_like_a_template_file_is_refused_naming_it(tmp_path: Path) -> None:
    """Found by a probe: `x.toml/` raised IsADirectoryError out of the loader (a traceback
    from `templates validate`, and a reload job that failed on every poll)."""
    directory = catalogue_dir(tmp_path, hero=HERO)
    (directory / "x.toml").mkdir()
    with pytest.raises(CatalogueError, match="cannot be read") as caught:
        load_catalogue(directory)
    assert caught.value.file == "x.toml"


def test_what_a_template_adds_must_still_fit_the_contract(tmp_path: Path) -> None:
    """The template's labels on top of the request's: 16 at most in all, refused as
    INVALID_REQUEST naming the template and the field (not carried past the limit)."""
    labelled = HERO + "[labels]\n" + "".join(f'k{i} = "v"\n' for i in range(10))
    catalogue = load_catalogue(catalogue_dir(tmp_path, hero=labelled))
    sent = {f"r{i}": "v" for i in range(7)}
    with pytest.raises(InvalidRequestError, match="with template 'hero': labels"):
        render_request(
            catalogue,
            request(template={"id": "hero"}, variables={"product": "teapot"}, labels=sent),
        )
    six = {f"r{i}": "v" for i in range(6)}
    rendered = render_request(
        catalogue, request(template={"id": "hero"}, variables={"product": "teapot"}, labels=six)
    )
    assert len(rendered.labels) == 16
