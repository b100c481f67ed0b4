"""Providers, one module each, and the explicit registry keyed by the config's ``type``."""

from __future__ import annotations

from hapsms_relay.providers.aliyun import AliyunProvider
from hapsms_relay.providers.base import (
    Common,
    Message,
    Outcome,
    Provider,
    ProviderFactory,
    Sent,
)
from hapsms_relay.providers.file import FileProvider
from hapsms_relay.providers.http import HttpProvider
from hapsms_relay.providers.log import LogProvider
from hapsms_relay.providers.smtp import SmtpProvider
from hapsms_relay.providers.tencent import TencentProvider
from hapsms_relay.providers.twilio import TwilioProvider
from hapsms_relay.providers.vonage import VonageProvider

REGISTRY: dict[str, ProviderFactory] = {
    "file": FileProvider.from_config,
    "log": LogProvider.from_config,
    "http": HttpProvider.from_config,
    "twilio": TwilioProvider.from_config,
    "vonage": VonageProvider.from_config,
    "tencent": TencentProvider.from_config,
    "aliyun": AliyunProvider.from_config,
    "smtp": SmtpProvider.from_config,
}

__all__ = ["REGISTRY", "Common", "Message", "Outcome", "Provider", "Sent"]
