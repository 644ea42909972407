import os

from celery import Celery
from celery.signals import task_postrun, task_prerun, task_success

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "fleet.settings")

app = Celery("fleet")
app.config_from_object("django.conf:settings", namespace="CELERY")
app.autodiscover_tasks()


@task_prerun.connect
@task_postrun.connect
def retire_broken_connections(**kwargs) -> None:
    """Close a database connection that failed (a restarted PostgreSQL) or outlived its age.

    Workers reuse connections across tasks (CELERY_DB_REUSE_MAX), and Django checks them
    only around web requests: without this a worker would keep failing on a dead
    connection. A healthy one is left alone (no extra query per task).
    """
    import time

    from django.db import connections

    for conn in connections.all(initialized_only=True):
        obsolete = conn.close_at is not None and time.monotonic() >= conn.close_at
        if conn.connection is not None and (conn.errors_occurred or obsolete):
            conn.close_if_unusable_or_obsolete()


@task_success.connect
def close_retried_result(sender=None, result=None, **kwargs) -> None:
    """A task that ignores its result still stores each retry (CELERY_TASK_STORE_ERRORS_EVEN_
    IF_IGNORED): without its success the row would stay RETRY, as if the task were lost."""
    request = sender.request if sender is not None else None
    if request is not None and request.retries and sender.ignore_result:
        sender.backend.store_result(request.id, result, "SUCCESS", request=request)
