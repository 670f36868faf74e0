"""Gauges the worker refreshes off the request path: the audit anchor's age (computed per
scrape from a timestamp in memory) and each policy team's quota use (read from the ledger
by a periodic job, never per scrape: a Prometheus scrape must not query the ledger)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from zimage_pipeline.ledger.quota_types import Window, team_subject
from zimage_pipeline.observability import Metrics
from zimage_pipeline.policy import QuotaLimits, load_rules
from zimage_pipeline.settings import PolicySettings
from zimage_pipeline.worker.periodic import PeriodicJob

if TYPE_CHECKING:
    from zimage_pipeline.audit.anchoring import ChainAnchorer
    from zimage_pipeline.ledger.quota import QuotaLedger

TEAM_QUOTA_JOB = "team_quota_gauges"
TEAM_QUOTA_EVERY_S = 60.0


def watch_anchor_age(metrics: Metrics, anchorer: ChainAnchorer, interval_s: float) -> None:
    metrics.audit_anchor_age_seconds.set_function(anchorer.seconds_since_anchored)
    metrics.audit_anchor_interval_seconds.set(interval_s)


class TeamQuotaGauges:
    """Each team budget of the policy: images used and the limit (with grants) of the
    current day and month. The teams are the policy's, so the series are bounded by it;
    a team dropped from the policy loses its series at the next run."""

    def __init__(self, quota: QuotaLedger, policy: PolicySettings, metrics: Metrics) -> None:
        self._quota = quota
        self._policy = policy
        self._metrics = metrics
        # The (team, window) series set at the last run, to drop the ones gone since.
        self._used: set[tuple[str, str]] = set()
        self._limits: set[tuple[str, str]] = set()

    def job(self) -> PeriodicJob:
        return PeriodicJob(TEAM_QUOTA_JOB, TEAM_QUOTA_EVERY_S, self.run, housekeeping=False)

    def run(self) -> None:
        teams = load_rules(self._policy).teams  # cached until the policy file changes
        used: set[tuple[str, str]] = set()
        limits: set[tuple[str, str]] = set()
        for group_dn, budget in sorted(teams.items()):
            status = self._quota.usage(
                team_subject(group_dn),
                limits=QuotaLimits(budget.images_per_day, budget.images_per_month),
            )
            for window in (Window.DAY, Window.MONTH):
                usage = status.window(window)
                labels = (group_dn, window.value)
                self._metrics.team_quota_used_images.labels(*labels).set(
                    usage.used + usage.reserved
                )
                used.add(labels)
                if usage.limit is not None:
                    self._metrics.team_quota_limit_images.labels(*labels).set(
                        usage.limit + usage.granted
                    )
                    limits.add(labels)
        for labels in self._used - used:
            self._metrics.team_quota_used_images.remove(*labels)
        for labels in self._limits - limits:
            self._metrics.team_quota_limit_images.remove(*labels)
        self._used, self._limits = used, limits
