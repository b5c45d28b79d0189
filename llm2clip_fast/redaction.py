"""Credentials never reach a log line or a saved file: :func:`redact` masks them in any text.

What is masked (each replaced by ``***``, the rest of the text kept so a message still says which
shard or command it is about):

- the userinfo of a URL: ``https://user:password@host/x.tar`` -> ``https://***@host/x.tar``;
- query parameters that sign or authorise a request: any parameter whose name contains ``sig``,
  ``token``, ``key``, ``secret``, ``password``/``passwd``, ``credential`` or ``auth``
  (``X-Amz-Signature``, ``X-Amz-Credential``, ``X-Amz-Security-Token``, ``X-Goog-Signature``, Azure's
  ``sig``, ``token``, ``access_token``, ``api_key``, ...): ``?X-Amz-Signature=ab12`` ->
  ``?X-Amz-Signature=***``;
- HTTP headers that carry a credential, as written in a ``pipe:`` command
  (``curl -H 'Authorization: Bearer abc'`` -> ``curl -H 'Authorization: Bearer ***'``; also
  ``Proxy-Authorization:``, ``Cookie:``, ``X-Api-Key:``, ``Private-Token:``, any ``...-Token:`` and any
  ``X-...`` header with token/key/secret/auth/signature/credential in its name);
- ``curl -u user:pass`` / ``--user user:pass`` and ``--password=...``-style options;
- environment-style assignments of secrets: ``HF_TOKEN=...``, ``AWS_SECRET_ACCESS_KEY=...``, any
  ``NAME=value`` whose name ends in ``_TOKEN``, ``_KEY``, ``_SECRET``, ``_PASSWORD`` or ``_PASS``.

:func:`redact` is idempotent (``redact(redact(s)) == redact(s)``), so a saved (redacted) value compares
equal to the redacted form of the value a resumed run was given: :func:`same_when_redacted`. The
library keeps the real value where it must use it (to open a stream) and shows only the redacted form.
"""

from __future__ import annotations

import re
from typing import Any

MASK = "***"

# scheme://userinfo@ : the userinfo may hold ':' but no '/', '@' or whitespace.
_USERINFO = re.compile(r"(?P<scheme>\b[A-Za-z][A-Za-z0-9+.-]*://)(?P<userinfo>[^/@\s'\"]+)@")
_SECRET_WORDS = r"(?:sig|token|key|secret|passw(?:or)?d|credential|auth)"
# ?name=value or &name=value (also ';'): the value runs to the next separator, quote or space.
_QUERY_PARAM = re.compile(rf"(?P<lead>[?&;](?P<name>[A-Za-z0-9_.-]*{_SECRET_WORDS}[A-Za-z0-9_.-]*)=)"
                          r"(?P<value>[^&;#\s'\"]+)", re.IGNORECASE)
# A header whose name says it carries a credential, written "Name: value" (curl -H, wget --header).
# An optional scheme word (Bearer, Basic, token, ...) is kept; quoted, the value runs to the quote.
_HEADER_NAMES = (r"(?:(?:proxy-)?authorization|cookie|(?:x-)?api-?key|private-token|[A-Za-z0-9-]+-token"
                 r"|x-[A-Za-z0-9-]*(?:token|key|secret|auth|signature|credential)[A-Za-z0-9-]*)")
_QUOTED_HEADER = re.compile(rf"(?P<quote>['\"])(?P<lead>\s*{_HEADER_NAMES}\s*:\s*"
                            r"(?:(?:bearer|basic|token|digest|negotiate|aws4-hmac-sha256)\s+)?)"
                            r"(?P<value>[^'\"]+)(?P=quote)", re.IGNORECASE)
_BARE_HEADER = re.compile(rf"(?P<lead>(?<![A-Za-z0-9_-]){_HEADER_NAMES}\s*:\s*"
                          r"(?:(?:bearer|basic|token|digest|negotiate|aws4-hmac-sha256)\s+)?)"
                          r"(?P<value>[^\s'\"]+)", re.IGNORECASE)
# curl/wget credentials given as options.
_USER_OPTION = re.compile(r"(?P<lead>(?:^|\s)(?:-u|--user|--proxy-user)(?:\s+|=)(?P<quote>['\"]?))"
                          r"(?P<value>[^\s'\"]+)")
_SECRET_OPTION = re.compile(r"(?P<lead>--[A-Za-z0-9-]*(?:password|passwd|token|secret|api-?key)"
                            r"[A-Za-z0-9-]*(?:=|\s+)(?P<quote>['\"]?))(?P<value>[^\s'\"]+)", re.IGNORECASE)
# NAME=value with NAME ending in a secret word (environment assignments in a command, dumps of env).
_ENV_ASSIGNMENT = re.compile(r"(?P<lead>\b[A-Za-z0-9_]*(?:_TOKEN|_KEY|_SECRET|_PASSWORD|_PASS|_PASSWD)"
                             r"\s*=\s*(?P<quote>['\"]?))(?P<value>[^\s'\"&;]+)", re.IGNORECASE)


_VALUE_PATTERNS = (_QUOTED_HEADER, _BARE_HEADER, _QUERY_PARAM, _USER_OPTION, _SECRET_OPTION, _ENV_ASSIGNMENT)


def _mask_value(match: re.Match[str]) -> str:
    """The match with its ``value`` group replaced by the mask."""
    whole, start = match.group(0), match.start()
    return whole[: match.start("value") - start] + MASK + whole[match.end("value") - start:]


def redact(text: str) -> str:
    """``text`` with every credential it carries replaced by ``***`` (see the module docstring)."""
    if not isinstance(text, str) or not text:
        return text
    text = _USERINFO.sub(lambda m: f"{m.group('scheme')}{MASK}@", text)
    for pattern in _VALUE_PATTERNS:
        text = pattern.sub(_mask_value, text)
    return text


def redact_value(value: Any) -> Any:
    """:func:`redact` applied to every string inside ``value`` (dicts, lists and tuples walked; keys
    kept); other values unchanged. For configs and reports before they are saved or logged."""
    if isinstance(value, str):
        return redact(value)
    if isinstance(value, dict):
        return {k: redact_value(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(redact_value(v) for v in value)
    return value


def same_when_redacted(a: Any, b: Any) -> bool:
    """Whether ``a`` and ``b`` are equal once their credentials are masked: a saved (redacted) config
    value against the real value a resumed run was given."""
    return redact_value(a) == redact_value(b)


__all__ = ["MASK", "redact", "redact_value", "same_when_redacted"]
