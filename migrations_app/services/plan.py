"""Read the network keys of a GetConfiguration answer and plan the switch (pure functions)."""

from __future__ import annotations

from dataclasses import dataclass

from ocpp.v16 import call_result

PROFILE_1 = "NetworkConnectionProfile1"
PROFILE_2 = "NetworkConnectionProfile2"
PRIORITY = "NetworkConfigurationPriority"
PROFILE_TIMEOUT = "NetworkProfileConnectionTimeoutSec"
NETWORK_KEYS = [PROFILE_1, PROFILE_2, PRIORITY, PROFILE_TIMEOUT]
# OCPP 1.6 security extension: when true, the station accepts a new root certificate only
# if one it has installed signed it. Read with the network keys, for the root CA check.
ADDITIONAL_ROOT_CHECK = "AdditionalRootCertificateCheck"
# What step 1 reads in one GetConfiguration (a firmware lists the keys it lacks as unknown).
CONFIG_KEYS = [*NETWORK_KEYS, ADDITIONAL_ROOT_CHECK]
# The keys the switch cannot do without (the timeout is informative only).
REQUIRED_KEYS = (PROFILE_1, PROFILE_2, PRIORITY)
PROFILES = (PROFILE_1, PROFILE_2)


class PlanError(ValueError):
    """The station's configuration does not allow the switch; the message says why."""


class MissingKeys(PlanError):
    pass


@dataclass(frozen=True)
class NetworkPlan:
    active_slot: str
    free_slot: str
    original_priority: str
    values: dict[str, str]

    @property
    def new_priority(self) -> str:
        return f"{self.free_slot},{self.active_slot}"

    def free_slot_holds(self, url: str) -> bool:
        return self.values.get(self.free_slot) == url

    def active_slot_holds(self, url: str) -> bool:
        return self.values.get(self.active_slot) == url


def configuration_values(result: call_result.GetConfiguration) -> dict[str, str]:
    """{key: value} from a GetConfiguration result (its entries are dicts, snake_case)."""
    values = {}
    for entry in result.configuration_key or []:
        if isinstance(entry, dict) and isinstance(entry.get("key"), str):
            values[entry["key"]] = entry.get("value") or ""
    return values


def plan_switch(values: dict[str, str]) -> NetworkPlan:
    missing = [key for key in REQUIRED_KEYS if key not in values]
    if missing:
        raise MissingKeys("firmware lacks network profile keys (" + ", ".join(missing) + ")")
    priority = values[PRIORITY]
    order = [item.strip() for item in priority.split(",") if item.strip()]
    if not order or order[0] not in PROFILES:
        raise PlanError(f"{PRIORITY} is {priority!r}: cannot tell which profile is active")
    active = order[0]
    free = PROFILE_2 if active == PROFILE_1 else PROFILE_1
    return NetworkPlan(
        active_slot=active, free_slot=free, original_priority=priority, values=values
    )
