from django.urls import path

from migrations_app.views import metrics

urlpatterns = [
    path("metrics", metrics, name="metrics"),
]
