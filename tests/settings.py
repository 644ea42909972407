"""Settings for the test run: the project's own, with a throwaway secret key."""

import os

os.environ.setdefault("SECRET_KEY", "tests-only-not-secret")

from fleet.settings import *  # noqa: F403
