"""The admin door: what changes the service (`PUT /v1/policy`, `POST /v1/calibrate`) takes an
admin token, read from a file (`read_token`; never from the command line, where `ps` shows it),
sent as `Authorization: Bearer <token>` and compared in constant time (`AdminToken`).
docs/serving.md, "Admin token".
"""

from __future__ import annotations

import hmac
import ipaddress
import logging
import os
import stat
from pathlib import Path

from jaxexit.serving.errors import RequestError

log = logging.getLogger(__name__)

TOKEN_FILE_ENV = "JAXEXIT_ADMIN_TOKEN_FILE"  # names the token file when --admin-token-file is not given


class AuthError(RequestError):
    """401 (no token) or 403 (a wrong one); a 401 tells the client how to authenticate."""

    def __init__(self, message: str, status: int):
        super().__init__(message, status)
        self.headers = {"WWW-Authenticate": 'Bearer realm="jaxexit admin"'} if status == 401 else None


def read_token(path: str | os.PathLike) -> str:
    """The token in file `path` (surrounding whitespace dropped); ValueError naming the file when
    it is missing, unreadable, empty or holds something a header cannot carry."""
    path = Path(path)
    try:
        text = path.read_bytes().decode("ascii")
    except FileNotFoundError:
        raise ValueError(f"the admin token file {path} does not exist") from None
    except UnicodeDecodeError:
        raise ValueError(f"the admin token file {path} is not ASCII text: write the token as printable "
                         "ASCII (e.g. python -c 'import secrets; print(secrets.token_urlsafe(32))')") from None
    except OSError as e:
        raise ValueError(f"cannot read the admin token file {path}: {e.strerror or e}") from None
    token = text.strip()
    if not token:
        raise ValueError(f"the admin token file {path} is empty: write the token in it")
    if not all(33 <= ord(c) <= 126 for c in token):
        raise ValueError(f"the admin token in {path} must be one word of printable ASCII (no spaces or control "
                         "characters): it travels in the Authorization header")
    try:
        if path.stat().st_mode & (stat.S_IRWXG | stat.S_IRWXO):
            log.warning("the admin token file %s can be read by other users (chmod 600 it)", path)
    except OSError:
        pass
    return token


class AdminToken:
    """Checks `Authorization: Bearer <token>` against the admin token."""

    def __init__(self, token: str):
        self._token = token.encode("ascii")

    def check(self, authorization: str | None, action: str) -> None:
        """None when `authorization` carries the token; else AuthError 401 (none, or not a
        bearer token) or 403 (another token). `action` names what was asked (for the message)."""
        scheme, _, given = (authorization or "").strip().partition(" ")
        given = given.strip()
        if scheme.lower() != "bearer" or not given:
            raise AuthError(f"{action} changes the service: send the admin token as 'Authorization: Bearer "
                            "<token>'", 401)
        if not hmac.compare_digest(given.encode("latin-1", "replace"), self._token):
            raise AuthError(f"{action}: the admin token is wrong", 403)


def is_loopback(host: str) -> bool:
    """Whether `host` is an address of this machine only (127.0.0.0/8, ::1, localhost)."""
    if host.strip().lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:  # a host name: it may resolve to anything
        return False


def warn_if_open(host: str, has_token: bool) -> None:
    """A warning when the service listens beyond this machine with no admin token."""
    if not has_token and not is_loopback(host):
        log.warning("listening on %s without an admin token: anyone who can reach the port can change the policy "
                    "(PUT /v1/policy) and re-calibrate it (POST /v1/calibrate); give --admin-token-file or %s",
                    host, TOKEN_FILE_ENV)
