"""The fleet inventory: CSMS backends, stations, their registrations and what they reported.

Stations, their connection state and their events are written by event ingestion
(fleet.services.events); registrations are also changed by the migrations. Reads for the
admin and commands live in fleet.selectors.
"""

from __future__ import annotations

from django.core.exceptions import ValidationError
from django.core.validators import validate_slug
from django.db import models
from django.utils import timezone

from fleet.validators import (
    CSMS_URL_MAX_LENGTH,
    same_csms_url,
    validate_csms_url,
    validate_root_ca_pem,
    validate_upstream_url,
)
from ocpp_gateway.envelopes import EventKind
from ocpp_gateway.upstream import url_without_credentials

# OCPP 1.6 BootNotification.chargePointSerialNumber is a CiString25.
SERIAL_NUMBER_MAX_LENGTH = 25
IDENTITY_MAX_LENGTH = 255


class CsmsBackend(models.Model):
    """A central system stations can be pointed at. ``name`` is what its gateways report."""

    name = models.CharField(
        max_length=64,
        unique=True,
        validators=[validate_slug],
        help_text="Letters, digits, '-' and '_': the name its gateways run with (--csms).",
    )
    url = models.CharField(
        "URL",
        max_length=CSMS_URL_MAX_LENGTH,
        validators=[validate_csms_url],
        help_text="ws:// or wss:// URL written into the stations' configuration.",
    )
    open_admission = models.BooleanField(
        default=False,
        help_text="A lab CSMS whose gateways admit any station. Otherwise only stations "
        "registered on it (active or pending removal) are admitted.",
    )
    upstream_url = models.CharField(
        "upstream URL",
        max_length=CSMS_URL_MAX_LENGTH,
        blank=True,
        validators=[validate_upstream_url],
        help_text="The operator's real CSMS its gateways run in front of (proxy mode, "
        "python -m ocpp_gateway --upstream); empty: the gateway is the CSMS (endpoint mode). "
        "No credentials: per-station ones go in the gateway's --upstream-auth-file.",
    )
    root_ca_pem = models.TextField(
        "root CA certificate",
        blank=True,
        validators=[validate_root_ca_pem],
        help_text="PEM of the root certificate the stations need to trust this CSMS's wss:// "
        "URL; pre-flight checks that a station has it installed.",
    )
    created_at = models.DateTimeField(auto_now_add=True)
    updated_at = models.DateTimeField(auto_now=True)

    class Meta:
        ordering = ["name"]
        verbose_name = "CSMS backend"
        verbose_name_plural = "CSMS backends"

    def __str__(self) -> str:
        return self.name

    def clean(self) -> None:
        super().clean()
        if self.upstream_url and self.url and same_csms_url(self.upstream_url, self.url):
            raise ValidationError(
                {
                    "upstream_url": "The upstream is this CSMS's own URL: its gateways would "
                    "connect to themselves (a loop). Give the real CSMS behind them."
                }
            )

    @property
    def mode(self) -> str:
        """'proxy' when its gateways run in front of an upstream CSMS, else 'endpoint'."""
        return "proxy" if self.upstream_url else "endpoint"

    @property
    def upstream_shown(self) -> str:
        """The upstream URL without user:password, fit for lists, logs and reports."""
        return url_without_credentials(self.upstream_url)


class ChargingStation(models.Model):
    identity = models.CharField(
        max_length=IDENTITY_MAX_LENGTH,
        unique=True,
        help_text="Charge point identity (the last URL segment).",
    )
    vendor = models.CharField(max_length=50, blank=True)
    model = models.CharField(max_length=50, blank=True)
    serial = models.CharField("serial number", max_length=50, blank=True)
    firmware_version = models.CharField(max_length=50, blank=True)
    csms = models.ForeignKey(
        CsmsBackend,
        # A backend that still has stations must not vanish by accident.
        on_delete=models.PROTECT,
        null=True,
        blank=True,
        related_name="stations",
        verbose_name="CSMS",
        help_text="The CSMS the station last booted on.",
    )
    connected = models.BooleanField(default=False)
    connection_changed_at = models.DateTimeField(null=True, blank=True)
    # Per CSMS name: {"connected_at": iso, "disconnected_at": iso}. ``connected`` is derived
    # from it so that a late disconnect from the CSMS a station just left (its old gateway
    # noticing the dead socket after the station already connected elsewhere) does not mark
    # the station offline.
    connections = models.JSONField(default=dict, blank=True)
    last_boot_at = models.DateTimeField(null=True, blank=True)
    last_seen_at = models.DateTimeField(null=True, blank=True)
    # {"<connector id>": {"status": ..., "error_code": ..., "at": iso}}; connector 0 is the
    # station as a whole (OCPP 1.6).
    connector_status = models.JSONField(default=dict, blank=True)
    created_at = models.DateTimeField(default=timezone.now, editable=False)

    class Meta:
        ordering = ["identity"]
        verbose_name = "charging station"
        indexes = [
            models.Index(fields=["csms", "connected"], name="fleet_station_csms_conn"),
            models.Index(fields=["firmware_version"], name="fleet_station_firmware"),
            models.Index(fields=["vendor", "model"], name="fleet_station_vendor_model"),
            models.Index(fields=["last_seen_at"], name="fleet_station_last_seen"),
        ]

    def __str__(self) -> str:
        return self.identity


class Registration(models.Model):
    """A station's account on one CSMS, which outlives the station moving away from it."""

    class State(models.TextChoices):
        ACTIVE = "active", "active"
        PENDING_REMOVAL = "pending_removal", "pending removal"
        REMOVED = "removed", "removed"

    # Who the gateways of this CSMS admit: a removed account is gone there, but a station
    # pending removal may still fall back to this CSMS until the operator deleted it.
    ADMITTED_STATES = (State.ACTIVE, State.PENDING_REMOVAL)

    station = models.ForeignKey(
        ChargingStation, on_delete=models.CASCADE, related_name="registrations"
    )
    csms = models.ForeignKey(
        CsmsBackend, on_delete=models.PROTECT, related_name="registrations", verbose_name="CSMS"
    )
    state = models.CharField(max_length=20, choices=State.choices, default=State.ACTIVE)
    state_changed_at = models.DateTimeField(default=timezone.now)
    serial_number = models.CharField(
        max_length=SERIAL_NUMBER_MAX_LENGTH,
        blank=True,
        help_text="The chargePointSerialNumber the station must boot with; empty: any.",
    )
    password_sha256 = models.CharField(
        "password digest",
        max_length=128,
        blank=True,
        editable=False,
        help_text="salt$sha256 of the station's password (never the password); empty: none.",
    )

    class Meta:
        ordering = ["station__identity", "csms__name"]
        constraints = [
            models.UniqueConstraint(
                fields=["station", "csms"], name="fleet_registration_station_csms"
            ),
        ]
        indexes = [models.Index(fields=["state", "csms"], name="fleet_registration_state")]

    def __str__(self) -> str:
        return f"{self.station} on {self.csms}"


class StationEvent(models.Model):
    """One event a gateway reported, stored once (``event_id`` is the envelope's id)."""

    event_id = models.CharField(max_length=64, unique=True, editable=False)
    # The (station, ...) and (csms, at) indexes below serve the foreign keys too: a busy
    # table pays for every index on each insert.
    station = models.ForeignKey(
        ChargingStation, on_delete=models.CASCADE, related_name="events", db_index=False
    )
    csms = models.ForeignKey(
        CsmsBackend,
        on_delete=models.SET_NULL,
        null=True,
        blank=True,
        related_name="events",
        verbose_name="CSMS",
        db_index=False,
    )
    kind = models.CharField(
        max_length=16, choices=[(each.value, each.value.title()) for each in EventKind]
    )
    at = models.DateTimeField(help_text="When the gateway saw it.")
    data = models.JSONField(default=dict, blank=True)
    received_at = models.DateTimeField(default=timezone.now, editable=False)

    class Meta:
        ordering = ["-at"]
        verbose_name = "station event"
        indexes = [
            # A station's last boot on a CSMS (the durable boot record verification reads):
            # with only (station, at) and (csms, at), SQLite picked the CSMS's index and read
            # every event of the CSMS, so a Reset cost more the bigger the fleet.
            models.Index(
                fields=["station", "csms", "kind", "-at"], name="fleet_event_station_kind_at"
            ),
            models.Index(fields=["csms", "-at"], name="fleet_event_csms_at"),
            models.Index(fields=["kind", "-at"], name="fleet_event_kind_at"),
            models.Index(fields=["-at"], name="fleet_event_at"),
        ]

    def __str__(self) -> str:
        return f"{self.kind} of {self.station} at {self.at:%Y-%m-%d %H:%M:%S}"
