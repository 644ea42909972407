from django.contrib import admin
from django.urls import include, path

urlpatterns = [
    path("admin/", admin.site.urls),
    # GET /metrics for Prometheus.
    path("", include("migrations_app.urls")),
]
