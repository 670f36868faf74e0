"""The gauges behind the anchor-age alert and the dashboard's time-in-queue and team quota
panels: what they read, and that a scrape reads nothing but memory."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, cast

import pytest
from aio_pika.abc import AbstractIncomingMessage
from prometheus_client import generate_latest
from sqlalchemy import Engine, create_engine

from zimage_pipeline.audit.anchoring import ChainAnchorer
from zimage_pipeline.ledger import migrate
from zimage_pipeline.ledger.quota import QuotaLedger
from zimage_pipeline.ledger.quota_types import Window, team_subject
from zimage_pipeline.messages import Priority
from zimage_pipeline.observability import Metrics
from zimage_pipeline.policy import QuotaLimits, TeamBudget
from zimage_pipeline.settings import AuditSettings, PolicySettings, StorageSettings
from zimage_pipeline.storage import ObjectStore
from zimage_pipeline.worker.consumer import MAX_TRUSTED_QUEUE_WAIT_S, _Delivery
from zimage_pipeline.worker.gauges import TeamQuotaGauges, watch_anchor_age

DESIGN = "cn=design,ou=groups,dc=example,dc=com"
PRINT = "cn=print,ou=groups,dc=example,dc=com"


@pytest.fixture
def ledger(tmp_path: Path) -> Engine:
    engine = create_engine(f"sqlite:///{tmp_path / 'ledger.db'}")
    migrate.upgrade(engine)
    return engine


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def _sample(metrics: Metrics, name: str, **labels: str) -> float | None:
    value = metrics.registry.get_sample_value(name, labels)
    return None if value is None else float(value)


def test_anchor_age_grows_until_an_anchor_succeeds_and_not_on_a_failure(
    ledger: Engine,
) -> None:
    clock = Clock()
    store = cast(ObjectStore, None)  # an empty chain has nothing to write
    anchorer = ChainAnchorer(
        ledger, store, storage=StorageSettings(), audit=AuditSettings(), clock=clock
    )
    broken = ChainAnchorer(
        create_engine("sqlite://"),  # no schema: every anchor fails
        store,
        storage=StorageSettings(),
        audit=AuditSettings(),
        clock=clock,
    )
    metrics, other = Metrics(), Metrics()
    watch_anchor_age(metrics, anchorer, 300.0)
    watch_anchor_age(other, broken, 300.0)
    clock.now += 400
    assert _sample(metrics, "zimage_audit_anchor_age_seconds") == 400  # since the start
    assert anchorer.anchor() is None  # nothing to anchor yet: the head is covered
    assert _sample(metrics, "zimage_audit_anchor_age_seconds") == 0
    with pytest.raises(Exception, match="no such table"):
        broken.anchor()
    assert _sample(other, "zimage_audit_anchor_age_seconds") == 400
    clock.now += 250
    assert _sample(metrics, "zimage_audit_anchor_age_seconds") == 250
    assert _sample(other, "zimage_audit_anchor_age_seconds") == 650
    assert _sample(metrics, "zimage_audit_anchor_interval_seconds") == 300


def test_team_quota_gauges_follow_the_ledger_and_the_policy(ledger: Engine) -> None:
    quota = QuotaLedger(ledger)
    policy = PolicySettings(
        file=None,
        teams={
            DESIGN: {"images_per_day": 100, "images_per_month": 1000},
            PRINT: {"images_per_month": 50},
        },
    )
    now = datetime.now(UTC)
    quota.reserve(
        request_id="r1",
        user="alice",
        teams=[TeamBudget(DESIGN, 100, 1000)],
        images=4,
        user_limits=QuotaLimits(None, None),
        lease_s=60,
        now=now,
    )
    quota.commit("r1", 3, now=now)
    quota.reserve(
        request_id="r2",
        user="alice",
        teams=[TeamBudget(DESIGN, 100, 1000)],
        images=2,
        user_limits=QuotaLimits(None, None),
        lease_s=60,
        now=now,
    )
    quota.grant(team_subject(DESIGN), 10, window=Window.DAY, actor="admin", now=now)
    metrics = Metrics()
    gauges = TeamQuotaGauges(quota, policy, metrics)
    gauges.run()

    used = "zimage_team_quota_used_images"
    limit = "zimage_team_quota_limit_images"
    assert _sample(metrics, used, team=DESIGN, window="day") == 5  # 3 used + 2 reserved
    assert _sample(metrics, used, team=DESIGN, window="month") == 5
    assert _sample(metrics, limit, team=DESIGN, window="day") == 110  # with the grant
    assert _sample(metrics, limit, team=DESIGN, window="month") == 1000
    assert _sample(metrics, used, team=PRINT, window="month") == 0
    assert _sample(metrics, limit, team=PRINT, window="day") is None  # no daily cap
    assert _sample(metrics, limit, team=PRINT, window="month") == 50

    # A team dropped from the policy loses its series at the next run.
    gauges._policy = PolicySettings(file=None, teams={PRINT: {"images_per_month": 50}})
    gauges.run()
    text = generate_latest(metrics.registry).decode()
    assert DESIGN not in text
    assert _sample(metrics, limit, team=PRINT, window="month") == 50


@dataclass
class _Message:
    timestamp: datetime | None


def _delivery(timestamp: datetime | None, received_at: float) -> _Delivery:
    message = cast(AbstractIncomingMessage, cast(Any, _Message(timestamp)))
    return _Delivery(message, Priority.STANDARD, "alice", 1, received_at=received_at)


def test_queue_wait_counts_from_the_publication_when_stamped_else_the_arrival() -> None:
    published = datetime(2026, 12, 1, 9, 0, 0, tzinfo=UTC)
    received = published.timestamp() + 42.5
    assert _delivery(published, received).queued_since() == published.timestamp()
    naive = published.replace(tzinfo=None)  # AMQP timestamps carry no zone: UTC
    assert _delivery(naive, received).queued_since() == published.timestamp()
    assert _delivery(None, received).queued_since() == received  # a retry copy
    # A publisher's clock ahead of ours never makes the wait negative.
    assert _delivery(published, published.timestamp() - 5).queued_since() == (
        published.timestamp() - 5
    )


def test_queue_wait_ignores_a_publication_timestamp_beyond_belief() -> None:
    # A zero timestamp (1970) or a clock a year behind would put decades into the fleet's
    # histogram; the arrival counts instead. A day ago, just inside the bound, is believed.
    received = datetime(2026, 12, 1, 9, 0, 0, tzinfo=UTC).timestamp()
    epoch = datetime(1970, 1, 1, tzinfo=UTC)
    assert _delivery(epoch, received).queued_since() == received
    just_inside = received - MAX_TRUSTED_QUEUE_WAIT_S + 60
    stamp = datetime.fromtimestamp(just_inside, UTC)
    assert _delivery(stamp, received).queued_since() == just_inside
