"""The admin's form for starting a batch; the rules themselves live in BatchOptions."""

from __future__ import annotations

import dataclasses
from typing import Any

from django import forms

from fleet.models import CsmsBackend
from migrations_app.models import MigrationBatch, StationMigration
from migrations_app.services import policies
from migrations_app.services.batches import BatchOptions, Webhooks
from migrations_app.services.selection import StationFilters

_DEFAULTS = BatchOptions()


class MigrateStationsForm(forms.Form):
    target = forms.ModelChoiceField(
        queryset=CsmsBackend.objects.order_by("name"),
        label="Target CSMS",
        empty_label=None,
        help_text="The CSMS the stations will be pointed at (its URL goes into the free "
        "network profile).",
    )
    vendor = forms.CharField(
        required=False,
        max_length=50,
        help_text="Only the selected stations of this vendor (any case); empty: any.",
    )
    model = forms.CharField(
        required=False,
        max_length=50,
        help_text="Only the selected stations of this model (any case); empty: any.",
    )
    firmware_at_least = forms.CharField(
        required=False,
        max_length=50,
        label="Firmware at least",
        help_text="Only stations with this firmware version or newer, compared part by part "
        "(4.2.9 < 4.2.85); a station with no version number is left out. Empty: any.",
    )
    # Bounds that BatchOptions.problems() checks are left to it, so the admin, the CLI and
    # the services agree on one set of rules; the fields only parse.
    max_in_flight = forms.IntegerField(
        initial=_DEFAULTS.max_in_flight,
        label="Max in flight",
        help_text="Stations migrating at once, across all workers.",
    )
    rate_per_minute = forms.IntegerField(
        min_value=0,
        initial=_DEFAULTS.rate_per_minute,
        label="Starts per minute",
        help_text="Stations started per minute, across all workers; 0: no limit.",
    )
    rate_increase_factor = forms.FloatField(
        required=False,
        label="Rate: increase factor",
        help_text="Exponential rate: multiply the starts per minute by this (over 1) each "
        "time the stations below are done, up to the maximum. Empty: a constant rate.",
        widget=forms.NumberInput(attrs={"step": "0.1", "placeholder": "constant rate"}),
    )
    rate_increase_every = forms.IntegerField(
        required=False,
        min_value=1,
        label="Rate: increase every",
        help_text="Stations done between two increases.",
    )
    rate_max_per_minute = forms.IntegerField(
        required=False,
        min_value=1,
        label="Rate: maximum",
        help_text="The increasing rate's ceiling, in starts per minute.",
    )
    canary_size = forms.IntegerField(
        min_value=0,
        initial=_DEFAULTS.canary_size,
        label="Canary size",
        help_text="The first K stations must all verify before the rest start; 0: no canary.",
    )
    brake_failure_ratio = forms.FloatField(
        required=False,
        initial=_DEFAULTS.brake_failure_ratio,
        label="Brake: failure ratio",
        help_text="Pause the batch when failed / ended stations exceeds this, from 0 up to "
        "(not including) 1, e.g. 0.2 for 20%. Empty: no ratio brake.",
        widget=forms.NumberInput(attrs={"step": "0.01", "placeholder": "no brake"}),
    )
    brake_first_failed = forms.IntegerField(
        required=False,
        min_value=0,
        initial=_DEFAULTS.brake_first_failed,
        label="Brake: first failures",
        help_text="Pause the batch when the first N ended stations all failed (a target "
        "that is down); 0 or empty: off.",
    )
    brake_min_sample = forms.IntegerField(
        min_value=0,
        initial=_DEFAULTS.brake_min_sample,
        label="Brake: minimum sample",
        help_text="Stations that must have ended before the brake may act.",
    )
    abort_criteria = forms.CharField(
        required=False,
        label="Abort criteria",
        widget=forms.Textarea(
            attrs={"rows": 3, "cols": 30, "placeholder": "fallback:10%:20\ntimeout:5"}
        ),
        help_text="One a line, KIND:THRESHOLD[:MIN_SAMPLE]: pause the batch once failures "
        f"of KIND ({', '.join(policies.KINDS)}) reach a percent of the ended stations (10%) "
        "or a count (5), once MIN_SAMPLE have ended. Counted from the last resume.",
    )
    promote_after_canary = forms.BooleanField(
        required=False,
        label="Promote after the canary",
        help_text="After the canary wave the rest wait until an operator promotes the batch.",
    )
    boot_timeout_seconds = forms.IntegerField(
        min_value=1,
        initial=_DEFAULTS.boot_timeout_seconds,
        label="Boot timeout (s)",
        help_text="How long to wait for the BootNotification on the target after the Reset.",
    )
    idle_wait_seconds = forms.IntegerField(
        min_value=0,
        initial=_DEFAULTS.idle_wait_seconds,
        label="Wait-for-idle limit (s)",
        help_text="How long a station with a charging session may delay its Reset.",
    )
    offline_wait_seconds = forms.IntegerField(
        min_value=0,
        initial=_DEFAULTS.offline_wait_seconds,
        label="Offline queue (s)",
        help_text="Queue a station that is offline when its turn comes until it reconnects, "
        "up to this long; 0: it fails as offline.",
    )
    window_start = forms.TimeField(
        required=False,
        label="Window start (UTC)",
        widget=forms.TimeInput(attrs={"type": "time"}, format="%H:%M"),
        help_text="Stations start only inside the window; it may span midnight.",
    )
    window_end = forms.TimeField(
        required=False,
        label="Window end (UTC)",
        widget=forms.TimeInput(attrs={"type": "time"}, format="%H:%M"),
        help_text="Empty start and end: any time.",
    )
    starts_at = forms.DateTimeField(
        required=False,
        label="Start at (UTC)",
        widget=forms.DateTimeInput(attrs={"type": "datetime-local"}, format="%Y-%m-%dT%H:%M"),
        help_text="No station starts before this; empty: at once.",
    )
    ends_at = forms.DateTimeField(
        required=False,
        label="End at (UTC)",
        widget=forms.DateTimeInput(attrs={"type": "datetime-local"}, format="%Y-%m-%dT%H:%M"),
        help_text="No station starts after this: the armed ones finish, those not started "
        "are cancelled. Empty: no end. Composes with the window.",
    )
    approval_required = forms.BooleanField(
        required=False,
        label="Require approval",
        help_text="No station starts until a second person with the approve permission "
        "approves the batch on its page.",
    )
    cleanup = forms.BooleanField(
        required=False,
        label="Clean up the old slot",
        help_text="Blank the old CSMS's network profile once the station is verified.",
    )
    dry_run = forms.BooleanField(
        required=False,
        label="Dry run",
        help_text="Pre-flight and read the configuration only; report what each station "
        "would get, change nothing.",
    )
    allow_downgrade = forms.BooleanField(
        required=False,
        label="Allow wss:// to ws://",
        help_text="Allow moving a station from a TLS connection to a plain one.",
    )
    install_root_ca = forms.BooleanField(
        required=False,
        label="Install the root CA",
        help_text="For a wss:// target with a root CA certificate: install it on a station "
        "that lacks it (InstallCertificate through the source), then check again; "
        "otherwise such a station is skipped.",
    )
    security_extension = forms.ChoiceField(
        required=False,
        choices=MigrationBatch.SecurityExtension.choices,
        initial=_DEFAULTS.security_extension,
        label="No security extension",
        help_text="A station that cannot list its root certificates (no OCPP 1.6 security "
        "extension), for a wss:// target with a root CA: skip it, or proceed with a warning.",
    )

    webhook_url = forms.CharField(
        required=False,
        max_length=500,
        label="Webhook URL",
        help_text="POST the batch's events (started, canary passed, paused, resumed, "
        "cancelled, finished) as JSON here; a Slack incoming webhook URL works as is. "
        "Empty: none (the settings' default webhook, if any, is still notified).",
    )
    webhook_secret = forms.CharField(
        required=False,
        max_length=200,
        label="Webhook secret",
        widget=forms.PasswordInput(render_value=True),
        help_text="Signs each body: X-Csms-Migrate-Signature is sha256= and the HMAC-SHA256 "
        "of the body with this secret. Empty: unsigned.",
    )
    webhook_station_failures = forms.BooleanField(
        required=False,
        label="Every failed station",
        help_text="Also notify the webhook of each station that fails.",
    )

    # How the intermediate page groups the fields.
    FIELDSETS = (
        ("Where", ("target",)),
        ("Which of the selected stations", ("vendor", "model", "firmware_at_least")),
        (
            "Pace",
            (
                "max_in_flight",
                "rate_per_minute",
                "rate_increase_factor",
                "rate_increase_every",
                "rate_max_per_minute",
            ),
        ),
        (
            "Safety",
            (
                "canary_size",
                "promote_after_canary",
                "brake_failure_ratio",
                "brake_min_sample",
                "brake_first_failed",
                "abort_criteria",
            ),
        ),
        ("Timeouts", ("boot_timeout_seconds", "idle_wait_seconds", "offline_wait_seconds")),
        ("When", ("starts_at", "ends_at", "window_start", "window_end")),
        ("Approval", ("approval_required",)),
        ("Options", ("cleanup", "dry_run", "allow_downgrade")),
        ("Root certificate", ("install_root_ca", "security_extension")),
        ("Notifications", ("webhook_url", "webhook_secret", "webhook_station_failures")),
    )

    def clean_security_extension(self) -> str:
        return self.cleaned_data["security_extension"] or _DEFAULTS.security_extension

    def clean_brake_first_failed(self) -> int:
        return self.cleaned_data["brake_first_failed"] or 0  # empty: off

    def clean_rate_increase_every(self) -> int:
        return self.cleaned_data["rate_increase_every"] or 0

    def clean_rate_max_per_minute(self) -> int:
        return self.cleaned_data["rate_max_per_minute"] or 0

    def clean_abort_criteria(self) -> tuple[policies.AbortCriterion, ...]:
        criteria, problems = [], []
        for line in self.cleaned_data["abort_criteria"].splitlines():
            if not line.strip():
                continue
            try:
                criteria.append(policies.parse_criterion(line))
            except ValueError as exc:
                problems.append(str(exc)[:1].upper() + str(exc)[1:] + ".")
        if problems:
            raise forms.ValidationError(problems)
        return tuple(criteria)

    def clean_firmware_at_least(self) -> str:
        version = self.cleaned_data["firmware_at_least"].strip()
        for problem in StationFilters(firmware_at_least=version).problems():
            raise forms.ValidationError(problem[:1].upper() + problem[1:] + ".")
        return version

    def clean(self) -> dict[str, Any]:
        cleaned = super().clean() or {}
        if not self.errors:
            for problem in self.options().problems() + self.webhooks().problems():
                self.add_error(None, problem[:1].upper() + problem[1:] + ".")
        return cleaned

    def options(self) -> BatchOptions:
        """The batch options from the cleaned data (call after is_valid)."""
        names = [option.name for option in dataclasses.fields(BatchOptions)]
        return BatchOptions(**{n: self.cleaned_data[n] for n in names if n in self.cleaned_data})

    def webhooks(self) -> Webhooks:
        """The batch's webhook from the cleaned data (call after is_valid)."""
        url = self.cleaned_data["webhook_url"].strip()
        return Webhooks(
            urls=(url,) if url else (),
            secret=self.cleaned_data["webhook_secret"],
            station_failures=self.cleaned_data["webhook_station_failures"],
        )

    def filters(self) -> StationFilters:
        """The selection's filters from the cleaned data (call after is_valid)."""
        return StationFilters(
            vendor=self.cleaned_data["vendor"],
            model=self.cleaned_data["model"],
            firmware_at_least=self.cleaned_data["firmware_at_least"],
        )

    def fieldsets(self) -> list[tuple[str, list[forms.BoundField]]]:
        return [(title, [self[name] for name in names]) for title, names in self.FIELDSETS]


class BatchStationFilterForm(forms.Form):
    """The filters of a batch dashboard's station table (GET)."""

    state = forms.ChoiceField(
        required=False, choices=[("", "any state"), *StationMigration.State.choices]
    )
    failed_step = forms.ChoiceField(required=False, label="failed at")
    q = forms.CharField(
        required=False,
        label="reason",
        widget=forms.TextInput(attrs={"placeholder": "reason contains…", "type": "search"}),
    )

    def __init__(self, *args: Any, failed_steps: list[tuple[str, int]], **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        labels = dict(StationMigration.State.choices)
        failed_step = self.fields["failed_step"]
        assert isinstance(failed_step, forms.ChoiceField)
        failed_step.choices = [
            ("", "any step"),
            *((step, f"{labels.get(step, step)} ({n})") for step, n in failed_steps),
        ]
