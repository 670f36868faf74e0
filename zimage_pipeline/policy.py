"""Policy: group DN -> roles -> limits and quotas, combined into one effective policy.

A user in several groups gets the most generous combination of all their roles:

- size and count limits (max_pixels, max_side, max_images, max_steps): the maximum over
  the roles (a role that leaves one at 0 adds nothing to it);
- allowed formats: the union;
- priority: the highest class of any role; every lower class is allowed too
  (bulk < standard < interactive);
- generate, delegate, free_prompt: true if any role says true;
- templates (ids, `tag:<tag>`, `*`) and adapters (names, `*`): the union;
- per-user quota (images per day, per month): the maximum over the roles that set it;
  a window no role sets has no per-user cap;
- team budgets: every budgeted group the user belongs to, nested membership included;
  a request is charged to the user AND to each of those teams, and must fit in all.

Group DNs are compared normalized (case, spacing and escaping), so the policy file need
not copy the server's exact spelling. Pure code: no I/O.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from zimage_pipeline.directory.filters import normalize_dn
from zimage_pipeline.directory.identity import Identity
from zimage_pipeline.errors import ConfigError
from zimage_pipeline.settings import PolicyRules, PolicySettings, PriorityClass

log = logging.getLogger(__name__)

PRIORITY_ORDER: tuple[PriorityClass, ...] = (
    PriorityClass.BULK,
    PriorityClass.STANDARD,
    PriorityClass.INTERACTIVE,
)
SNAPSHOT_VERSION = 1


@dataclass(frozen=True, slots=True)
class QuotaLimits:
    """Per-window caps in images; None means no cap in that window."""

    images_per_day: int | None = None
    images_per_month: int | None = None


@dataclass(frozen=True, slots=True)
class TeamBudget:
    """A pooled budget of one group (its DN as written in the policy file)."""

    group: str
    images_per_day: int | None = None
    images_per_month: int | None = None

    @property
    def limits(self) -> QuotaLimits:
        return QuotaLimits(self.images_per_day, self.images_per_month)


@dataclass(frozen=True, slots=True)
class EffectivePolicy:
    username: str
    roles: tuple[str, ...]
    granted_by: tuple[str, ...]  # the group DNs that carried a role
    max_pixels: int
    max_side: int
    max_images: int
    max_steps: int
    allowed_formats: frozenset[str]
    priority: PriorityClass
    generate: bool
    delegate: bool
    user_quota: QuotaLimits
    teams: tuple[TeamBudget, ...]
    templates: frozenset[str] = frozenset({"*"})
    free_prompt: bool = True
    adapters: frozenset[str] = frozenset({"*"})

    @property
    def allowed_priorities(self) -> frozenset[PriorityClass]:
        if not self.roles:
            return frozenset()
        return frozenset(PRIORITY_ORDER[: PRIORITY_ORDER.index(self.priority) + 1])

    def to_snapshot(self) -> dict[str, Any]:
        """The JSON-serializable "roles snapshot" stored with each job."""
        return {
            "version": SNAPSHOT_VERSION,
            "username": self.username,
            "roles": list(self.roles),
            "granted_by": list(self.granted_by),
            "max_pixels": self.max_pixels,
            "max_side": self.max_side,
            "max_images": self.max_images,
            "max_steps": self.max_steps,
            "allowed_formats": sorted(self.allowed_formats),
            "priority": self.priority.value,
            "generate": self.generate,
            "delegate": self.delegate,
            "user_quota": {
                "images_per_day": self.user_quota.images_per_day,
                "images_per_month": self.user_quota.images_per_month,
            },
            "teams": [
                {
                    "group": t.group,
                    "images_per_day": t.images_per_day,
                    "images_per_month": t.images_per_month,
                }
                for t in self.teams
            ],
            "templates": sorted(self.templates),
            "free_prompt": self.free_prompt,
            "adapters": sorted(self.adapters),
        }

    @classmethod
    def from_snapshot(cls, data: Mapping[str, Any]) -> EffectivePolicy:
        quota = data["user_quota"]
        return cls(
            username=data["username"],
            roles=tuple(data["roles"]),
            granted_by=tuple(data["granted_by"]),
            max_pixels=int(data["max_pixels"]),
            max_side=int(data["max_side"]),
            max_images=int(data["max_images"]),
            max_steps=int(data["max_steps"]),
            allowed_formats=frozenset(data["allowed_formats"]),
            priority=PriorityClass(data["priority"]),
            generate=bool(data["generate"]),
            delegate=bool(data["delegate"]),
            user_quota=QuotaLimits(quota["images_per_day"], quota["images_per_month"]),
            teams=tuple(
                TeamBudget(t["group"], t["images_per_day"], t["images_per_month"])
                for t in data["teams"]
            ),
            # Absent from snapshots made before templates: what a role allowed then.
            templates=frozenset(data.get("templates", ["*"])),
            free_prompt=bool(data.get("free_prompt", True)),
            # Absent from snapshots made before adapter rules: any adapter was allowed.
            adapters=frozenset(data.get("adapters", ["*"])),
        )


def _max_optional(values: list[int | None]) -> int | None:
    present = [v for v in values if v is not None]
    return max(present) if present else None


_rules_lock = threading.Lock()
_rules_cache: dict[tuple[object, ...], PolicyRules] = {}
# The last good rules per policy settings, and the error of the newest file while it is
# refused: a broken edit keeps the last good rules instead of stopping every worker.
_last_good: dict[str, PolicyRules] = {}
_refused: dict[str, str] = {}


def load_rules(policy: PolicySettings) -> PolicyRules:
    """The rules of `policy`, re-read only when its file changes (a stat per call). A
    file that no longer loads is refused as a whole: the last good rules stay, the error
    is logged once and kept for `policy_refused` (/readyz, metrics). Without a last good
    version (at startup) the error is raised: the worker does not start."""
    try:
        stamp: object = policy.file.stat().st_mtime_ns if policy.file else None
    except OSError:
        stamp = None
    settings_key = policy.model_dump_json()
    key = (settings_key, stamp)
    with _rules_lock:
        cached = _rules_cache.get(key)
    if cached is not None:
        return cached
    try:
        loaded = policy.load_rules()
    except ConfigError as exc:
        with _rules_lock:
            good = _last_good.get(settings_key)
            first = _refused.get(settings_key) != str(exc)
            _refused[settings_key] = str(exc)
            if good is not None:
                _rules_cache.clear()
                _rules_cache[key] = good  # not re-read until the file changes again
        if good is None:
            raise
        if first:
            log.error("policy: the new file is refused, keeping the last good rules: %s", exc)
        return good
    with _rules_lock:
        _rules_cache.clear()  # one live policy per process: keep just the newest
        _rules_cache[key] = loaded
        _last_good[settings_key] = loaded
        _refused.pop(settings_key, None)
    return loaded


def policy_refused(policy: PolicySettings) -> str | None:
    """Why the newest policy file is refused (the last good rules are in use), or None."""
    with _rules_lock:
        return _refused.get(policy.model_dump_json())


def resolve_policy(identity: Identity, policy: PolicySettings | PolicyRules) -> EffectivePolicy:
    """The effective policy of `identity` (see the module docstring for how roles combine).
    Given PolicySettings, its rules file is read once and cached until it changes."""
    if isinstance(policy, PolicySettings):
        policy = load_rules(policy)
    member_of = {normalize_dn(dn) for dn in identity.groups}
    role_names: set[str] = set()
    granted_by: list[str] = []
    for group_dn, names in policy.groups.items():
        if names and normalize_dn(group_dn) in member_of:
            role_names.update(names)
            granted_by.append(group_dn)
    roles = [policy.roles[name] for name in sorted(role_names)]
    teams = tuple(
        TeamBudget(group_dn, budget.images_per_day, budget.images_per_month)
        for group_dn, budget in sorted(policy.teams.items())
        if normalize_dn(group_dn) in member_of
    )
    return EffectivePolicy(
        username=identity.username,
        roles=tuple(sorted(role_names)),
        granted_by=tuple(sorted(granted_by)),
        max_pixels=max((r.max_pixels for r in roles), default=0),
        max_side=max((r.max_side for r in roles), default=0),
        max_images=max((r.max_images for r in roles), default=0),
        max_steps=max((r.max_steps for r in roles), default=0),
        allowed_formats=frozenset(f for r in roles for f in r.allowed_formats),
        priority=max(
            (r.priority for r in roles), key=PRIORITY_ORDER.index, default=PriorityClass.BULK
        ),
        generate=any(r.generate for r in roles),
        delegate=any(r.delegate for r in roles),
        user_quota=QuotaLimits(
            _max_optional([r.images_per_day for r in roles]),
            _max_optional([r.images_per_month for r in roles]),
        ),
        teams=teams,
        templates=frozenset(t for r in roles for t in r.templates),
        free_prompt=any(r.free_prompt for r in roles),
        adapters=frozenset(a for r in roles for a in r.adapters),
    )
