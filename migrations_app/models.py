"""Batches of station migrations, their per-station state machine and the audit trail.

State changes go through migrations_app.services only; each is a conditional update that
records a StateChange row, so the history of every station is complete.
"""

from __future__ import annotations

from django.conf import settings
from django.db import models
from django.utils import timezone

from ocpp_gateway.upstream import url_without_credentials


class MigrationBatch(models.Model):
    class State(models.TextChoices):
        RUNNING = "running", "running"
        PAUSED = "paused", "paused"
        CANCELLED = "cancelled", "cancelled"
        FINISHED = "finished", "finished"

    class SecurityExtension(models.TextChoices):
        """A station that cannot list its root certificates (no OCPP 1.6 security extension)."""

        REQUIRE = "require", "require: skip the station"
        PROCEED = "proceed", "proceed with a warning"

    target = models.ForeignKey(
        "fleet.CsmsBackend", on_delete=models.PROTECT, related_name="incoming_batches"
    )
    source = models.ForeignKey(
        "fleet.CsmsBackend",
        on_delete=models.PROTECT,
        null=True,
        blank=True,
        related_name="outgoing_batches",
        help_text="Set when the batch took every station of one CSMS.",
    )
    state = models.CharField(max_length=16, choices=State.choices, default=State.RUNNING)
    max_in_flight = models.PositiveIntegerField(default=20)
    rate_per_minute = models.PositiveIntegerField(
        default=60, help_text="Stations started per minute across all workers; 0: no limit."
    )
    boot_timeout_seconds = models.PositiveIntegerField(default=300)
    idle_wait_seconds = models.PositiveIntegerField(
        default=1800, help_text="How long a charging station may delay its Reset."
    )
    cleanup = models.BooleanField(default=False, help_text="Blank the old profile slot.")
    dry_run = models.BooleanField(default=False)
    allow_downgrade = models.BooleanField(
        default=False, help_text="Allow a move from wss:// to ws://."
    )
    # The seed's second prerequisite, checked for a wss:// target with a root CA.
    install_root_ca = models.BooleanField(
        default=False,
        help_text="Install the target's root CA certificate (InstallCertificate through the "
        "source) on a station that lacks it, then check again.",
    )
    security_extension = models.CharField(
        max_length=16,
        choices=SecurityExtension.choices,
        default=SecurityExtension.REQUIRE,
        help_text="A station that does not support GetInstalledCertificateIds, for a wss:// "
        "target with a root CA: skip it, or proceed with a warning in its report.",
    )
    # Rollout controls, enforced by the workers (migrations_app.services.batches).
    canary_size = models.PositiveIntegerField(
        default=0, help_text="The first K stations must all verify before the rest start."
    )
    brake_failure_ratio = models.FloatField(
        null=True,
        blank=True,
        default=0.5,
        help_text="Pause when failed / (done + failed) exceeds this (0-1); empty: no brake.",
    )
    brake_min_sample = models.PositiveIntegerField(
        default=10, help_text="Stations that must have ended before the brake may act."
    )
    brake_first_failed = models.PositiveIntegerField(
        default=5, help_text="Pause when the first N ended stations all failed; 0: off."
    )
    window_start = models.TimeField(
        null=True, blank=True, help_text="Maintenance window start (UTC); empty: any time."
    )
    window_end = models.TimeField(null=True, blank=True, help_text="Window end (UTC).")
    offline_wait_seconds = models.PositiveIntegerField(
        default=0,
        help_text="Queue a station that is offline when its turn comes until it reconnects, "
        "up to this long; 0: it fails as offline after the boot timeout.",
    )
    # Rollout policies (services.policies), enforced by the drive like the controls above.
    rate_increase_factor = models.FloatField(
        null=True,
        blank=True,
        help_text="Exponential rate: multiply the starts per minute by this (> 1) each time "
        "`rate_increase_every` more stations are done; empty: a constant rate.",
    )
    rate_increase_every = models.PositiveIntegerField(
        default=0, help_text="Stations done between two rate increases."
    )
    rate_max_per_minute = models.PositiveIntegerField(
        default=0, help_text="The exponential rate's ceiling (starts per minute)."
    )
    abort_criteria = models.JSONField(
        default=list,
        blank=True,
        help_text="Pause when a kind of failure passes its threshold (services.policies).",
    )
    starts_at = models.DateTimeField(
        null=True, blank=True, help_text="Schedule: no station starts before this."
    )
    ends_at = models.DateTimeField(
        null=True,
        blank=True,
        help_text="Schedule: no station starts after this (armed ones finish; the rest are "
        "cancelled).",
    )
    approval_required = models.BooleanField(
        default=False,
        help_text="No station starts until a second person with the approve permission "
        "approves the batch.",
    )
    approved_by = models.ForeignKey(
        settings.AUTH_USER_MODEL,
        on_delete=models.SET_NULL,
        null=True,
        blank=True,
        related_name="+",
        editable=False,
    )
    approved_at = models.DateTimeField(null=True, blank=True, editable=False)
    promote_after_canary = models.BooleanField(
        default=False,
        help_text="After the canary wave the rest wait for an operator to promote the batch.",
    )
    promoted_by = models.ForeignKey(
        settings.AUTH_USER_MODEL,
        on_delete=models.SET_NULL,
        null=True,
        blank=True,
        related_name="+",
        editable=False,
    )
    promoted_at = models.DateTimeField(null=True, blank=True, editable=False)
    # How the stations were chosen when not simply listed (services.selection): the
    # stations file, the filters and what they left out, the identities not found.
    selection = models.JSONField(default=dict, blank=True, editable=False)
    pause_reason = models.TextField(blank=True)
    # When the canary wave ended and the rest of the batch first started.
    canary_ended_at = models.DateTimeField(null=True, blank=True, editable=False)
    resumed_at = models.DateTimeField(null=True, blank=True)
    # What the brake judges, counted as the stations end (services.progress) so that no
    # drive counts the batch: stations done and failed since `progress_since`, and the
    # failures before the first done one. They hold for the resume they were counted
    # from: when `progress_since` is not `resumed_at` (a resume or retry since), they are
    # 0 and the next station to end starts them again.
    progress_since = models.DateTimeField(null=True, blank=True, editable=False)
    ended_done = models.PositiveIntegerField(default=0, editable=False)
    ended_failed = models.PositiveIntegerField(default=0, editable=False)
    failed_before_done = models.PositiveIntegerField(default=0, editable=False)
    # The failures of the same resume by kind (StationMigration.FailureKind), which the
    # abort criteria judge.
    failed_rejected = models.PositiveIntegerField(default=0, editable=False)
    failed_timeout = models.PositiveIntegerField(default=0, editable=False)
    failed_fallback = models.PositiveIntegerField(default=0, editable=False)
    failed_offline = models.PositiveIntegerField(default=0, editable=False)
    failed_busy = models.PositiveIntegerField(default=0, editable=False)
    failed_refused = models.PositiveIntegerField(default=0, editable=False)
    failed_error = models.PositiveIntegerField(default=0, editable=False)
    # Stations done over the batch's life (not zeroed by a resume): the exponential rate's
    # steps.
    done_total = models.PositiveIntegerField(default=0, editable=False)
    migrated_back_from = models.ForeignKey(
        "self", on_delete=models.SET_NULL, null=True, blank=True, related_name="+"
    )
    created_by = models.ForeignKey(
        settings.AUTH_USER_MODEL, on_delete=models.SET_NULL, null=True, blank=True
    )
    created_at = models.DateTimeField(default=timezone.now)
    finished_at = models.DateTimeField(null=True, blank=True)

    class Meta:
        ordering = ["-created_at"]
        verbose_name = "migration batch"
        verbose_name_plural = "migration batches"
        permissions = [
            ("run_migration", "Can start and control station migrations"),
            ("approve_migration", "Can approve a batch that requires approval"),
        ]

    def __str__(self) -> str:
        return f"Batch {self.pk} to {self.target}"


class StationMigration(models.Model):
    class State(models.TextChoices):
        PENDING = "pending", "pending"
        WAITING_ONLINE = "waiting_online", "queued until online"
        PREFLIGHT = "preflight", "pre-flight"
        READING_CONFIG = "reading_config", "reading configuration"
        CHECKING_ROOT_CA = "checking_root_ca", "checking root certificate"
        SETTING_URL = "setting_url", "setting URL"
        SETTING_PRIORITY = "setting_priority", "setting priority"
        WAITING_IDLE = "waiting_idle", "waiting for idle"
        RESETTING = "resetting", "resetting"
        AWAITING_BOOT = "awaiting_boot", "awaiting boot"
        VERIFIED = "verified", "verified"
        OLD_REGISTRATION_MARKED = "old_registration_marked", "old registration marked"
        CLEANUP = "cleanup", "cleanup"
        DONE = "done", "done"
        FAILED = "failed", "failed"
        SKIPPED = "skipped", "skipped"
        CANCELLED = "cancelled", "cancelled"

    class FailureKind(models.TextChoices):
        """Why a station failed, in the classes the metrics and the abort criteria count."""

        REJECTED = "rejected", "rejected (a station or the target said no)"
        TIMEOUT = "timeout", "timed out (no answer, no boot in time)"
        FALLBACK = "fallback", "fell back to the source"
        OFFLINE = "offline", "offline"
        BUSY = "busy", "busy (charging past the idle limit)"
        REFUSED = "refused", "refused by pre-flight (URL, configuration, certificate)"
        ERROR = "error", "error (the step kept raising)"

    batch = models.ForeignKey(MigrationBatch, on_delete=models.CASCADE, related_name="stations")
    station = models.ForeignKey(
        "fleet.ChargingStation", on_delete=models.PROTECT, related_name="migrations"
    )
    source = models.ForeignKey(
        "fleet.CsmsBackend", on_delete=models.PROTECT, null=True, related_name="+"
    )
    target_url = models.CharField(max_length=500)
    canary = models.BooleanField(default=False)
    state = models.CharField(max_length=32, choices=State.choices, default=State.PENDING)
    failed_step = models.CharField(max_length=32, blank=True)
    failure_kind = models.CharField(max_length=16, choices=FailureKind.choices, blank=True)
    reason = models.TextField(blank=True)
    # What step 1 read, and the plan derived from it.
    config_snapshot = models.JSONField(default=dict, blank=True)
    active_slot = models.CharField(max_length=32, blank=True)
    free_slot = models.CharField(max_length=32, blank=True)
    original_priority = models.CharField(max_length=100, blank=True)
    # Epoch seconds (the worker's clock) when the Reset was claimed; the claim that stops a
    # second Reset. Verification does not compare it with the gateways' clocks: it looks
    # for a boot whose id differs from the last one seen before the Reset (boot_marks).
    reset_sent_at = models.FloatField(null=True, blank=True)
    # The claimed Reset's command id (ocpp_gateway.client.claim_command): a run that finds
    # the claim left by a worker that died before publishing takes it back and sends anew.
    reset_command_id = models.CharField(max_length=64, blank=True)
    # {csms: {"event_id", "at"}} of the last boot before the Reset ("at": the gateway's
    # epoch seconds, so a boot read back from the database can be judged newer).
    boot_marks = models.JSONField(default=dict, blank=True)
    reset_accepted = models.BooleanField(default=False)
    # What the source knew of the hardware when step 1 ran (vendor, model, serial): the
    # boot on the target must come from the same station.
    expected_hardware = models.JSONField(default=dict, blank=True)
    # After an accepted boot on the target: when to confirm the station stayed there.
    settle_until = models.DateTimeField(null=True, blank=True)
    # Why verification failed (the target rejected the boot, other hardware), kept while
    # the station is awaited on the source, the only CSMS a rollback may go through.
    verify_failure = models.TextField(blank=True)
    started_at = models.DateTimeField(null=True, blank=True)
    finished_at = models.DateTimeField(null=True, blank=True)
    updated_at = models.DateTimeField(default=timezone.now)
    # When the current wait (offline, busy, boot) gave up; None while not waiting.
    wait_until = models.DateTimeField(null=True, blank=True)
    # Times the current step raised an unexpected error; back to 0 at each state change.
    attempts = models.PositiveSmallIntegerField(default=0)
    # What the station went on despite (a prerequisite that could not be checked), for
    # its report: text lines.
    warnings = models.JSONField(default=list, blank=True)

    class Meta:
        ordering = ["batch", "station__identity"]
        constraints = [
            models.UniqueConstraint(fields=["batch", "station"], name="one_migration_per_batch"),
            # Two live migrations of one station would each send it a Reset. The list is
            # workflow.TERMINAL spelled out, as migration 0004 has it (a test holds them equal).
            models.UniqueConstraint(
                fields=["station"],
                condition=~models.Q(state__in=["done", "failed", "skipped", "cancelled"]),
                name="one_live_migration_per_station",
            ),
        ]
        indexes = [
            # With the id: the next pending stations in order without sorting them all.
            models.Index(fields=["batch", "state", "id"], name="migration_batch_state_id"),
            # The canary wave's checks read the canary stations only. Partial: SQLite does
            # not search an index by a bare boolean column ("WHERE canary").
            models.Index(
                fields=["batch", "state", "id"],
                condition=models.Q(canary=True),
                name="migration_batch_canary",
            ),
            # The rate limiter reads the last minute's starts only.
            models.Index(fields=["batch", "started_at"], name="migration_batch_started"),
            models.Index(fields=["state", "updated_at"], name="migration_state_updated"),
        ]

    def __str__(self) -> str:
        return f"{self.station} ({self.state})"

    @property
    def is_terminal(self) -> bool:
        # The workflow imports this module: it is read when asked, not at import.
        from migrations_app.services.workflow import TERMINAL

        return self.state in TERMINAL


class StateChange(models.Model):
    migration = models.ForeignKey(
        StationMigration, on_delete=models.CASCADE, related_name="state_changes"
    )
    from_state = models.CharField(max_length=32)
    to_state = models.CharField(max_length=32)
    reason = models.TextField(blank=True)
    at = models.DateTimeField(default=timezone.now)

    class Meta:
        ordering = ["at", "id"]

    def __str__(self) -> str:
        return f"{self.from_state} -> {self.to_state}"


class OcppExchange(models.Model):
    """One OCPP call a migration made: request, answer (or error) and timing, for audit."""

    migration = models.ForeignKey(
        StationMigration, on_delete=models.CASCADE, related_name="exchanges"
    )
    step = models.CharField(max_length=32)
    action = models.CharField(max_length=64)
    command_id = models.CharField(max_length=64, blank=True)
    csms = models.CharField(max_length=64, blank=True, help_text="The gateway that answered.")
    sent = models.BooleanField(
        default=True,
        help_text="Whether the frame reached the station's socket as far as the gateway "
        "knows; False when it knows it did not (e.g. refused because it was addressed to "
        "another CSMS's gateway, or no gateway held the station).",
    )
    request = models.JSONField(default=dict)
    outcome = models.CharField(max_length=16)
    response = models.JSONField(null=True, blank=True)
    error_code = models.CharField(max_length=64, blank=True)
    error_description = models.TextField(blank=True)
    sent_at = models.DateTimeField(null=True, blank=True)
    duration_ms = models.FloatField(null=True, blank=True)
    recorded_at = models.DateTimeField(default=timezone.now)

    class Meta:
        ordering = ["recorded_at", "id"]
        verbose_name = "OCPP exchange"

    def __str__(self) -> str:
        return f"{self.action} ({self.outcome})"


class BatchAction(models.Model):
    """Who did what to a batch (or the workers, for an automatic pause), for audit."""

    class Kind(models.TextChoices):
        START = "start", "start"
        PAUSE = "pause", "pause"
        RESUME = "resume", "resume"
        CANCEL = "cancel", "cancel"
        RETRY = "retry", "retry failed"
        MIGRATE_BACK = "migrate_back", "migrate back"
        AUTO_PAUSE = "auto_pause", "paused by the workers"
        APPROVE = "approve", "approve"
        PROMOTE = "promote", "promote after the canary"
        SCHEDULE_END = "schedule_end", "the schedule ended"

    batch = models.ForeignKey(MigrationBatch, on_delete=models.CASCADE, related_name="actions")
    user = models.ForeignKey(
        settings.AUTH_USER_MODEL, on_delete=models.SET_NULL, null=True, blank=True
    )
    kind = models.CharField(max_length=16, choices=Kind.choices)
    detail = models.TextField(blank=True)
    at = models.DateTimeField(default=timezone.now)

    class Meta:
        ordering = ["at", "id"]

    def __str__(self) -> str:
        return f"{self.kind} by {self.user or 'workers'}"


class BatchWebhook(models.Model):
    """Where a batch's notifications go (services.notifications): JSON, HMAC-signed."""

    batch = models.ForeignKey(MigrationBatch, on_delete=models.CASCADE, related_name="webhooks")
    url = models.URLField("URL", max_length=500)
    # Signs each body (HMAC-SHA256); empty: unsigned (a Slack incoming webhook needs none).
    secret = models.CharField(max_length=200, blank=True)
    station_failures = models.BooleanField(
        default=False, help_text="Also notify every station that fails."
    )
    from_settings = models.BooleanField(
        default=False, help_text="The default webhook (MIGRATION_WEBHOOK_URL) of the settings."
    )

    class Meta:
        ordering = ["id"]

    def __str__(self) -> str:
        return self.shown_url

    @property
    def shown_url(self) -> str:
        """The URL without user:password, fit for pages and logs."""
        return url_without_credentials(self.url)


class WebhookDelivery(models.Model):
    """One notification to one webhook: its body, and how its delivery went."""

    class Status(models.TextChoices):
        PENDING = "pending", "pending"
        DELIVERED = "delivered", "delivered"
        FAILED = "failed", "failed (attempts exhausted)"

    webhook = models.ForeignKey(BatchWebhook, on_delete=models.CASCADE, related_name="deliveries")
    event = models.CharField(max_length=32)
    payload = models.JSONField()
    status = models.CharField(max_length=16, choices=Status.choices, default=Status.PENDING)
    attempts = models.PositiveSmallIntegerField(default=0)
    # When the next attempt is due; while one runs, when it is presumed lost.
    next_attempt_at = models.DateTimeField(default=timezone.now)
    last_status_code = models.PositiveSmallIntegerField(null=True, blank=True)
    last_error = models.TextField(blank=True)
    created_at = models.DateTimeField(default=timezone.now)
    delivered_at = models.DateTimeField(null=True, blank=True)

    class Meta:
        ordering = ["created_at", "id"]
        verbose_name_plural = "webhook deliveries"
        indexes = [
            # The sweep finds due pending deliveries without reading the delivered ones.
            models.Index(
                fields=["next_attempt_at"],
                condition=models.Q(status="pending"),
                name="webhook_delivery_due",
            )
        ]

    def __str__(self) -> str:
        return f"{self.event} to {self.webhook} ({self.status})"
