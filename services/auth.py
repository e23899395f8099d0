"""Who is calling: bearer tokens, principals, and the one server interceptor that enforces them.

A token file (`--auth-token-file`) has one token per line, optionally followed by a principal name and
a role::

    # token                          principal   role
    3q2+7w8Xb2Zyb2ctYWxpY2UK         alice       user
    c2VjcmV0LWVkaXRvci10b2tlbgo      editor      admin
    bare-token-is-its-own-principal

A bare token is its own principal (role `user`); blank lines and ``#`` comments are ignored; a token
listed twice is refused. Roles: `user` acts on its own jobs and artifacts; `admin` may cancel any job,
see every artifact and its metadata, and call on behalf of a user (the Editor does so towards the
stages, below).

`AuthInterceptor` checks ``authorization: Bearer <token>`` on every RPC except ``grpc.health.v1``
(probes and gRPC's client-side health checking carry no credentials, and health says nothing about
anyone's data). Server reflection needs a token like everything else: the API is public in proto/,
so reflection only helps a caller who may use the server anyway, and one rule with one exception is
easier to audit. Failures are UNAUTHENTICATED (reason UNAUTHENTICATED, metadata ``problem`` =
missing / malformed / invalid) from the ERRORS table of services.errors; the token is never logged or
echoed. Tokens are compared as sha256 digests with `hmac.compare_digest`, against every entry, so the
time taken does not depend on how much of a token matched or which entry it is.

Delegation: a caller authenticated as an admin may add ``x-tokenflow-on-behalf-of: NAME``; the call
then runs as the user NAME (its jobs and artifacts are recorded for NAME), with the admin's word for
NAME's access to the inputs, which the admin checked already. The Editor uses this towards the stages,
so a user's edits are attributed to the user even on stage servers that never saw the user's token.
From a non-admin the header is refused (PERMISSION_DENIED).

The principal of the call in progress is `current_principal()` (None on a server without tokens, where
every caller may do everything, as before access control existed). What a principal may do with
artifacts and jobs is services/access.py.
"""

from __future__ import annotations

import contextvars
import hashlib
import hmac
import logging
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc

from services.errors import PermissionDenied, Unauthenticated, status_for
from services.handlers import behaviour_of, rewrapped, split_method

log = logging.getLogger(__name__)

ROLES: tuple[str, ...] = ("user", "admin")
"""`user` (the default) acts on its own jobs and artifacts; `admin` on everyone's, and may delegate."""
AUTH_HEADER = "authorization"
ON_BEHALF_HEADER = "x-tokenflow-on-behalf-of"
EXEMPT_SERVICES: frozenset[str] = frozenset({"grpc.health.v1.Health"})
"""Services answered without a token (see the module docstring)."""
_MAX_NAME = 128


@dataclass(frozen=True)
class Principal:
    """Who a call runs as. `delegated_by` names the admin that called on this user's behalf."""

    name: str
    role: str = "user"
    delegated_by: str | None = None

    @property
    def is_admin(self) -> bool:
        return self.role == "admin" and self.delegated_by is None


def check_name(name: str, what: str) -> str:
    """A principal name: 1..128 printable characters without spaces (ValueError otherwise)."""
    if not name or len(name) > _MAX_NAME or any(ch.isspace() or not ch.isprintable() for ch in name):
        raise ValueError(f"{what} must be 1..{_MAX_NAME} printable characters without spaces")
    return name


def _digest(token: str) -> bytes:
    return hashlib.sha256(token.encode("utf-8", "surrogateescape")).digest()


class TokenTable:
    """The tokens a server accepts, as digests, each with its principal. Never prints a token."""

    def __init__(self, entries: Sequence[tuple[str, Principal]]) -> None:
        if not entries:
            raise ValueError("the token file lists no token")
        digests = [_digest(token) for token, _ in entries]
        if len(set(digests)) != len(digests):
            raise ValueError("the token file lists a token twice")
        self._entries = [(d, p) for d, (_, p) in zip(digests, entries, strict=True)]
        self._admin_token = next((t for t, p in entries if p.role == "admin"), None)

    @classmethod
    def load(cls, path: str | Path) -> TokenTable:
        """Parse a token file (module docstring); ValueError naming the file and line."""
        try:
            text = Path(path).read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as e:
            raise ValueError(f"cannot read --auth-token-file {str(path)!r}: {e}") from None
        entries: list[tuple[str, Principal]] = []
        for number, line in enumerate(text.splitlines(), 1):
            words = line.split("#", 1)[0].split()
            if not words:
                continue
            if len(words) > 3:
                raise ValueError(f"{path}:{number}: want TOKEN [PRINCIPAL [ROLE]], not {len(words)} words")
            token = words[0]
            name = words[1] if len(words) > 1 else token
            role = words[2] if len(words) > 2 else "user"
            if role not in ROLES:
                raise ValueError(f"{path}:{number}: unknown role {role!r}; choose from {', '.join(ROLES)}")
            if len(token) < 16:
                raise ValueError(f"{path}:{number}: a token needs at least 16 characters")
            try:
                check_name(name, "a principal name")
            except ValueError as e:
                raise ValueError(f"{path}:{number}: {e}") from None
            entries.append((token, Principal(name, role)))
        try:
            return cls(entries)
        except ValueError as e:
            raise ValueError(f"{path}: {e}") from None

    def authenticate(self, token: str) -> Principal | None:
        """The principal of `token`, or None; constant time in the token's content."""
        digest = _digest(token)
        found: Principal | None = None
        for known, principal in self._entries:
            if hmac.compare_digest(known, digest):  # every entry is compared: no early exit
                found = principal
        return found

    @property
    def admin_token(self) -> str | None:
        """The first admin token of the file: the Editor's default credential towards the stages."""
        return self._admin_token

    def __len__(self) -> int:
        return len(self._entries)

    def __repr__(self) -> str:
        return f"TokenTable({len(self._entries)} tokens)"


def read_token_file(path: str | Path, flag: str = "--internal-token-file") -> str:
    """The token in a one-token file (the first word of its first line that is not a comment)."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise ValueError(f"cannot read {flag} {str(path)!r}: {e}") from None
    for line in text.splitlines():
        words = line.split("#", 1)[0].split()
        if words:
            return words[0]
    raise ValueError(f"{flag} {str(path)!r} holds no token")


# ----------------------------------------------------------------------------------------------------------
# the principal of the call in progress

_current: contextvars.ContextVar[Principal | None] = contextvars.ContextVar(
    "tokenflow_principal", default=None
)


def current_principal() -> Principal | None:
    """The principal of the RPC this thread is handling; None when the server has no token file."""
    return _current.get()


def call_metadata(principal: Principal | None) -> tuple[tuple[str, str], ...]:
    """Metadata for a call made on behalf of `principal` with an admin credential (the Editor's)."""
    if principal is None or principal.is_admin:
        return ()
    return ((ON_BEHALF_HEADER, principal.name),)


def _bearer(metadata: Sequence[Any] | None) -> tuple[str | None, str | None]:
    """(token, on-behalf-of name) from invocation metadata; token "" = malformed header."""
    token: str | None = None
    behalf: str | None = None
    for key, value in metadata or ():
        key = key.lower()
        if key == AUTH_HEADER:
            scheme, _, rest = str(value).strip().partition(" ")
            token = rest.strip() if scheme.lower() == "bearer" and rest.strip() else ""
        elif key == ON_BEHALF_HEADER:
            behalf = str(value)
    return token, behalf


class AuthInterceptor(grpc.ServerInterceptor):
    """Authenticates every call but health (module docstring); runs the handler as the principal.

    `check_request`, if given, is called with (request, principal) before a unary-request handler runs,
    so input artifacts can be checked in one place (services.access.Access.check_inputs).
    """

    def __init__(
        self,
        tokens: TokenTable,
        check_request: Callable[[Any, Principal], None] | None = None,
    ) -> None:
        self._tokens = tokens
        self._check_request = check_request

    def _principal(self, details: grpc.HandlerCallDetails) -> Principal:
        token, behalf = _bearer(details.invocation_metadata)
        if token is None:
            raise Unauthenticated(
                "this server needs a token: send 'authorization: Bearer <token>' "
                "(tokenflow-client --token, or TOKENFLOW_TOKEN)",
                problem="missing",
            )
        if not token:
            raise Unauthenticated("the authorization header must be 'Bearer <token>'", problem="malformed")
        principal = self._tokens.authenticate(token)
        if principal is None:
            raise Unauthenticated("the token is not valid on this server", problem="invalid")
        if behalf is not None:
            if principal.role != "admin":
                raise PermissionDenied(f"only an admin may set {ON_BEHALF_HEADER}", action="delegate")
            try:
                name = check_name(behalf, ON_BEHALF_HEADER)
            except ValueError as e:
                raise Unauthenticated(str(e), problem="malformed") from None
            principal = Principal(name, "user", delegated_by=principal.name)
        return principal

    def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], grpc.RpcMethodHandler | None],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler | None:
        handler = continuation(handler_call_details)
        if handler is None:
            return None
        service, _ = split_method(handler_call_details.method)
        if service in EXEMPT_SERVICES:
            return handler
        try:
            principal = self._principal(handler_call_details)
        except (Unauthenticated, PermissionDenied) as e:
            log.info("refused %s: %s", handler_call_details.method, e)  # the message never holds a token
            return _refusing(handler, e)
        return _as_principal(handler, principal, self._check_request)


def _refusing(handler: grpc.RpcMethodHandler, error: Exception) -> grpc.RpcMethodHandler:
    """A handler of the same kind that ends the call with `error`'s status (with its details)."""
    from grpc_status import rpc_status

    status = rpc_status.to_status(status_for(error))

    def refuse(request: Any, context: grpc.ServicerContext) -> Any:
        context.abort_with_status(status)

    def refuse_stream(request: Any, context: grpc.ServicerContext) -> Iterator[Any]:
        context.abort_with_status(status)
        yield  # pragma: no cover - abort raises

    return rewrapped(handler, refuse_stream if handler.response_streaming else refuse)


def _as_principal(
    handler: grpc.RpcMethodHandler,
    principal: Principal,
    check_request: Callable[[Any, Principal], None] | None,
) -> grpc.RpcMethodHandler:
    """The handler, run with `principal` as `current_principal()`.

    The variable is set around each step (the call, and every `next` of a response stream) and reset
    right after, so it never outlives the step on grpc's pooled threads.
    """
    behaviour = behaviour_of(handler)
    check = check_request if not handler.request_streaming else None

    if not handler.response_streaming:

        def unary(request: Any, context: grpc.ServicerContext) -> Any:
            token = _current.set(principal)
            try:
                if check is not None:
                    check(request, principal)
                return behaviour(request, context)
            finally:
                _current.reset(token)

        return rewrapped(handler, unary)

    def streaming(request: Any, context: grpc.ServicerContext) -> Iterator[Any]:
        token = _current.set(principal)
        try:
            if check is not None:
                check(request, principal)
            responses = iter(behaviour(request, context))
        finally:
            _current.reset(token)
        try:
            while True:
                token = _current.set(principal)
                try:
                    item = next(responses)
                except StopIteration:
                    return
                finally:
                    _current.reset(token)
                yield item
        finally:  # the caller left (GeneratorExit) or the stream ended: close the handler as the principal
            close = getattr(responses, "close", None)
            if callable(close):
                token = _current.set(principal)
                try:
                    close()
                finally:
                    _current.reset(token)

    return rewrapped(handler, streaming)
