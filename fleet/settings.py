"""One settings module for development, tests and production; the environment decides.

DATABASE_URL  default: SQLite file db.sqlite3 in the project (PostgreSQL: postgres://...)
REDIS_URL     default: redis://127.0.0.1:6379/0 (Celery broker, command bridge, events)
SECRET_KEY    required unless DEBUG is on
DEBUG         default off
ALLOWED_HOSTS default: localhost,127.0.0.1 (comma separated)
"""

import math
import os
from pathlib import Path

import dj_database_url

from fleet.env import env_bool, env_float, env_list, env_str

BASE_DIR = Path(__file__).resolve().parent.parent

DEBUG = env_bool("DEBUG", False)
SECRET_KEY = env_str("SECRET_KEY", "insecure-development-key" if DEBUG else None)
ALLOWED_HOSTS = env_list("ALLOWED_HOSTS", ["localhost", "127.0.0.1"])
CSRF_TRUSTED_ORIGINS = env_list("CSRF_TRUSTED_ORIGINS", [])

INSTALLED_APPS = [
    "django.contrib.admin",
    "django.contrib.auth",
    "django.contrib.contenttypes",
    "django.contrib.sessions",
    "django.contrib.messages",
    "django.contrib.staticfiles",
    "django_celery_results",
    "fleet",
    "migrations_app",
]

MIDDLEWARE = [
    "django.middleware.security.SecurityMiddleware",
    "whitenoise.middleware.WhiteNoiseMiddleware",
    "django.contrib.sessions.middleware.SessionMiddleware",
    "django.middleware.common.CommonMiddleware",
    "django.middleware.csrf.CsrfViewMiddleware",
    "django.contrib.auth.middleware.AuthenticationMiddleware",
    "django.contrib.messages.middleware.MessageMiddleware",
    "django.middleware.clickjacking.XFrameOptionsMiddleware",
]

ROOT_URLCONF = "fleet.urls"
WSGI_APPLICATION = "fleet.wsgi.application"

TEMPLATES = [
    {
        "BACKEND": "django.template.backends.django.DjangoTemplates",
        "DIRS": [],
        "APP_DIRS": True,
        "OPTIONS": {
            "context_processors": [
                "django.template.context_processors.request",
                "django.contrib.auth.context_processors.auth",
                "django.contrib.messages.context_processors.messages",
            ],
        },
    },
]

DATABASES = {
    "default": dj_database_url.parse(
        env_str("DATABASE_URL", f"sqlite:///{BASE_DIR / 'db.sqlite3'}"), conn_max_age=60
    )
}
if DATABASES["default"]["ENGINE"] == "django.db.backends.sqlite3":
    # Workers, event ingestion and the admin all write. SQLite allows one writer: WAL lets
    # readers go on during a write, IMMEDIATE takes the write lock at BEGIN (no deadlock on
    # lock upgrade) and the timeout makes a writer wait instead of failing at once.
    DATABASES["default"]["OPTIONS"] = {
        "timeout": 30,
        "transaction_mode": "IMMEDIATE",
        "init_command": "PRAGMA journal_mode=WAL; PRAGMA synchronous=NORMAL;",
    }
    # Worker processes in tests must see the test database: a file, never :memory:.
    DATABASES["default"]["TEST"] = {
        "NAME": env_str("TEST_SQLITE_PATH", str(BASE_DIR / "var" / "test.sqlite3"))
    }

# Reuse connections across requests and tasks (a new SQLite connection with its PRAGMAs
# cost ~2 ms per task), checked before reuse.
DATABASES["default"]["CONN_HEALTH_CHECKS"] = True

DEFAULT_AUTO_FIELD = "django.db.models.BigAutoField"

AUTH_PASSWORD_VALIDATORS = [
    {"NAME": "django.contrib.auth.password_validation.UserAttributeSimilarityValidator"},
    {"NAME": "django.contrib.auth.password_validation.MinimumLengthValidator"},
    {"NAME": "django.contrib.auth.password_validation.CommonPasswordValidator"},
    {"NAME": "django.contrib.auth.password_validation.NumericPasswordValidator"},
]

LANGUAGE_CODE = "en-us"
TIME_ZONE = "UTC"
USE_I18N = True
USE_TZ = True

STATIC_URL = "static/"
STATIC_ROOT = env_str("STATIC_ROOT", str(BASE_DIR / "var" / "static"))

# Behind a TLS-terminating proxy (deploy/nginx): trust its scheme header, secure cookies.
SECURE_PROXY_SSL_HEADER = ("HTTP_X_FORWARDED_PROTO", "https")
SESSION_COOKIE_SECURE = env_bool("SECURE_COOKIES", False)
CSRF_COOKIE_SECURE = SESSION_COOKIE_SECURE

LOGGING = {
    "version": 1,
    "disable_existing_loggers": False,
    "formatters": {"plain": {"format": "%(asctime)s %(levelname)s %(name)s: %(message)s"}},
    "handlers": {"console": {"class": "logging.StreamHandler", "formatter": "plain"}},
    "root": {"handlers": ["console"], "level": env_str("LOG_LEVEL", "INFO")},
}

# --- Redis and Celery -------------------------------------------------------------------
REDIS_URL = env_str("REDIS_URL", "redis://127.0.0.1:6379/0")

CELERY_BROKER_URL = REDIS_URL
CELERY_RESULT_BACKEND = "django-db"
CELERY_RESULT_EXTENDED = True
# Tasks that ignore their result (the frequent ones) still leave a row when they fail.
CELERY_TASK_STORE_ERRORS_EVEN_IF_IGNORED = True
CELERY_TASK_SERIALIZER = "json"
CELERY_ACCEPT_CONTENT = ["json"]
# A step task is acknowledged only after it ran, and a task whose worker child died
# (SIGKILL, OOM) is re-queued rather than dropped: no station is lost mid-migration. The
# price is that a task may run twice, so every task is written to be safe to repeat.
CELERY_TASK_ACKS_LATE = True
CELERY_TASK_REJECT_ON_WORKER_LOST = True
# Flower shows tasks live only when workers send events.
# (Not the "sent" events: the worker's parent spent 43 % of its CPU publishing them for tasks
# that steps send, and Flower does not need them.)
CELERY_WORKER_SEND_TASK_EVENTS = True
CELERY_BROKER_CONNECTION_RETRY_ON_STARTUP = True
# Celery closes the database connection after every task unless told to reuse it, and a
# new SQLite connection with its PRAGMAs cost ~2 ms a task. A connection that failed (a
# restarted PostgreSQL) or outlived CONN_MAX_AGE is closed around each task instead
# (fleet.celery.retire_broken_connections), so the next task reconnects.
CELERY_DB_REUSE_MAX = 1000
# Step tasks spend much of their time waiting for a station's answer (a group's stations
# one after another): two prefork children per usable core keep the cores busy. More lose
# at steady state (benchmarks/README.md, issue 9, 2 cores: 4 children 30.4 stations/s over
# 10,000, 8 children 27.4, though 8 win a short 1,000-station run). At most 16: each child
# holds a database connection (PostgreSQL allows 100 by default) and ~95 MB resident.
_USABLE_CORES = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
CELERY_WORKER_CONCURRENCY = int(
    env_float("CELERY_WORKER_CONCURRENCY", min(2 * (_USABLE_CORES or 1), 16))
)

# Countdowns stay far below the visibility timeout (a scheduled drive waits at most 30 s):
# a message held by a worker longer than this is delivered again. Said here, not assumed.
CELERY_BROKER_TRANSPORT_OPTIONS = {"visibility_timeout": 3600}

# --- The command bridge -----------------------------------------------------------------
# Default deadline of one OCPP command, publish to reply.
OCPP_COMMAND_TIMEOUT = env_float("OCPP_COMMAND_TIMEOUT", 30.0)
# A step task runs the stations of its group (migrations_app.tasks) one after another for
# up to this long, then hands the rest on to a new task.
MIGRATION_STEP_GROUP_BUDGET_SECONDS = OCPP_COMMAND_TIMEOUT
# A step sends at most four commands that may each wait their deadline plus the reply grace
# (verification: the confirmation, a look for the station, a two-write rollback), and may
# start just before its group's budget ends: past that it is interrupted, and the hard limit
# leaves its failure path time for a rollback. Whole seconds, rounded up (Celery's limits
# are typed int).
MIGRATION_STEP_SOFT_TIME_LIMIT = math.ceil(
    MIGRATION_STEP_GROUP_BUDGET_SECONDS + 4 * (OCPP_COMMAND_TIMEOUT + 1) + 10
)
MIGRATION_STEP_HARD_TIME_LIMIT = math.ceil(
    MIGRATION_STEP_SOFT_TIME_LIMIT + 2 * (OCPP_COMMAND_TIMEOUT + 1) + 5
)

# --- Migrations -------------------------------------------------------------------------
# First firmware of each version line that has the network profile keys (vendor document).
MIGRATION_MIN_FIRMWARE = {"4.2": "4.2.85", "3.5": "3.5.54"}
# A station whose step has not moved for this long has its step sent again (lost task).
MIGRATION_STEP_LEASE_SECONDS = env_float("MIGRATION_STEP_LEASE_SECONDS", 90.0)
# The longest a waiting step (boot, settle, idle) goes without looking on its own: the
# events it waits for wake it at once (migrations_app.services.wakes), so this only bounds
# how late a lost wake is made up for. Kept to half the lease or less (steps.wait_timer).
MIGRATION_WAIT_TIMER_SECONDS = env_float("MIGRATION_WAIT_TIMER_SECONDS", 30.0)
# A step that raises an unexpected error is tried this many times, then the station fails
# with the error as its reason (not re-driven forever).
MIGRATION_STEP_MAX_ATTEMPTS = int(env_float("MIGRATION_STEP_MAX_ATTEMPTS", 5))
# migrate_fleet --wait gives up (exit 3) after this long with no progress and no live
# worker: nothing can move the batch. Longer than a worker's restart.
MIGRATION_WAIT_STALL_SECONDS = env_float("MIGRATION_WAIT_STALL_SECONDS", 60.0)
# How long a station that booted on the target must stay there before it is verified.
# None (the default; unset or empty in the environment): the station's own
# NetworkProfileConnectionTimeoutSec plus a margin, the time a station that cannot keep the
# new connection needs to fall back to its previous profile.
MIGRATION_SETTLE_SECONDS = (
    env_float("MIGRATION_SETTLE_SECONDS", 0.0)
    if os.environ.get("MIGRATION_SETTLE_SECONDS")
    else None
)

# GET /metrics (Prometheus): served to a scraper that sends "Authorization: Bearer
# <METRICS_TOKEN>", or to a signed-in staff user as the admin is; empty: staff only.
METRICS_TOKEN = env_str("METRICS_TOKEN", "")
# Batches finished longer ago than this drop out of /metrics (running ones never do).
MIGRATION_METRICS_FINISHED_HOURS = env_float("MIGRATION_METRICS_FINISHED_HOURS", 24.0)

# Webhook notifications (migrations_app.services.notifications). A default webhook every
# new batch gets, with its signing secret and whether it also hears of every failed station.
MIGRATION_WEBHOOK_URL = env_str("MIGRATION_WEBHOOK_URL", "")
MIGRATION_WEBHOOK_SECRET = env_str("MIGRATION_WEBHOOK_SECRET", "")
MIGRATION_WEBHOOK_STATION_FAILURES = env_bool("MIGRATION_WEBHOOK_STATION_FAILURES", False)
# Attempts per delivery, and the wait after the first failed one (doubled each time).
MIGRATION_WEBHOOK_MAX_ATTEMPTS = int(env_float("MIGRATION_WEBHOOK_MAX_ATTEMPTS", 6))
MIGRATION_WEBHOOK_RETRY_SECONDS = env_float("MIGRATION_WEBHOOK_RETRY_SECONDS", 5.0)

CELERY_BEAT_SCHEDULE = {
    # A safety net: batches drive themselves and workers re-send a dead worker's tasks.
    # Starts rate-limited stations when they are due and re-drives lost steps.
    "migrations-tick": {"task": "migrations.tick", "schedule": 1.0},
    # Gateways nudge ingestion when they write events; this sweep picks up what a dead
    # worker left pending (reclaimed after 60 s) when no new event brings a nudge.
    "fleet-ingest-events": {"task": "fleet.ingest_events", "schedule": 60.0},
}
