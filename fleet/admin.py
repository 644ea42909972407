from __future__ import annotations

from typing import Any

from django.contrib import admin, messages
from django.core.exceptions import PermissionDenied
from django.db import transaction
from django.db.models import QuerySet
from django.forms import ModelForm
from django.http import HttpRequest, HttpResponse, HttpResponseRedirect
from django.template.response import TemplateResponse
from django.urls import path, reverse
from django.utils.html import format_html, format_html_join

from fleet.admin_readonly import ReadOnlyAdminMixin
from fleet.forms import CsmsBackendForm, RegistrationForm, RegistrationImportForm
from fleet.models import ChargingStation, CsmsBackend, Registration, StationEvent
from fleet.selectors import (
    connector_status_summary,
    csms_backend_list,
    station_events_recent,
)
from fleet.services.inventory import registration_mark_removed
from fleet.services.registrations import (
    RegistrationFileError,
    RegistrationRowsError,
    registrations_import,
    registrations_parse,
)
from fleet.services.registry import registry_publish_on_commit
from fleet.validators import root_ca_summary

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


# Per-row errors shown as messages: enough to fix a file, not a page of thousands.
_IMPORT_ERRORS_SHOWN = 50


def _registry_changed(csms_ids: Any) -> None:
    registry_publish_on_commit(
        CsmsBackend.objects.filter(id__in=set(csms_ids)).values_list("name", flat=True)
    )


@admin.register(CsmsBackend)
class CsmsBackendAdmin(admin.ModelAdmin):
    form = CsmsBackendForm
    list_display = (
        "name",
        "url",
        "mode",
        "has_root_ca",
        "open_admission",
        "station_count",
        "connected_count",
        "updated_at",
    )
    list_filter = ("open_admission",)
    search_fields = ("name", "url")
    readonly_fields = ("root_ca", "created_at", "updated_at")
    fieldsets = (
        (None, {"fields": ("name", "url", "open_admission")}),
        ("Proxy mode", {"fields": ("upstream_url",)}),
        ("Root CA certificate", {"fields": ("root_ca", "root_ca_file", "clear_root_ca")}),
        (None, {"fields": ("created_at", "updated_at")}),
    )

    def save_model(
        self, request: HttpRequest, obj: CsmsBackend, form: ModelForm, change: bool
    ) -> None:
        super().save_model(request, obj, form, change)
        registry_publish_on_commit([obj.name])

    def get_queryset(self, request: HttpRequest) -> QuerySet[CsmsBackend]:
        return csms_backend_list()

    @admin.display(description="mode", ordering="upstream_url")
    def mode(self, backend: CsmsBackend) -> str:
        if backend.upstream_url:
            return f"proxy -> {backend.upstream_shown}"
        return "endpoint"

    @admin.display(description="root CA", boolean=True)
    def has_root_ca(self, backend: CsmsBackend) -> bool:
        return bool(backend.root_ca_pem)

    @admin.display(description="current root CA")
    def root_ca(self, backend: CsmsBackend) -> str:
        if not backend.root_ca_pem:
            return "none"
        try:
            return root_ca_summary(backend.root_ca_pem)
        except ValueError:
            # Only a row written around the validators gets here; say so rather than fail.
            return "unreadable: upload the certificate again"

    @admin.display(description="stations", ordering="station_count")
    def station_count(self, backend: CsmsBackend) -> int:
        return backend.station_count  # type: ignore[attr-defined]  # annotated by csms_backend_list

    @admin.display(description="connected", ordering="connected_count")
    def connected_count(self, backend: CsmsBackend) -> int:
        return backend.connected_count  # type: ignore[attr-defined]  # annotated by csms_backend_list


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
class ChargingStationAdmin(admin.ModelAdmin):
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

    # Deleting a station deletes its registrations: its CSMS's gateways must learn it.
    def delete_model(self, request: HttpRequest, obj: ChargingStation) -> None:
        csms_ids = list(obj.registrations.values_list("csms_id", flat=True))
        super().delete_model(request, obj)
        _registry_changed(csms_ids)

    def delete_queryset(self, request: HttpRequest, queryset: QuerySet[ChargingStation]) -> None:
        csms_ids = list(
            Registration.objects.filter(station__in=queryset)
            .values_list("csms_id", flat=True)
            .distinct()
        )
        super().delete_queryset(request, queryset)
        _registry_changed(csms_ids)

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
    form = RegistrationForm
    list_display = ("station", "csms", "state", "serial_number", "has_password", "state_changed_at")
    list_filter = ("state", "csms")
    search_fields = ("station__identity", "serial_number")
    list_select_related = ("station", "csms")
    autocomplete_fields = ("station",)
    show_full_result_count = False
    actions = ("mark_removed",)
    change_list_template = "admin/fleet/registration/change_list.html"

    def get_readonly_fields(self, request: HttpRequest, obj: Any = None) -> tuple[str, ...]:
        if obj is None:
            return ()
        return ("station", "csms", "state", "state_changed_at", "has_password")

    def get_fields(self, request: HttpRequest, obj: Any = None) -> tuple[str, ...]:
        fields = ["station", "csms", "state", "serial_number", "password", "clear_password"]
        if obj is not None:
            fields[3:3] = ["state_changed_at", "has_password"]
        return tuple(fields)

    @admin.display(description="password", boolean=True)
    def has_password(self, registration: Registration) -> bool:
        return bool(registration.password_sha256)

    # Every change of who is registered reaches the CSMS's gateways once it is committed.
    def save_model(
        self, request: HttpRequest, obj: Registration, form: ModelForm, change: bool
    ) -> None:
        super().save_model(request, obj, form, change)
        _registry_changed([obj.csms_id])

    def delete_model(self, request: HttpRequest, obj: Registration) -> None:
        super().delete_model(request, obj)
        _registry_changed([obj.csms_id])

    def delete_queryset(self, request: HttpRequest, queryset: QuerySet[Registration]) -> None:
        csms_ids = list(queryset.values_list("csms_id", flat=True).distinct())
        super().delete_queryset(request, queryset)
        _registry_changed(csms_ids)

    @admin.action(description="Mark as removed (the account was deleted on the CSMS)")
    def mark_removed(self, request: HttpRequest, queryset: QuerySet[Registration]) -> None:
        # One transaction: the CSMS's gateways get one publish, not one per row.
        with transaction.atomic():
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

    def get_urls(self) -> list[Any]:
        return [
            path(
                "import/",
                self.admin_site.admin_view(self.import_view),
                name="fleet_registration_import",
            ),
            *super().get_urls(),
        ]

    def import_view(self, request: HttpRequest) -> HttpResponse:
        """Register a CSV whitelist on a CSMS: the same service as import_registrations."""
        if not self.has_add_permission(request):
            raise PermissionDenied
        form = RegistrationImportForm(request.POST or None, request.FILES or None)
        if request.method == "POST" and form.is_valid():
            backend = form.cleaned_data["csms"]
            upload = form.cleaned_data["file"]
            try:
                rows = registrations_parse(upload.read())
            except RegistrationFileError as exc:
                self.message_user(
                    request, f"{upload.name}: {exc}. Nothing imported.", messages.ERROR
                )
            except RegistrationRowsError as exc:
                for error in exc.errors[:_IMPORT_ERRORS_SHOWN]:
                    self.message_user(request, f"{upload.name}: {error}", messages.ERROR)
                hidden = len(exc.errors) - _IMPORT_ERRORS_SHOWN
                more = f" ({hidden} more not shown: manage.py import_registrations lists all)"
                self.message_user(
                    request,
                    f"{len(exc.errors)} error(s) in {upload.name}; nothing imported"
                    + (more if hidden > 0 else "")
                    + ".",
                    messages.ERROR,
                )
            else:
                result = registrations_import(csms=backend, rows=rows)
                self.message_user(request, result.summary(), messages.SUCCESS)
                return HttpResponseRedirect(reverse("admin:fleet_registration_changelist"))
        context = {
            **self.admin_site.each_context(request),
            "title": "Import registrations",
            "opts": self.model._meta,
            "form": form,
        }
        return TemplateResponse(request, "admin/fleet/registration/import.html", context)


@admin.register(StationEvent)
class StationEventAdmin(ReadOnlyAdminMixin, admin.ModelAdmin):
    list_display = ("at", "station", "csms", "kind", "data", "received_at")
    list_filter = ("kind", "csms")
    search_fields = ("station__identity", "=event_id")
    list_select_related = ("station", "csms")
    date_hierarchy = "at"
    show_full_result_count = False
