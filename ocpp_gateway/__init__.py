"""The OCPP 1.6J gateway: an asyncio process that holds station connections.

It imports nothing from Django; it talks to the Django side only through Redis
(see ``envelopes``).
"""
