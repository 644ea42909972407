from django.apps import AppConfig


class MigrationsAppConfig(AppConfig):
    name = "migrations_app"
    verbose_name = "CSMS migrations"

    def ready(self) -> None:
        from fleet.signals import station_events_applied
        from migrations_app.services.wakes import stations_woken

        # The boot and idle events wake the migrations waiting for them (fleet sends the
        # signal and imports nothing of this app).
        station_events_applied.connect(stations_woken, dispatch_uid="migrations_app.wakes")
