"""deploy/README.md points at files that exist and says what was not run here."""

from __future__ import annotations

import re

from tests.deploy.helpers import DEPLOY, ETC

README = DEPLOY / "README.md"


def test_every_file_the_readme_names_exists():
    # `deploy/...`, or a path inside deploy/ such as `systemd/*.service` or `compose.yaml`.
    pattern = (
        r"`((?:deploy/|systemd/|nginx/)[\w./@*-]+"
        r"|[\w.-]+\.(?:yaml|example|conf)|Procfile|Dockerfile[\w.]*)`"
    )
    named = set(re.findall(pattern, README.read_text()))

    assert {"Procfile", "compose.yaml", "nginx/csms-migrate.conf"} <= named
    for name in named:
        relative = name.removeprefix("deploy/")
        assert list(DEPLOY.glob(relative)), f"README names {name}, which does not exist"


def test_the_readme_documents_every_setting_of_the_example_env():
    text = README.read_text()
    settings = re.findall(r"^([A-Z_]+)=", (ETC / "env").read_text(), flags=re.MULTILINE)

    missing = [name for name in settings if f"`{name}`" not in text]

    assert not missing, f"deploy/README.md does not mention {missing}"


def test_the_readme_says_docker_was_not_run_here():
    assert "no engine" in README.read_text()
