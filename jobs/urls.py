"""Redis URLs as they may be shown: never with a password."""

from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

__all__ = ["mask_url"]

_SECRET_PARAMS = {"password", "ssl_password"}


def mask_url(url: str) -> str:
    """``redis://:secret@host:6379/0`` -> ``redis://:***@host:6379/0``; query passwords too."""
    try:
        parts = urlsplit(url)
    except ValueError:
        return "<unparseable URL>"
    secret_query = any(k.lower() in _SECRET_PARAMS for k, _ in parse_qsl(parts.query))
    if "@" not in parts.netloc and not secret_query:
        return url
    if "@" in parts.netloc:
        user = parts.username or ""
        host = parts.netloc.rsplit("@", 1)[1]
        masked = f"{user}:***" if parts.password is not None else user
        parts = parts._replace(netloc=f"{masked}@{host}")
    if secret_query:
        query = [(k, "***" if k.lower() in _SECRET_PARAMS else v) for k, v in parse_qsl(parts.query, keep_blank_values=True)]
        parts = parts._replace(query=urlencode(query, safe="*/"))
    return urlunsplit(parts)
