"""deploy/nginx/csms-migrate.conf: websocket proxying for the stations, checked by reading
(and by `nginx -t` where nginx is installed)."""

from __future__ import annotations

import re
import shutil
import subprocess

import pytest

from tests.deploy.helpers import DEPLOY, ETC, read_env_file

CONF = DEPLOY / "nginx" / "csms-migrate.conf"


def statements(text: str) -> list[str]:
    """Directives and block openings/closings, comments removed, one per item."""
    without_comments = "\n".join(line.split("#", 1)[0] for line in text.splitlines())
    return [item.strip() for item in re.split(r"(?<=[;{}])", without_comments) if item.strip()]


def block(text: str, opening: str) -> list[str]:
    """The statements inside the block that starts with `opening {` (nested ones included)."""
    items = statements(text)
    start = items.index(f"{opening} {{")
    depth = 0
    for end in range(start, len(items)):
        depth += items[end].endswith("{") - (items[end] == "}")
        if depth == 0:
            return items[start + 1 : end]
    raise AssertionError(f"{opening} is not closed")


def test_braces_balance_and_every_directive_ends_with_a_semicolon():
    items = statements(CONF.read_text())
    depth = 0
    for item in items:
        assert item.endswith((";", "{", "}")), f"unterminated: {item!r}"
        depth += item.endswith("{") - (item == "}")
        assert depth >= 0
    assert depth == 0


def test_stations_get_a_websocket_upgrade_to_the_gateways():
    text = CONF.read_text()
    ocpp = block(text, "location /ocpp/")

    assert "proxy_http_version 1.1;" in ocpp
    assert "proxy_set_header Upgrade $http_upgrade;" in ocpp
    assert "proxy_set_header Connection $connection_upgrade;" in ocpp
    assert "proxy_buffering off;" in ocpp
    assert "proxy_set_header Authorization $http_authorization;" in ocpp
    timeout = next(item for item in ocpp if item.startswith("proxy_read_timeout"))
    assert int(re.search(r"(\d+)s?;", timeout).group(1)) >= 3600
    # The map that turns an Upgrade request into "Connection: upgrade".
    assert "default upgrade;" in block(text, "map $http_upgrade $connection_upgrade")


def test_each_csms_path_goes_to_its_own_gateways():
    text = CONF.read_text()
    ocpp = block(text, "location /ocpp/")

    for csms in ("csms-1", "csms-2"):
        upstream = f"csms_{csms.split('-')[1]}_gateways"
        assert f"location /ocpp/{csms}/ {{" in ocpp
        assert f"proxy_pass http://{upstream};" in block(text, f"location /ocpp/{csms}/")
        port = read_env_file(ETC / f"gateway-{csms}.env")["GATEWAY_PORT"]
        assert f"server 127.0.0.1:{port};" in block(text, f"upstream {upstream}")


def test_the_rest_goes_to_the_web_app_and_static_files_to_disk():
    text = CONF.read_text()
    web_bind = read_env_file(ETC / "env")["WEB_BIND"]

    assert f"server {web_bind};" in block(text, "upstream csms_migrate_web")
    assert "proxy_pass http://csms_migrate_web;" in block(text, "location /")
    # STATIC_ROOT is var/static under the code (fleet/settings.py).
    assert "alias /opt/csms-migrate/var/static/;" in block(text, "location /static/")


def test_tls_is_terminated_with_tls_12_or_later_only():
    server = block(CONF.read_text(), "server")  # the first server block: the redirect
    assert "return 301 https://$host$request_uri;" in server
    text = CONF.read_text()
    assert re.search(r"listen 443 ssl", text)
    protocols = re.search(r"ssl_protocols ([^;]+);", text).group(1).split()
    assert set(protocols) <= {"TLSv1.2", "TLSv1.3"}


def server_for(text: str, name: str) -> list[str]:
    """The statements of the server block whose server_name is ``name``."""
    items = statements(text)
    for start, item in enumerate(items):
        if item != "server {":
            continue
        depth, end = 0, start
        for end in range(start, len(items)):
            depth += items[end].endswith("{") - (items[end] == "}")
            if depth == 0:
                break
        inside = items[start + 1 : end]
        if f"server_name {name};" in inside:
            return inside
    raise AssertionError(f"no server block for {name}")


WEBSOCKET = [
    "proxy_http_version 1.1;",
    "proxy_set_header Upgrade $http_upgrade;",
    "proxy_set_header Connection $connection_upgrade;",
    "proxy_set_header Authorization $http_authorization;",
    "proxy_buffering off;",
    "proxy_read_timeout 3600s;",
]


@pytest.mark.parametrize(
    ("name", "gateways", "certificate"),
    [
        # CSMS 1's own name (and certificate) now points at the csms-1 proxy gateways.
        ("csms-1.example.com", "csms_1_gateways", "/etc/ssl/csms-1/fullchain.pem"),
        # The proxy in front of CSMS 2, whose URL is written into the stations.
        ("csms-2-proxy.example.com", "csms_2_gateways", "/etc/ssl/csms-2-proxy/fullchain.pem"),
    ],
)
def test_each_proxy_name_has_its_certificate_and_goes_to_its_gateways(name, gateways, certificate):
    server = server_for(CONF.read_text(), name)

    assert "listen 443 ssl;" in server
    assert f"ssl_certificate {certificate};" in [" ".join(item.split()) for item in server]
    assert f"proxy_pass http://{gateways};" in server
    for directive in WEBSOCKET:
        assert directive in server, (name, directive)
    protocols = next(item for item in server if item.startswith("ssl_protocols"))
    assert set(protocols.rstrip(";").split()[1:]) <= {"TLSv1.2", "TLSv1.3"}


def test_the_proxy_names_match_the_examples_of_the_gateways_and_add_csms():
    text = CONF.read_text()
    csms_2 = read_env_file(ETC / "gateway-csms-2.env")["GATEWAY_UPSTREAM_ARGS"].split()

    # What add_csms records as csms-2's URL is the proxy's name, its upstream the real one.
    assert "add_csms csms-2 wss://csms-2-proxy.example.com/ocpp" in text
    assert "--upstream wss://real-csms-2.example.com/ocpp" in text
    assert csms_2 == ["--upstream", "wss://real-csms-2.example.com/ocpp"]
    # The proxy names are not the upstreams' names: nginx must not loop to itself.
    assert "server_name real-" not in text
    # Said plainly where the set-up is described.
    assert "profile 3" in text


@pytest.mark.skipif(shutil.which("nginx") is None, reason="nginx is not installed")
def test_nginx_accepts_the_configuration(tmp_path):
    openssl = shutil.which("openssl")
    if openssl is None:
        pytest.skip("openssl is needed for a throwaway certificate")
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(
        [
            *(openssl, "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1"),
            *("-subj", "/CN=fleet.example.com", "-keyout", str(key), "-out", str(cert)),
        ],
        check=True,
        capture_output=True,
    )
    conf = CONF.read_text()
    for directory in ("csms-migrate", "csms-1", "csms-2-proxy"):
        conf = conf.replace(f"/etc/ssl/{directory}/fullchain.pem", str(cert))
        conf = conf.replace(f"/etc/ssl/{directory}/privkey.pem", str(key))
    (tmp_path / "csms-migrate.conf").write_text(conf)
    (tmp_path / "nginx.conf").write_text(
        f"pid {tmp_path}/nginx.pid;\nerror_log {tmp_path}/error.log;\n"
        f"events {{}}\nhttp {{\n    include {tmp_path}/csms-migrate.conf;\n}}\n"
    )

    result = subprocess.run(
        ["nginx", "-t", "-p", str(tmp_path), "-c", str(tmp_path / "nginx.conf")],
        capture_output=True,
        text=True,
        timeout=30,
    )

    assert result.returncode == 0, result.stderr
