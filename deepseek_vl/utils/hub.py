"""Fail fast without a network: huggingface_hub retries a download whose host does not resolve five times
(about 25 s) before it looks in the local cache; a one-shot name lookup tells at once that only the cache can help."""

from __future__ import annotations

import functools
import os
import socket
from urllib.parse import urlparse

__all__ = ["hub_unreachable"]

_PROXY_VARIABLES = ("HTTPS_PROXY", "https_proxy", "HTTP_PROXY", "http_proxy", "ALL_PROXY", "all_proxy")


@functools.cache
def hub_unreachable() -> bool:
    """True when the Hub's host name does not resolve (and no proxy would resolve it for us): use the cache only."""
    from huggingface_hub import constants

    if constants.HF_HUB_OFFLINE or any(os.environ.get(name) for name in _PROXY_VARIABLES):
        return False  # offline already handled by huggingface_hub; a proxy resolves names itself
    host = urlparse(constants.ENDPOINT).hostname
    try:
        socket.getaddrinfo(host, 443, type=socket.SOCK_STREAM)
    except (socket.gaierror, UnicodeError):
        return True
    return False
