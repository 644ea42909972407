"""Settings for the test run: the project's own, with a throwaway secret key."""

import os
from pathlib import Path

os.environ.setdefault("SECRET_KEY", "tests-only-not-secret")

from fleet.settings import *  # noqa: F403
from fleet.settings import DATABASES

# Worker processes share the test database, so it is a file; its folder may be new.
if "TEST" in DATABASES["default"]:
    Path(DATABASES["default"]["TEST"]["NAME"]).parent.mkdir(parents=True, exist_ok=True)
