from __future__ import annotations

from typing import Any

from django.contrib import admin, messages
from django.db.models import QuerySet
from django.http import HttpRequest
from django.urls import reverse
from django.utils.html import format_html, format_html_join

from fleet.admin_readonly import ReadOnlyAdminMixin
from fleet.models import ChargingStation, CsmsBackend, Registration, StationEvent
from fleet.selectors import (
    connector_status_summary,
    csms_backend_list,
    station_events_recent,
)
from fleet.services.inventory import registration_mark_removed
from migrations_app.admin import MigrateStationsActionMixin

# What event ingestion owns: an operator editing it would be overwritten by the next event.
_REPORTED_FIELDS = (
    "vendor",
    "model",
    "serial",
    "firmware_version",
    "connected",
    "connection_changed_at",
    "connections",
    "last_boot_at",
    "last_seen_at",
    "connector_status",
    "created_at",
)


def _events_link(label: str, **filters: Any) -> str:
    query = "&".join(f"{key}={value}" for key, value in filters.items())
    return format_html(
        '<a href="{}?{}">{}</a>', reverse("admin:fleet_stationevent_changelist"), query, label
    )


@admin.register(CsmsBackend)
class CsmsBackendAdmin(admin.ModelAdmin):
    list_display = ("name", "url", "station_count", "connected_count", "updated_at")
    search_fields = ("name", "url")
    readonly_fields = ("created_at", "updated_at")

    def get_queryset(self, request: HttpRequest) -> QuerySet[CsmsBackend]:
        return csms_backend_list()

    @admin.display(description="stations", ordering="station_count")
    def station_count(self, backend: CsmsBackend) -> int:
        return backend.station_count  # type: ignore[attr-defined]

    @admin.display(description="connected", ordering="connected_count")
    def connected_count(self, backend: CsmsBackend) -> int:
        return backend.connected_count  # type: ignore[attr-defined]


class RegistrationInline(admin.TabularInline):
    model = Registration
    extra = 0
    fields = ("csms", "state", "state_changed_at")
    # State changes go through the services (conditional updates), not a free edit here.
    readonly_fields = ("csms", "state", "state_changed_at")
    can_delete = False
    show_change_link = True

    def has_add_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return False


@admin.register(ChargingStation)
class ChargingStationAdmin(MigrateStationsActionMixin, admin.ModelAdmin):
    list_display = (
        "identity",
        "csms",
        "connected",
        "firmware_version",
        "vendor",
        "model",
        "last_boot_at",
        "last_seen_at",
        "connectors",
    )
    list_filter = ("csms", "connected", "vendor", "model", "firmware_version")
    search_fields = ("identity", "serial")
    list_select_related = ("csms",)
    date_hierarchy = "last_seen_at"
    # Counting a large fleet on every filtered page costs more than it tells.
    show_full_result_count = False
    inlines = (RegistrationInline,)
    readonly_fields = (*_REPORTED_FIELDS, "connectors", "recent_events")
    fieldsets = (
        (None, {"fields": ("identity", "csms")}),
        ("Reported by the station", {"fields": ("vendor", "model", "serial", "firmware_version")}),
        (
            "Connection",
            {
                "fields": (
                    "connected",
                    "connection_changed_at",
                    "connections",
                    "last_boot_at",
                    "last_seen_at",
                    "created_at",
                )
            },
        ),
        ("Connectors", {"fields": ("connectors", "connector_status")}),
        ("Events", {"fields": ("recent_events",)}),
    )

    def get_readonly_fields(self, request: HttpRequest, obj: Any = None) -> tuple[str, ...]:
        # The identity is what the station calls itself: fixed once the row exists.
        fields = super().get_readonly_fields(request, obj)
        return (*fields, "identity") if obj is not None else tuple(fields)

    @admin.display(description="connectors")
    def connectors(self, station: ChargingStation) -> str:
        return connector_status_summary(station.connector_status) or "-"

    @admin.display(description="recent events")
    def recent_events(self, station: ChargingStation) -> str:
        if station.pk is None:
            return "-"
        events = station_events_recent(station=station, limit=20)
        rows = format_html_join(
            "",
            "<tr><td>{}</td><td>{}</td><td>{}</td><td>{}</td></tr>",
            (
                (f"{event.at:%Y-%m-%d %H:%M:%S}", event.kind, event.csms or "-", event.data)
                for event in events
            ),
        )
        return format_html(
            "<table><tr><th>at (UTC)</th><th>kind</th><th>CSMS</th><th>data</th></tr>{}</table>"
            "<p>{}</p>",
            rows,
            _events_link("All events of this station", station__id__exact=station.pk),
        )


@admin.register(Registration)
class RegistrationAdmin(admin.ModelAdmin):
    list_display = ("station", "csms", "state", "state_changed_at")
    list_filter = ("state", "csms")
    search_fields = ("station__identity",)
    list_select_related = ("station", "csms")
    autocomplete_fields = ("station",)
    show_full_result_count = False
    actions = ("mark_removed",)

    def get_readonly_fields(self, request: HttpRequest, obj: Any = None) -> tuple[str, ...]:
        if obj is None:
            return ()
        return ("station", "csms", "state", "state_changed_at")

    @admin.action(description="Mark as removed (the account was deleted on the CSMS)")
    def mark_removed(self, request: HttpRequest, queryset: QuerySet[Registration]) -> None:
        moved = sum(
            registration_mark_removed(registration_id=pk)
            for pk in queryset.values_list("pk", flat=True)
        )
        skipped = queryset.count() - moved
        self.message_user(request, f"{moved} registration(s) marked as removed.")
        if skipped:
            self.message_user(
                request,
                f"{skipped} skipped: only a registration pending removal can be removed.",
                messages.WARNING,
            )


@admin.register(StationEvent)
class StationEventAdmin(ReadOnlyAdminMixin, admin.ModelAdmin):
    list_display = ("at", "station", "csms", "kind", "data", "received_at")
    list_filter = ("kind", "csms")
    search_fields = ("station__identity", "=event_id")
    list_select_related = ("station", "csms")
    date_hierarchy = "at"
    show_full_result_count = False
