"""Does a request name this machine? The Host check shared by `rag ui` and `rag serve`: a
web page on another site that points its own name at this machine ("DNS rebinding") sends
its own name in Host and Origin, and is refused."""

from __future__ import annotations

from urllib.parse import urlsplit

from rag_app.settings import is_loopback


def hostname(value: str) -> str:
    """The host part of a Host header (`name:port`, `[::1]:port`) or an Origin URL."""
    if "//" not in value:
        value = "//" + value
    try:
        return (urlsplit(value).hostname or "").lower()
    except ValueError:
        return ""


def names_this_machine(value: str, host: str) -> bool:
    """A Host or Origin value naming loopback or `host`, the address the server listens on."""
    name = hostname(value)
    return bool(name) and (is_loopback(name) or name == host.strip("[]").lower())
