"""Authorizer port on the directory (ldap3) and the policy.

Delegation: a request published by one account (a CMS) on behalf of another (an editor)
is allowed only if the publisher's roles include `delegate`. The editor's roles decide
what may be generated and whose quota pays; the priority classes allowed are those of
either account, so a CMS service can publish interactively for any editor.
"""

from __future__ import annotations

from zimage_pipeline.directory import LdapDirectory
from zimage_pipeline.errors import RequestRejectedError, ZImageError
from zimage_pipeline.messages import ImageFormat, Priority
from zimage_pipeline.policy import EffectivePolicy, load_rules, resolve_policy
from zimage_pipeline.ports import Authorization, Limits
from zimage_pipeline.settings import PolicySettings


def _rejected(error: ZImageError) -> RequestRejectedError:
    return RequestRejectedError(str(error), reason=error.reason)


class DirectoryAuthorizer:
    def __init__(self, directory: LdapDirectory, policy: PolicySettings) -> None:
        self._directory = directory
        self._policy = policy

    def _effective(self, username: str) -> tuple[EffectivePolicy, tuple[str, ...]]:
        # Unknown and disabled accounts raise REJECT errors; an unreachable directory a
        # RETRY error (fail closed: nothing runs without a positive answer).
        identity = self._directory.lookup(username)
        return resolve_policy(identity, self._policy), tuple(sorted(identity.groups))

    def authorize(self, *, principal: str, on_behalf_of: str) -> Authorization:
        publisher, groups = self._effective(principal)
        # Directory ids compare without case (LDAP's uid matching): `ALICE` asking for
        # `alice` asks for herself, as the shared quota already says.
        if on_behalf_of.casefold() == principal.casefold():
            subject = publisher
        else:
            if not publisher.delegate:
                raise RequestRejectedError(
                    f"{principal!r} may not act on behalf of other users "
                    "(no role with delegate = true)",
                    reason="DELEGATION_NOT_ALLOWED",
                )
            subject, groups = self._effective(on_behalf_of)
        priorities = publisher.allowed_priorities | subject.allowed_priorities
        limits = Limits(
            generate=subject.generate,
            delegate=publisher.delegate,
            max_pixels=subject.max_pixels,
            max_side=subject.max_side,
            max_images=subject.max_images,
            max_steps=subject.max_steps,
            formats=frozenset(ImageFormat(f) for f in subject.allowed_formats),
            priorities=frozenset(Priority(p.value) for p in priorities),
            templates=subject.templates,
            free_prompt=subject.free_prompt,
            adapters=subject.adapters,
        )
        snapshot = {"subject": subject.to_snapshot()}
        # The directory's spelling of the name: `ALICE` and `alice` share one quota.
        canonical = subject.username
        if subject is not publisher:
            snapshot["publisher"] = publisher.to_snapshot()
        return Authorization(
            subject=canonical,
            principal=principal,
            limits=limits,
            roles_snapshot=snapshot,
            quota_subjects=subject,
            groups=groups,
            roles=tuple(subject.roles),
            input_grants=tuple(load_rules(self._policy).inputs.get(principal, ())),
        )


def policy_of(authorization: Authorization) -> EffectivePolicy:
    policy = authorization.quota_subjects
    if not isinstance(policy, EffectivePolicy):
        raise TypeError("authorization was not made by DirectoryAuthorizer")
    return policy
