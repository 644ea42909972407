import pytest
from django.core.exceptions import ValidationError

from fleet.models import CsmsBackend
from fleet.validators import (
    csms_url_problems,
    root_ca_summary,
    url_without_credentials,
    validate_csms_url,
)


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
