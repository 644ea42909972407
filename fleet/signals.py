"""What the inventory tells other apps; they connect to these, fleet imports none of them."""

from __future__ import annotations

from django.dispatch import Signal

# Sent once per applied batch of station events, after its transaction committed (so a
# receiver reads what the batch wrote), with:
#   booted: frozenset[int], the ids of the stations with a new BootNotification in the
#     batch, on any CSMS and whatever the CSMS answered (accepted, pending, rejected);
#   connectors: dict[int, dict], for each station whose connector status changed in the
#     batch, its ``connector_status`` after the batch.
# Receivers are called robustly: one that raises is logged and costs ingestion nothing.
station_events_applied = Signal()
