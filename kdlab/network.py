"""Whether the network may and can be used: one rule for every probe (hub models, hub datasets, W&B).

Probing first makes a machine without network fail (or fall back) in seconds: huggingface_hub retries a
failed request with backoff for about 25 s, and W&B waits longer still.
"""
from __future__ import annotations

import os
import socket
from urllib.parse import urlparse

OFFLINE_VARS = ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE")
PROXY_VARS = ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy")


def offline() -> bool:
    """Whether any Hugging Face offline switch is on, spelled as huggingface_hub reads it (1, ON, YES, TRUE)."""
    return any(os.environ.get(v, "").upper() in ("1", "ON", "YES", "TRUE") for v in OFFLINE_VARS)


def hub_endpoint() -> str:
    """The Hugging Face hub's URL (``HF_ENDPOINT``, as huggingface_hub reads it)."""
    return os.environ.get("HF_ENDPOINT", "https://huggingface.co")


def reachable(url: str, timeout: float) -> bool:
    """Whether the host of ``url`` (``https://host[:port]/...`` or a bare host) accepts a TCP connection
    within ``timeout`` seconds. Behind a proxy the probe proves nothing, so it passes."""
    if any(os.environ.get(v) for v in PROXY_VARS):
        return True
    parsed = urlparse(url if "://" in url else f"https://{url}")
    port = parsed.port or (80 if parsed.scheme == "http" else 443)
    try:
        socket.create_connection((parsed.hostname, port), timeout=timeout).close()
        return True
    except OSError:
        return False
