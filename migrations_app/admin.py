"""Admin for the migrations: the stations' "Migrate to another CSMS…" action, the batch
dashboards with their controls and CSV exports, and the per-station timelines.

Thin by design: reads come from migrations_app.selectors, every change from the services
(which refuse a wrong state and record who did it).
"""

from __future__ import annotations

import csv
import json
from collections.abc import Callable, Iterable, Iterator
from datetime import datetime
from typing import Any

from django.conf import settings
from django.contrib import admin, messages
from django.contrib.admin import helpers
from django.contrib.admin.options import IS_POPUP_VAR
from django.contrib.admin.utils import unquote
from django.core.exceptions import PermissionDenied
from django.core.paginator import Paginator
from django.db.models import QuerySet
from django.http import (
    Http404,
    HttpRequest,
    HttpResponse,
    HttpResponseBase,
    HttpResponseNotAllowed,
    HttpResponseRedirect,
    StreamingHttpResponse,
)
from django.template.response import TemplateResponse
from django.urls import path, reverse
from django.utils import timezone
from django.utils.html import format_html, format_html_join

from fleet.admin import ChargingStationAdmin
from fleet.admin_readonly import ReadOnlyAdminMixin
from fleet.models import ChargingStation
from migrations_app.forms import BatchStationFilterForm, MigrateStationsForm
from migrations_app.models import MigrationBatch, OcppExchange, StationMigration
from migrations_app.selectors import (
    AUDIT_COLUMNS,
    PENDING_REMOVAL_COLUMNS,
    batch_actions,
    batch_audit_trail,
    batch_failed_steps,
    batch_list,
    batch_pending_removal_rows,
    batch_progress,
    batch_related,
    batch_source_names,
    batch_stations,
    batch_verified_count,
    batch_webhook_deliveries,
    batch_webhooks,
    list_segment_counts,
    progress_from_segments,
    station_migration_preview,
    station_migration_timeline,
)
from migrations_app.services import policies, workflow
from migrations_app.services.batches import (
    BatchError,
    BatchOptions,
    awaiting_approval,
    awaiting_promotion,
    batch_create,
    held_for,
    rate_now,
)
from migrations_app.services.controls import (
    APPROVE_PERMISSION,
    RUN_PERMISSION,
    ControlError,
    batch_approve,
    batch_cancel,
    batch_migrate_back,
    batch_pause,
    batch_promote,
    batch_resume,
    batch_retry_failed,
)
from migrations_app.services.selection import listed, select_stations, selection_filters_text

ACTION_NAME = "migrate_to_another_csms"
STATIONS_PER_PAGE = 50
# How often the dashboard of a running batch reloads its live part.
REFRESH_SECONDS = 3

BatchState = MigrationBatch.State


# --- the stations' action ----------------------------------------------------------------


@admin.action(description="Migrate to another CSMS…")
def migrate_to_another_csms(
    modeladmin: admin.ModelAdmin, request: HttpRequest, queryset: QuerySet[ChargingStation]
) -> HttpResponse:
    """Options, then a preview, then the batch: three steps posted back to the changelist.

    Each step re-posts the selection as the admin's ``_selected_action`` fields, so the batch
    takes exactly the stations the operator previewed; or, when they selected every station
    the list's filters match, that choice (``select_across``), which the admin re-applies.
    """
    if not request.user.has_perm(RUN_PERMISSION):
        raise PermissionDenied
    bound = "_migrate" in request.POST
    form = MigrateStationsForm(request.POST if bound else None)
    if bound and "_back" not in request.POST and form.is_valid():
        if "_confirm" not in request.POST:
            return _migrate_page(modeladmin, request, queryset, form, confirm=True)
        target = form.cleaned_data["target"]
        selection = select_stations(stations=queryset, filters=form.filters())
        try:
            batch = batch_create(
                target=target,
                stations=selection.stations,
                options=form.options(),
                created_by=request.user,
                selection=selection.record(),
                webhooks=form.webhooks(),
            )
        except BatchError as exc:
            form.add_error(None, str(exc))
        else:
            total = batch.stations.count()
            kind = "Dry run" if batch.dry_run else "Batch"
            modeladmin.message_user(
                request,
                f"{kind} {batch.id} started: {total} station(s) to {target}.",
                messages.SUCCESS,
            )
            return HttpResponseRedirect(
                reverse("admin:migrations_app_migrationbatch_change", args=[batch.id])
            )
    return _migrate_page(modeladmin, request, queryset, form, confirm=False)


def _migrate_page(
    modeladmin: admin.ModelAdmin,
    request: HttpRequest,
    queryset: QuerySet[ChargingStation],
    form: MigrateStationsForm,
    *,
    confirm: bool,
) -> TemplateResponse:
    target = form.cleaned_data["target"] if confirm else None
    # Selecting all that match the filters is carried as such: thousands of ids would be
    # posted back, and an IN list that long is past what SQLite takes.
    select_across = request.POST.get("select_across") in ("1", "True")
    ids = queryset.values_list("pk", flat=True)
    context = {
        **modeladmin.admin_site.each_context(request),
        "title": "Confirm the migration" if confirm else "Migrate to another CSMS",
        "opts": modeladmin.model._meta,
        "form": form,
        "target": target,
        "preview": station_migration_preview(
            stations=queryset,
            target=target,
            minimums=settings.MIGRATION_MIN_FIRMWARE,
            filters=form.filters() if confirm else None,
        ),
        "filters_text": form.filters().describe() if confirm else "",
        "select_across": select_across,
        "selected_ids": list(ids[:1] if select_across else ids),
        "settings_rows": (
            _selection_rows({"filters": form.filters().record()}) + _settings_rows(form.options())
            if confirm
            else []
        ),
        "action_name": ACTION_NAME,
        "action_checkbox_name": helpers.ACTION_CHECKBOX_NAME,
        "media": modeladmin.media + form.media,
    }
    template = "confirm" if confirm else "options"
    return TemplateResponse(
        request, f"admin/migrations_app/migrate_stations/{template}.html", context
    )


# The front page: the fleet overview (templatetags.fleet_overview) above the app list.
admin.site.index_template = "admin/migrations_app/index.html"

# fleet knows nothing of migrations (the apps have no import cycle): this app gives fleet's
# stations changelist its action, for those allowed to run it.
admin.site.unregister(ChargingStation)


@admin.register(ChargingStation)
class MigratableStationAdmin(ChargingStationAdmin):
    def get_actions(self, request: HttpRequest) -> dict[str, Any]:
        actions = super().get_actions(request)
        if request.user.has_perm(RUN_PERMISSION) and IS_POPUP_VAR not in request.GET:
            actions[ACTION_NAME] = self.get_action(migrate_to_another_csms)
        return actions


# --- batches -----------------------------------------------------------------------------


def _state_pill(state: str, label: str) -> str:
    return format_html('<span class="mig-pill mig-state-{}">{}</span>', state, label)


def _bar(progress: Any, *, small: bool = False) -> str:
    segments = format_html_join(
        "",
        '<span class="mig-seg mig-seg-{}" style="width: {}%" title="{}: {}"></span>',
        ((s.key, f"{s.percent:.3f}", s.label, s.count) for s in progress.segments),
    )
    return format_html(
        '<div class="mig-bar{}" role="img" aria-label="{} of {} ended">{}</div>',
        " mig-bar-small" if small else "",
        progress.ended,
        progress.total,
        segments,
    )


@admin.register(MigrationBatch)
class MigrationBatchAdmin(ReadOnlyAdminMixin, admin.ModelAdmin):
    # Batches are created by the stations' action and changed only through the controls.
    list_display = (
        "batch",
        "target",
        "sources",
        "state_pill",
        "progress",
        "counts",
        "created_by",
        "created_at",
    )
    list_display_links = ("batch",)
    list_filter = ("state", "target")
    list_per_page = 50

    class Media:
        css = {"all": ("migrations_app/admin.css",)}

    def get_queryset(self, request: HttpRequest) -> QuerySet[MigrationBatch]:
        return batch_list()

    @admin.display(description="batch", ordering="id")
    def batch(self, batch: MigrationBatch) -> str:
        suffix = " (dry run)" if batch.dry_run else ""
        return f"Batch {batch.id}{suffix}"

    @admin.display(description="from")
    def sources(self, batch: MigrationBatch) -> str:
        if batch.source is not None:
            return batch.source.name
        first = batch.first_source  # type: ignore[attr-defined]  # annotated by batch_list
        last = batch.last_source  # type: ignore[attr-defined]  # annotated by batch_list
        if first is None:
            return "-"
        return first if first == last else "several"

    @admin.display(description="state", ordering="state")
    def state_pill(self, batch: MigrationBatch) -> str:
        return _state_pill(batch.state, batch.get_state_display())

    @admin.display(description="progress")
    def progress(self, batch: MigrationBatch) -> str:
        total = batch.total  # type: ignore[attr-defined]  # annotated by batch_list
        return _bar(progress_from_segments(total, list_segment_counts(batch)), small=True)

    @admin.display(description="stations")
    def counts(self, batch: MigrationBatch) -> str:
        b: Any = batch
        parts = [f"{b.done} done"]
        parts += [f"{n} {label}" for n, label in ((b.failed, "failed"), (b.skipped, "skipped"))]
        parts += [f"{b.cancelled} cancelled"] if b.cancelled else []
        return format_html(
            '<span class="mig-counts">{} / {}: {}</span>',
            sum(getattr(b, segment) for segment in workflow.ENDED_SEGMENTS),
            b.total,
            ", ".join(parts),
        )

    def get_urls(self) -> list[Any]:
        def view(func: Callable[..., HttpResponseBase]) -> Callable[..., HttpResponseBase]:
            return self.admin_site.admin_view(func)

        name = "migrations_app_migrationbatch"
        return [
            path(
                "<path:object_id>/control/<str:control>/",
                view(self.control_view),
                name=f"{name}_control",
            ),
            path(
                "<path:object_id>/pending-removal.csv",
                view(self.pending_removal_csv),
                name=f"{name}_pending_removal_csv",
            ),
            path("<path:object_id>/audit.csv", view(self.audit_csv), name=f"{name}_audit_csv"),
            *super().get_urls(),
        ]

    def _batch(self, request: HttpRequest, object_id: str) -> MigrationBatch:
        batch = self.get_object(request, unquote(object_id))
        if batch is None:
            raise Http404(f"no batch {object_id}")
        if not self.has_view_permission(request, batch):
            raise PermissionDenied
        return batch

    def change_view(
        self,
        request: HttpRequest,
        object_id: str,
        form_url: str = "",
        extra_context: dict[str, Any] | None = None,
    ) -> HttpResponse:
        """The batch's dashboard (read-only; its buttons post to control_view)."""
        batch = self._batch(request, object_id)
        progress = batch_progress(batch)
        filters = BatchStationFilterForm(request.GET, failed_steps=batch_failed_steps(batch))
        wanted = filters.cleaned_data if filters.is_valid() else {}
        stations = batch_stations(
            batch=batch,
            state=wanted.get("state", ""),
            failed_step=wanted.get("failed_step", ""),
            reason=wanted.get("q", ""),
        )
        page = Paginator(stations, STATIONS_PER_PAGE).get_page(request.GET.get("page"))
        in_flight = progress.in_flight
        live = batch.state == BatchState.RUNNING or in_flight > 0
        can_run = request.user.has_perm(RUN_PERMISSION)
        verified = batch_verified_count(batch)
        context = {
            **self.admin_site.each_context(request),
            "title": str(batch),
            "sources_label": ", ".join(batch_source_names(batch)),
            "elapsed": _duration(
                ((batch.finished_at or timezone.now()) - batch.created_at).total_seconds()
            ),
            "opts": self.opts,
            "batch": batch,
            "progress": progress,
            "state_pill": _state_pill(batch.state, batch.get_state_display()),
            "bar": _bar(progress),
            "filters": filters,
            "filtered": any(wanted.values()),
            "page": page,
            "rows": [_station_row(migration) for migration in page.object_list],
            "actions_log": batch_actions(batch),
            "webhooks": batch_webhooks(batch),
            "deliveries": batch_webhook_deliveries(batch),
            "migrated_back_in": batch_related(batch),
            "settings_rows": _selection_rows(batch.selection) + _settings_rows(batch),
            "live": live,
            "refresh_seconds": REFRESH_SECONDS,
            "can_run": can_run,
            "held": held_for(batch),
            "controls": _controls(batch, progress, verified, request.user),
            "verified": verified,
            "media": self.media,
            **(extra_context or {}),
        }
        return TemplateResponse(
            request, "admin/migrations_app/migrationbatch/dashboard.html", context
        )

    def control_view(self, request: HttpRequest, object_id: str, control: str) -> HttpResponse:
        if request.method != "POST":
            return HttpResponseNotAllowed(["POST"])
        # Approving needs its own permission (checked by the service), not the run one.
        if control != "approve" and not request.user.has_perm(RUN_PERMISSION):
            raise PermissionDenied
        batch = self._batch(request, object_id)
        user = request.user
        back_to = reverse("admin:migrations_app_migrationbatch_change", args=[batch.id])
        try:
            if control == "approve":
                batch_approve(batch_id=batch.id, user=user)
                done = "Approved: the batch's stations may start."
            elif control == "promote":
                batch_promote(batch_id=batch.id, user=user)
                done = "Promoted: the rest of the batch starts."
            elif control == "pause":
                reason = request.POST.get("reason", "").strip()
                batch_pause(batch_id=batch.id, user=user, reason=reason)
                done = "Paused: no new station starts; those already armed finish."
            elif control == "resume":
                batch_resume(batch_id=batch.id, user=user)
                done = "Resumed."
            elif control == "cancel":
                batch_cancel(batch_id=batch.id, user=user)
                done = "Cancelled: stations not started are cancelled; armed ones finish."
            elif control == "retry":
                count = batch_retry_failed(batch_id=batch.id, user=user)
                done = f"{count} failed station(s) put back in line."
            elif control == "migrate_back":
                back = batch_migrate_back(batch_id=batch.id, user=user)
                self.message_user(
                    request,
                    f"Batch {back.id} started: this batch's verified stations back to "
                    f"{back.target}.",
                    messages.SUCCESS,
                )
                return HttpResponseRedirect(
                    reverse("admin:migrations_app_migrationbatch_change", args=[back.id])
                )
            else:
                raise Http404(f"no control {control!r}")
        except ControlError as exc:
            self.message_user(request, str(exc), messages.ERROR)
        except BatchError as exc:
            self.message_user(request, f"Cannot migrate back: {exc}", messages.ERROR)
        else:
            self.message_user(request, done, messages.SUCCESS)
        return HttpResponseRedirect(back_to)

    def pending_removal_csv(self, request: HttpRequest, object_id: str) -> HttpResponse:
        """What the old CSMS's operator needs to delete the accounts (the procedure's step 6)."""
        batch = self._batch(request, object_id)
        response = HttpResponse(content_type="text/csv; charset=utf-8")
        response["Content-Disposition"] = (
            f'attachment; filename="batch-{batch.id}-pending-removal.csv"'
        )
        writer = csv.writer(response)
        writer.writerow(PENDING_REMOVAL_COLUMNS)
        for row in batch_pending_removal_rows(batch):
            writer.writerow(_csv_cells(row[column] for column in PENDING_REMOVAL_COLUMNS))
        return response

    def audit_csv(self, request: HttpRequest, object_id: str) -> StreamingHttpResponse:
        batch = self._batch(request, object_id)
        writer = csv.writer(_Echo())

        def lines() -> Iterator[str]:
            yield writer.writerow(AUDIT_COLUMNS)
            for row in batch_audit_trail(batch):
                yield writer.writerow(_csv_cells(row[column] for column in AUDIT_COLUMNS))

        response = StreamingHttpResponse(lines(), content_type="text/csv; charset=utf-8")
        response["Content-Disposition"] = f'attachment; filename="batch-{batch.id}-audit.csv"'
        return response


def _controls(
    batch: MigrationBatch, progress: Any, verified: int, user: Any
) -> list[dict[str, Any]]:
    """The buttons that make sense now for this user; the services still refuse a wrong
    state."""
    state = batch.state
    live = state in (BatchState.RUNNING, BatchState.PAUSED)
    controls: list[dict[str, Any]] = []
    if (
        live
        and awaiting_approval(batch)
        and user.has_perm(APPROVE_PERMISSION)
        and batch.created_by_id != user.pk
    ):
        controls.append(
            {
                "name": "approve",
                "label": "Approve",
                "style": "primary",
                "confirm": "Approve the batch? Its stations start within its limits.",
            }
        )
    if not user.has_perm(RUN_PERMISSION):
        return controls
    if live and awaiting_promotion(batch):
        controls.append(
            {
                "name": "promote",
                "label": "Promote",
                "style": "primary",
                "confirm": "The canary wave ended: start the rest of the batch?",
            }
        )
    failed = progress.count(StationMigration.State.FAILED)
    if state == BatchState.RUNNING:
        controls.append({"name": "pause", "label": "Pause", "style": "warning", "reason": True})
    if state == BatchState.PAUSED:
        controls.append({"name": "resume", "label": "Resume", "style": "primary"})
    if failed and state != BatchState.CANCELLED:
        controls.append(
            {
                "name": "retry",
                "label": f"Retry {failed} failed",
                "style": "primary",
                "confirm": f"Put {failed} failed station(s) back in line?",
            }
        )
    if verified:
        target = batch.source.name if batch.source else "where they came from"
        controls.append(
            {
                "name": "migrate_back",
                "label": f"Migrate {verified} back",
                "style": "secondary",
                "confirm": f"Start a new batch moving {verified} verified station(s) back "
                f"to {target}?",
            }
        )
    if state in (BatchState.RUNNING, BatchState.PAUSED):
        controls.append(
            {
                "name": "cancel",
                "label": "Cancel batch",
                "style": "danger",
                "confirm": "Cancel the batch? Stations not started yet will not be migrated.",
            }
        )
    return controls


def _selection_rows(selection: dict[str, Any]) -> list[tuple[str, str]]:
    rows = []
    if selection.get("stations_file"):
        rows.append(("Stations file", selection["stations_file"]))
    if selection.get("filters"):
        rows.append(("Filters", selection_filters_text(selection["filters"])))
    if "filtered_out" in selection:
        rows.append(("Left out by the filters", str(selection["filtered_out"])))
    if selection.get("not_found"):
        rows.append(("Not found, left out", listed(selection["not_found"])))
    return rows


def _settings_rows(batch: MigrationBatch | BatchOptions) -> list[tuple[str, str]]:
    window = (
        f"{batch.window_start:%H:%M} to {batch.window_end:%H:%M} UTC"
        if batch.window_start and batch.window_end
        else "any time"
    )
    brake = (
        f"pause above {batch.brake_failure_ratio:.0%} failed, after {batch.brake_min_sample} ended"
        if batch.brake_failure_ratio is not None
        else "off"
    )
    return [
        ("Max in flight", str(batch.max_in_flight)),
        ("Starts per minute", str(batch.rate_per_minute or "no limit")),
        *_policy_rows(batch),
        ("Canary", f"first {batch.canary_size}" if batch.canary_size else "off"),
        ("Failure brake", brake),
        (
            "First-failures brake",
            f"pause when the first {batch.brake_first_failed} ended all failed"
            if batch.brake_first_failed
            else "off",
        ),
        ("Boot timeout", f"{batch.boot_timeout_seconds} s"),
        ("Wait-for-idle limit", f"{batch.idle_wait_seconds} s"),
        (
            "Offline queue",
            f"{batch.offline_wait_seconds} s" if batch.offline_wait_seconds else "off",
        ),
        ("Maintenance window", window),
        ("Clean up old slot", "yes" if batch.cleanup else "no"),
        ("Dry run", "yes" if batch.dry_run else "no"),
        ("Allow wss:// to ws://", "yes" if batch.allow_downgrade else "no"),
        ("Install the root CA", "yes" if batch.install_root_ca else "no"),
        (
            "No security extension",
            "proceed with a warning"
            if batch.security_extension == MigrationBatch.SecurityExtension.PROCEED
            else "skip the station",
        ),
    ]


def _policy_rows(batch: MigrationBatch | BatchOptions) -> list[tuple[str, str]]:
    """The rollout policies a batch (or the options of one) has; none when it has none."""
    rows = []
    if batch.rate_increase_factor is not None:
        growth = (
            f"times {batch.rate_increase_factor:g} every {batch.rate_increase_every} done, "
            f"up to {batch.rate_max_per_minute} a minute"
        )
        if isinstance(batch, MigrationBatch):
            growth += f" (now {rate_now(batch)} a minute, {batch.done_total} done)"
        rows.append(("Exponential rate", growth))
    criteria = policies.criteria_of(batch)
    if criteria:
        rows.append(("Abort criteria", ", ".join(criterion.text() for criterion in criteria)))
    if batch.promote_after_canary:
        promoted = ""
        if isinstance(batch, MigrationBatch) and batch.promoted_at:
            promoted = (
                f": promoted by {batch.promoted_by} at {policies.when_text(batch.promoted_at)}"
            )
        rows.append(("Promote after the canary", "yes" + promoted))
    if batch.starts_at or batch.ends_at:
        start = f"from {policies.when_text(batch.starts_at)}" if batch.starts_at else "from now"
        end = f" to {policies.when_text(batch.ends_at)}" if batch.ends_at else ""
        rows.append(("Schedule", start + end))
    if batch.approval_required:
        approval = "required"
        if isinstance(batch, MigrationBatch) and batch.approved_at:
            approval = f"approved by {batch.approved_by} at {policies.when_text(batch.approved_at)}"
        rows.append(("Approval", approval))
    return rows


def _duration(seconds: float) -> str:
    """'42 s', '3 min 12 s', '2 h 5 min'."""
    seconds = max(int(seconds), 0)
    if seconds < 60:
        return f"{seconds} s"
    minutes, seconds = divmod(seconds, 60)
    if minutes < 60:
        return f"{minutes} min {seconds} s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours} h {minutes} min"


def _station_row(migration: StationMigration) -> dict[str, Any]:
    started, finished = migration.started_at, migration.finished_at
    return {
        "migration": migration,
        "url": reverse("admin:migrations_app_stationmigration_change", args=[migration.id]),
        "pill": _state_pill(migration.state, migration.get_state_display()),
        "seconds": (finished - started).total_seconds() if started and finished else None,
    }


# --- station migrations ------------------------------------------------------------------


@admin.register(StationMigration)
class StationMigrationAdmin(ReadOnlyAdminMixin, admin.ModelAdmin):
    list_display = (
        "station",
        "batch",
        "state_pill",
        "canary",
        "failed_step",
        "reason",
        "started_at",
        "finished_at",
    )
    list_filter = ("state", "failed_step", "canary", "batch__target")
    search_fields = ("station__identity", "reason")
    list_select_related = ("station", "batch", "batch__target")
    show_full_result_count = False

    class Media:
        css = {"all": ("migrations_app/admin.css",)}

    def get_queryset(self, request: HttpRequest) -> QuerySet[StationMigration]:
        return (
            super()
            .get_queryset(request)
            .select_related("station", "source", "batch", "batch__target", "batch__source")
        )

    @admin.display(description="state", ordering="state")
    def state_pill(self, migration: StationMigration) -> str:
        return _state_pill(migration.state, migration.get_state_display())

    def change_view(
        self,
        request: HttpRequest,
        object_id: str,
        form_url: str = "",
        extra_context: dict[str, Any] | None = None,
    ) -> HttpResponse:
        """One station's migration: its plan, state history and OCPP exchanges as a timeline."""
        migration = self.get_object(request, unquote(object_id))
        if migration is None:
            raise Http404(f"no station migration {object_id}")
        if not self.has_view_permission(request, migration):
            raise PermissionDenied
        timeline = station_migration_timeline(migration)
        durations = [e.exchange.duration_ms or 0 for e in timeline if e.exchange is not None]
        longest = max(durations, default=0) or 1
        context = {
            **self.admin_site.each_context(request),
            "title": f"{migration.station.identity} in {migration.batch}",
            "opts": self.opts,
            "batch_opts": MigrationBatch._meta,
            "migration": migration,
            "pill": _state_pill(migration.state, migration.get_state_display()),
            "entries": [_timeline_entry(entry, longest) for entry in timeline],
            "exchange_count": len(durations),
            "total_ms": sum(durations),
            "snapshot": sorted((migration.config_snapshot or {}).items()),
            "live": not migration.is_terminal,
            "refresh_seconds": REFRESH_SECONDS,
            "media": self.media,
            **(extra_context or {}),
        }
        return TemplateResponse(
            request, "admin/migrations_app/stationmigration/timeline.html", context
        )


def _timeline_entry(entry: Any, longest: float) -> dict[str, Any]:
    row: dict[str, Any] = {"entry": entry, "at": entry.at, "offset": entry.offset_seconds}
    change = entry.state_change
    if change is not None:
        labels = dict(StationMigration.State.choices)
        row.update(
            kind="state",
            from_pill=_state_pill(change.from_state, labels.get(change.from_state) or "-"),
            to_pill=_state_pill(change.to_state, labels.get(change.to_state) or "-"),
            reason=change.reason,
        )
        return row
    exchange: OcppExchange = entry.exchange
    row.update(
        kind="exchange",
        exchange=exchange,
        request=_pretty(exchange.request),
        response=_pretty(exchange.response) if exchange.response is not None else "",
        ok=exchange.outcome == "result",
        width=max(1.0, 100 * (exchange.duration_ms or 0) / longest),
    )
    return row


def _pretty(value: Any) -> str:
    return json.dumps(value, indent=2, sort_keys=True)


# --- CSV ---------------------------------------------------------------------------------


class _Echo:
    """A file-like object whose write returns the line, for streaming csv.writer output."""

    def write(self, value: str) -> str:
        return value


# A cell starting with one of these is a formula to a spreadsheet: station identities and
# OCPP payloads come from the stations, so they must not run when the CSV is opened.
_FORMULA_PREFIXES = ("=", "+", "-", "@", "\t", "\r")


def _csv_cells(values: Iterable[Any]) -> list[Any]:
    cells = []
    for value in values:
        if isinstance(value, datetime):
            value = value.isoformat()
        elif value is None:
            value = ""
        elif isinstance(value, str) and value.startswith(_FORMULA_PREFIXES):
            value = "'" + value
        cells.append(value)
    return cells
