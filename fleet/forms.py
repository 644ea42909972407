"""Admin forms of the fleet inventory."""

from __future__ import annotations

from typing import Any

from django import forms

from fleet.models import CsmsBackend, Registration
from fleet.services.registrations import FILE_FORMAT_HELP
from fleet.validators import ROOT_CA_MAX_BYTES, root_ca_pem_from_file
from ocpp_gateway.envelopes import password_digest

# A whitelist of 100,000 stations is a few MB; anything far larger is not one.
IMPORT_MAX_BYTES = 20 * 1024 * 1024


class RegistrationForm(forms.ModelForm):
    """The password is write-only: only its digest is kept (and published to the gateways)."""

    password = forms.CharField(
        required=False,
        strip=False,
        widget=forms.PasswordInput(render_value=False),
        help_text="The station's password (HTTP Basic). Leave empty to keep the current one.",
    )
    clear_password = forms.BooleanField(
        required=False, label="No password", help_text="Remove the password."
    )

    class Meta:
        model = Registration
        fields = ("station", "csms", "state", "serial_number")

    def save(self, commit: bool = True) -> Any:
        registration = super().save(commit=False)
        if self.cleaned_data.get("clear_password"):
            registration.password_sha256 = ""
        elif self.cleaned_data.get("password"):
            registration.password_sha256 = password_digest(self.cleaned_data["password"])
        if commit:
            registration.save()
        return registration


class RegistrationImportForm(forms.Form):
    csms = forms.ModelChoiceField(
        queryset=CsmsBackend.objects.order_by("name"),
        label="CSMS",
        empty_label=None,
        help_text="The CSMS to register the stations on.",
    )
    file = forms.FileField(label="CSV file", help_text=FILE_FORMAT_HELP)

    def clean_file(self) -> Any:
        upload = self.cleaned_data["file"]
        if upload.size > IMPORT_MAX_BYTES:
            raise forms.ValidationError(
                f"The file is {upload.size} bytes; at most {IMPORT_MAX_BYTES} are accepted."
            )
        return upload


class CsmsBackendForm(forms.ModelForm):
    """The root CA arrives as a file (what a CSMS vendor hands over), never pasted text."""

    root_ca_file = forms.FileField(
        required=False,
        label="Root CA certificate file",
        help_text="PEM or DER file of the CA certificate the stations need to trust the URL "
        "(wss://); pre-flight checks that each station has it. Leave empty to keep the "
        "current one.",
    )
    clear_root_ca = forms.BooleanField(
        required=False, label="No root CA", help_text="Remove the root CA certificate."
    )

    class Meta:
        model = CsmsBackend
        fields = ("name", "url", "open_admission", "upstream_url")

    def clean_root_ca_file(self) -> str | None:
        """The PEM to store, or None to keep what is there."""
        upload = self.cleaned_data.get("root_ca_file")
        if not upload:
            return None
        if upload.size > ROOT_CA_MAX_BYTES:
            raise forms.ValidationError(
                f"The file is {upload.size} bytes: a root CA certificate is a few KiB."
            )
        try:
            return root_ca_pem_from_file(upload.read())
        except ValueError as exc:
            raise forms.ValidationError(str(exc)) from exc

    def clean(self) -> dict[str, Any]:
        super().clean()
        cleaned = self.cleaned_data
        if cleaned.get("clear_root_ca") and cleaned.get("root_ca_file"):
            raise forms.ValidationError(
                "Either upload a root CA certificate or remove it, not both."
            )
        return cleaned

    def save(self, commit: bool = True) -> Any:
        backend = super().save(commit=False)
        if self.cleaned_data.get("clear_root_ca"):
            backend.root_ca_pem = ""
        elif self.cleaned_data.get("root_ca_file"):
            backend.root_ca_pem = self.cleaned_data["root_ca_file"]
        if commit:
            backend.save()
        return backend
