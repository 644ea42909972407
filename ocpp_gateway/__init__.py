"""The OCPP 1.6J gateway: an asyncio process that holds station connections.

It imports nothing from Django; it talks to the Django side only through Redis
(see ``envelopes``). In endpoint mode it is the CSMS (``session``); in proxy mode
(``--upstream``) it relays each station to an upstream CSMS (``proxy``, ``upstream``).
"""
