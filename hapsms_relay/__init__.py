"""hapsms-relay: the webhook target for HAP's SMS self-integration.

Accepts HAP's SMS webhook posts, stores them durably, and relays them to SMS providers.
"""

__version__ = "0.1.0"
