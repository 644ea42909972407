import importlib

import pytest
from django.core.exceptions import ValidationError

from fleet.models import CsmsBackend
from fleet.validators import (
    csms_url_problems,
    root_ca_summary,
    same_csms_url,
    upstream_url_problems,
    validate_csms_url,
)
from ocpp_gateway.upstream import url_without_credentials


@pytest.mark.parametrize(
    "url",
    [
        "ws://csms.example.com/ocpp",
        "wss://csms.example.com:443/ocpp/",
        "ws://10.0.0.7:9000",
        "wss://[2001:db8::1]/ocpp",
        "WSS://Csms.Example.com/ocpp/16",
        "wss://csms.example.com/" + "a" * (500 - len("wss://csms.example.com/")),
    ],
)
def test_it_accepts_websocket_urls(url):
    assert csms_url_problems(url) == []
    validate_csms_url(url)


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        ("ws://csms.example .com/ocpp", "whitespace"),
        ("ws://csms.example.com/\tocpp", "whitespace"),
        ("ws://csms.example.com/ocpp\n", "whitespace"),
        (" ws://csms.example.com/ocpp", "whitespace"),
        ("ws://csms.example.com/\u00a0ocpp", "whitespace"),
        ("ws://csms.example.com/\u200bocpp", "invisible"),
        ('"ws://csms.example.com/ocpp"', "quote"),
        ("ws://csms.example.com/o'cpp", "quote"),
        ("ws://csms.example.com/\u201cocpp\u201d", "quote"),
        ("http://csms.example.com/ocpp", "must start with ws:// or wss://"),
        ("https://csms.example.com/ocpp", "must start with ws:// or wss://"),
        ("csms.example.com/ocpp", "must start with ws:// or wss://"),
        ("ws:///ocpp", "no host"),
        ("wss://", "no host"),
        ("ws://csms.example.com:99999/ocpp", "cannot be parsed"),
        ("ws://[::1/ocpp", "cannot be parsed"),
        ("", "empty"),
        ("wss://csms.example.com/" + "a" * 500, "at most 500"),
    ],
)
def test_it_refuses_bad_urls_saying_why(url, expected):
    problems = csms_url_problems(url)
    assert any(expected in problem for problem in problems), problems
    with pytest.raises(ValidationError) as raised:
        validate_csms_url(url)
    assert raised.value.messages == problems


def test_it_reports_every_problem_at_once():
    problems = csms_url_problems("http://exa mple.com/'x'")
    assert len(problems) == 3
    assert "position 11" in problems[0]


def test_it_refuses_what_is_not_text():
    assert csms_url_problems(None) == ["The URL must be text."]


def test_the_model_uses_it(db):
    backend = CsmsBackend(name="alpha", url="ws://csms.example.com/ocpp ")
    with pytest.raises(ValidationError) as raised:
        backend.full_clean()
    assert "url" in raised.value.message_dict


@pytest.mark.parametrize(
    ("url", "shown"),
    [
        ("wss://user:pass@real.example.com/ocpp", "wss://real.example.com/ocpp"),
        ("wss://user@real.example.com:8443/ocpp", "wss://real.example.com:8443/ocpp"),
        ("wss://real.example.com/ocpp", "wss://real.example.com/ocpp"),
        ("", ""),
    ],
)
def test_an_upstream_is_shown_without_credentials(url, shown):
    assert url_without_credentials(url) == shown
    assert CsmsBackend(upstream_url=url).upstream_shown == shown
    assert CsmsBackend(upstream_url=url).mode == ("proxy" if url else "endpoint")


def test_the_root_ca_summary_names_the_subject_and_the_fingerprint(root_ca):
    assert root_ca_summary(root_ca.pem) == f"CN=CSMS 2 Root CA (SHA-256 {root_ca.sha256})"


@pytest.mark.parametrize(
    "url", ["wss://user:pass@real.example.com/ocpp", "ws://user@real.example.com:8080/ocpp"]
)
def test_an_upstream_with_credentials_is_refused_saying_where_they_go(url):
    problems = upstream_url_problems(url)

    assert len(problems) == 1
    assert "contains credentials (user:password@)" in problems[0]
    assert "put per-station credentials in the gateway's --upstream-auth-file" in problems[0]
    assert "pass" not in problems[0].replace("password", "")
    # The station's own URL is checked as before: a station URL is not an upstream.
    assert csms_url_problems(url) == []


def test_an_upstream_without_credentials_has_the_csms_url_rules():
    assert upstream_url_problems("wss://real.example.com/ocpp") == []
    assert upstream_url_problems("https://real.example.com/ocpp") == csms_url_problems(
        "https://real.example.com/ocpp"
    )


@pytest.mark.parametrize(
    ("one", "other", "same"),
    [
        ("wss://a.example.com/ocpp", "wss://a.example.com/ocpp", True),
        ("wss://A.example.com:443/ocpp/", "WSS://a.example.com/ocpp", True),
        ("ws://a.example.com/ocpp", "ws://a.example.com:80/ocpp", True),
        ("wss://a.example.com/ocpp", "ws://a.example.com/ocpp", False),
        ("wss://a.example.com/ocpp", "wss://a.example.com:8443/ocpp", False),
        ("wss://a.example.com/ocpp", "wss://b.example.com/ocpp", False),
        ("wss://a.example.com/ocpp", "wss://a.example.com/ocpp2", False),
    ],
)
def test_same_csms_url(one, other, same):
    assert same_csms_url(one, other) is same


def test_the_model_refuses_an_upstream_that_is_its_own_url(db):
    backend = CsmsBackend(name="csms-1", url="wss://csms-1.example.com/ocpp")
    backend.upstream_url = "wss://csms-1.example.com/ocpp"

    with pytest.raises(ValidationError) as raised:
        backend.full_clean()

    assert "own URL" in raised.value.message_dict["upstream_url"][0]


def test_the_migration_takes_credentials_out_of_recorded_upstreams(db):
    """Rows saved before upstream credentials were refused lose them (the admin showed them
    in clear); the gateways are not affected, they connect to their own --upstream."""
    from django.apps import apps

    strip = importlib.import_module("fleet.migrations.0005_upstream_without_credentials")
    CsmsBackend.objects.create(
        name="a", url="wss://a.example.com/ocpp", upstream_url="wss://u:s3cret@real.example.com/o"
    )
    CsmsBackend.objects.create(
        name="b", url="wss://b.example.com/ocpp", upstream_url="wss://real-b.example.com/o"
    )

    strip.strip_upstream_credentials(apps, None)

    assert dict(CsmsBackend.objects.values_list("name", "upstream_url")) == {
        "a": "wss://real.example.com/o",
        "b": "wss://real-b.example.com/o",
    }
