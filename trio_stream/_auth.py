"""Who may read and publish what: the authorization hook and its JWT implementation.

An *authorizer* is any callable taking an `AuthRequest` and returning a `Grant` (or an
awaitable of one), or raising `UnauthorizedError` (answered ``401``) or
`ForbiddenError` (``403``). Applications embedding the ASGI app plug in their own
sessions or OAuth this way; `JWTAuthorizer` is the one ``--auth-secret`` uses.

The app, not the authorizer, checks the grant against the request: the topics against
`Grant.read` or `Grant.publish`, the client id against `Grant.client_id`, and the
expiry. Any other exception from an authorizer is logged and answered ``401``: the
request is refused (fail closed) and the server answers no ``500``.
"""

from __future__ import annotations

import logging
import time
import warnings
from typing import TYPE_CHECKING, Any, Final, Literal, Protocol

import attrs

from ._core._errors import LocalProtocolError, TrioStreamError
from ._core._names import check_client_id

if TYPE_CHECKING:
    from collections.abc import Awaitable, Mapping

__all__ = [
    "Action",
    "AuthRequest",
    "Authorizer",
    "ForbiddenError",
    "Grant",
    "JWTAuthorizer",
    "UnauthorizedError",
    "parse_cookies",
]

logger: Final = logging.getLogger("trio_stream")

MIN_SECRET_BYTES: Final = 32
"""Below this, a secret is weak for HS256 (RFC 7518, 3.2): accepted, with a warning."""

COOKIE_NAME: Final = "trio_stream_token"
"""The cookie a browser page carries its token in (``EventSource`` cannot set headers)."""

Action = Literal["stream", "poll", "ack", "publish"]


class UnauthorizedError(TrioStreamError):
    """No credentials, or credentials that are not valid (answered ``401``)."""


class ForbiddenError(TrioStreamError):
    """Valid credentials that do not allow this (answered ``403``)."""


def _valid_client_id(instance: object, attribute: object, value: str | None) -> None:
    if value is not None:
        check_client_id(value)


def _matches(patterns: tuple[str, ...], topic: str) -> bool:
    for pattern in patterns:
        if pattern.endswith("*"):
            if topic.startswith(pattern[:-1]):
                return True
        elif pattern == topic:
            return True
    return False


@attrs.frozen(kw_only=True)
class Grant:
    """What an authorized request may do.

    Attributes:
        client_id: The identity: it becomes the client id, and a request naming another
            one is refused. ``None`` leaves the client id to the request.
        read: Topics it may stream, poll and ack; an entry ending in ``*`` matches every
            topic with that prefix.
        publish: Topics it may publish to (same patterns).
        expires_at: When the grant ends (seconds since the epoch); an open stream then
            ends with ``event: reauth``. ``None``: never.

    Raises:
        LocalProtocolError: *client_id* is not 1-128 characters of ``[A-Za-z0-9._:-]``.
    """

    client_id: str | None = attrs.field(default=None, validator=_valid_client_id)
    read: tuple[str, ...] = ()
    publish: tuple[str, ...] = ()
    expires_at: float | None = None

    def may_read(self, topic: str) -> bool:
        """Whether *topic* may be streamed, polled and acked."""
        return _matches(self.read, topic)

    def may_publish(self, topic: str) -> bool:
        """Whether *topic* may be published to."""
        return _matches(self.publish, topic)


@attrs.frozen(kw_only=True)
class AuthRequest:
    """What an authorizer is given about a request.

    Attributes:
        action: ``"stream"``, ``"poll"``, ``"ack"`` or ``"publish"``.
        topics: The topics the request is about.
        headers: Request headers, names in lower case.
        cookies: Request cookies.
        client_address: The peer's ``(host, port)``, when known.
    """

    action: Action
    topics: tuple[str, ...]
    headers: Mapping[str, str]
    cookies: Mapping[str, str]
    client_address: tuple[str, int] | None = None

    def bearer_token(self) -> str | None:
        """The token of ``Authorization: Bearer <token>`` (scheme in any case), if any."""
        scheme, _, token = self.headers.get("authorization", "").partition(" ")
        token = token.strip()
        return token if scheme.lower() == "bearer" and token else None


class Authorizer(Protocol):
    """The authorization hook: who a request is, and what it may read and publish.

    Any callable (a function, ``async`` or not, or an object with ``__call__``) taking
    an `AuthRequest` and returning a `Grant`, or raising `UnauthorizedError` (``401``,
    with ``WWW-Authenticate: Bearer``) or `ForbiddenError` (``403``). It is called once
    per stream, poll and ack request (and WebSocket handshake), and for a publish
    request when ``publish_token`` is set and the request does not carry it. The app
    checks the grant against the request's topics, client id and the time; a hook may
    refuse more itself. Any other exception is logged and answered ``401``.

    Cancellation: an ``async`` hook may be cancelled when the client goes away.
    """

    def __call__(self, request: AuthRequest, /) -> Grant | Awaitable[Grant]:
        """The grant of *request*."""
        ...


def parse_cookies(header: str | None) -> dict[str, str]:
    """The cookies of a ``Cookie:`` header, ``name=value`` pairs split on ``;``.

    Pairs without ``=`` are skipped; a value in double quotes loses them. When a name
    comes twice the first one wins: browsers send the cookie of the most specific path
    first.
    """
    cookies: dict[str, str] = {}
    for pair in (header or "").split(";"):
        name, equals, value = pair.partition("=")
        name, value = name.strip(), value.strip()
        if not equals or not name:
            continue
        if len(value) >= 2 and value[0] == value[-1] == '"':
            value = value[1:-1]
        cookies.setdefault(name, value)
    return cookies


def _str_list(claims: Mapping[str, Any], name: str) -> tuple[str, ...]:
    value = claims.get(name, [])
    if not isinstance(value, list) or not all(isinstance(item, str) for item in value):
        raise UnauthorizedError(f"token claim {name!r} must be a list of strings")
    return tuple(value)


@attrs.frozen
class JWTAuthorizer:
    """Checks a JWT signed with *secret* (HS256 only), from the header or the cookie.

    The token comes from ``Authorization: Bearer <jwt>`` or, since a browser's
    ``EventSource`` cannot set headers, the ``trio_stream_token`` cookie. Claims:
    ``sub`` (the client id), ``topics`` (readable topics, ``*`` prefixes allowed),
    optional ``publish`` and ``exp``. Any other algorithm, ``none`` included, is refused;
    PyJWT compares signatures in constant time.

    A ``publish`` claim counts only for a token sent in the ``Authorization`` header: a
    cookie rides along with requests other sites make (a cross-site form can post a
    body that parses as an event), so a cookie may read, never publish.

    Needs PyJWT (``pip install 'trio-stream[auth]'``).

    Raises:
        ImportError: PyJWT is not installed.
    """

    secret: str = attrs.field(repr=False)

    def __attrs_post_init__(self) -> None:
        import jwt  # noqa: F401 - fail at start-up, not at the first request

        if len(self.secret.encode()) < MIN_SECRET_BYTES:
            logger.warning(
                "the auth secret has fewer than %d bytes: tokens signed with it are "
                "easier to forge (use e.g. `python -c 'import secrets; "
                "print(secrets.token_urlsafe(48))'`)",
                MIN_SECRET_BYTES,
            )

    def __call__(self, request: AuthRequest) -> Grant:
        """The grant of the request's token.

        Raises:
            UnauthorizedError: No token, a bad signature, an expired token, another
                algorithm than HS256, or malformed claims.
        """
        import jwt

        header_token = request.bearer_token()
        token = header_token or request.cookies.get(COOKIE_NAME)
        if not token:
            raise UnauthorizedError("a bearer token is required (header or cookie)")
        try:
            with warnings.catch_warnings():
                # Said once at start-up, not at every request.
                warnings.simplefilter("ignore", jwt.InsecureKeyLengthWarning)
                claims = jwt.decode(
                    token,
                    self.secret,
                    algorithms=["HS256"],
                    options={"require": ["sub"], "verify_exp": True},
                )
        except jwt.ExpiredSignatureError:
            raise UnauthorizedError("the token has expired") from None
        except jwt.InvalidTokenError as error:
            raise UnauthorizedError(f"invalid token: {error}") from None
        subject = claims.get("sub")
        if not isinstance(subject, str):
            raise UnauthorizedError("token claim 'sub' must be a string")
        try:
            check_client_id(subject)
        except LocalProtocolError:
            raise UnauthorizedError(
                "token claim 'sub' must be a client id: 1-128 of [A-Za-z0-9._:-]"
            ) from None
        expires = claims.get("exp")
        publish = _str_list(claims, "publish")
        return Grant(
            client_id=subject,
            read=_str_list(claims, "topics"),
            publish=publish if header_token else (),
            expires_at=float(expires) if isinstance(expires, int | float) else None,
        )


def seconds_left(grant: Grant) -> float | None:
    """Seconds until *grant* expires (``None``: never)."""
    return None if grant.expires_at is None else grant.expires_at - time.time()
