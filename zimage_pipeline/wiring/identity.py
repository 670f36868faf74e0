"""Authorizer and Quota ports on the directory (ldap3), the policy and the quota ledger.

Delegation: a request published by one account (a CMS) on behalf of another (an editor)
is allowed only if the publisher's roles include `delegate`. The editor's roles decide
what may be generated and whose quota pays; the priority classes allowed are those of
either account, so a CMS service can publish interactively for any editor.
"""

from __future__ import annotations

from zimage_pipeline.directory import LdapDirectory
from zimage_pipeline.errors import RequestRejectedError, ZImageError
from zimage_pipeline.ledger.quota import QuotaLedger
from zimage_pipeline.messages import ImageFormat, Priority
from zimage_pipeline.policy import EffectivePolicy, resolve_policy
from zimage_pipeline.ports import Authorization, Limits, QuotaLeft
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
        if on_behalf_of == principal:
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
        )


def _policy_of(authorization: Authorization) -> EffectivePolicy:
    policy = authorization.quota_subjects
    if not isinstance(policy, EffectivePolicy):
        raise TypeError("authorization was not made by DirectoryAuthorizer")
    return policy


class LedgerQuota:
    def __init__(self, ledger: QuotaLedger, *, lease_s: float) -> None:
        self._ledger = ledger
        self._lease_s = lease_s

    def reserve(self, *, request_id: str, authorization: Authorization, images: int) -> None:
        policy = _policy_of(authorization)
        self._ledger.reserve(
            request_id=request_id,
            user=authorization.subject,
            teams=policy.teams,
            images=images,
            user_limits=policy.user_quota,
            lease_s=self._lease_s,
        )

    def commit(self, request_id: str, images: int) -> None:
        self._ledger.commit(request_id, images)

    def release(self, request_id: str, reason: str) -> None:
        self._ledger.release(request_id, reason)

    def remaining(self, authorization: Authorization) -> QuotaLeft:
        policy = _policy_of(authorization)
        left = self._ledger.remaining(
            user=authorization.subject, teams=policy.teams, user_limits=policy.user_quota
        )
        return QuotaLeft(day=left.day, month=left.month)
