"""Who may talk to a d3arrow server: a shared token proven by HMAC, and optional TLS.

A worker unpickles the functions and arguments it is sent, so an open worker port is a
remote shell. With a token, every connection starts with a handshake in which each side
proves it knows the token without sending it, before any message is decoded::

    client -> server   HELLO  = MAGIC | client nonce (32)
    server -> client   CHALLENGE = MAGIC | server nonce (32) | HMAC(token, "server" | nc | ns)
    client -> server   PROOF  = HMAC(token, "client" | ns | nc)
    server -> client   VERDICT = 1 byte (1: accepted, 0: refused, then the server hangs up)

The client checks the server's proof before it sends anything else, so it never hands
work to, or unpickles a reply from, a server that does not know the token either.
TLS (``tls_cert`` / ``tls_key``, and ``tls_ca`` to verify the other side: mutual when the
server has one too) encrypts the connection underneath; the token handshake runs inside it.
The functions here are pure; the I/O is in :mod:`d3arrow.comm`.
"""

import hashlib
import hmac
import os
import secrets
import ssl
from dataclasses import dataclass

from .addressing import is_loopback
from .errors import AuthenticationError

TOKEN_ENV = "D3ARROW_AUTH_TOKEN"
MAGIC = b"D3AUTH\x00\x01"
NONCE_BYTES = 32
PROOF_BYTES = hashlib.sha256().digest_size
HELLO_BYTES = len(MAGIC) + NONCE_BYTES
CHALLENGE_BYTES = len(MAGIC) + NONCE_BYTES + PROOF_BYTES
ACCEPTED, REFUSED = b"\x01", b"\x00"
HANDSHAKE_TIMEOUT = 10.0  # seconds a server waits for a connection to authenticate


def resolve_token(token=None):
    """The token to use: the one given, else ``$D3ARROW_AUTH_TOKEN``, else None (no auth).

    Returned as bytes; an empty token is refused, since it would protect nothing.
    """
    if token is None:
        token = os.environ.get(TOKEN_ENV) or None
    if token is None:
        return None
    if isinstance(token, str):
        token = token.encode()
    if not isinstance(token, bytes) or not token:
        raise ValueError("an auth token must be a non-empty str or bytes")
    return token


def new_nonce():
    return secrets.token_bytes(NONCE_BYTES)


def hello(client_nonce):
    return MAGIC + client_nonce


def proof(token, role, first_nonce, second_nonce):
    return hmac.new(token, role + first_nonce + second_nonce, hashlib.sha256).digest()


def challenge(token, client_nonce, server_nonce):
    return MAGIC + server_nonce + proof(token, b"server", client_nonce, server_nonce)


def parse_hello(data):
    """The client nonce of a HELLO, or None when ``data`` is not one."""
    if len(data) != HELLO_BYTES or data[:len(MAGIC)] != MAGIC:
        return None
    return bytes(data[len(MAGIC):])


def check_challenge(token, data, client_nonce):
    """The server nonce of a genuine CHALLENGE; raise AuthenticationError otherwise."""
    if data[:len(MAGIC)] != MAGIC:
        raise AuthenticationError(
            "the server did not answer the token handshake: it runs without an auth token "
            "(or is not a d3arrow server)")
    server_nonce = bytes(data[len(MAGIC):len(MAGIC) + NONCE_BYTES])
    expected = proof(token, b"server", client_nonce, server_nonce)
    if not hmac.compare_digest(expected, bytes(data[len(MAGIC) + NONCE_BYTES:])):
        raise AuthenticationError("the server could not prove it knows the auth token: "
                                  "the tokens differ")
    return server_nonce


def check_proof(token, data, client_nonce, server_nonce):
    return hmac.compare_digest(proof(token, b"client", server_nonce, client_nonce), bytes(data))


def check_bind(host, token):
    """Refuse to expose an unauthenticated server beyond this machine."""
    if token is None and not is_loopback(host or "0.0.0.0"):
        raise AuthenticationError(
            f"refusing to listen on {host} without an auth token: anyone who can reach the "
            f"port could run code here. Pass --auth-token (or set ${TOKEN_ENV}), or bind "
            "127.0.0.1")


@dataclass(frozen=True)
class Security:
    """What a process needs to talk to its cluster: the token (bytes) and TLS files.

    Build it with :meth:`from_options`, which also reads ``$D3ARROW_AUTH_TOKEN``.
    """

    token: bytes | None = None
    tls_cert: str | None = None
    tls_key: str | None = None
    tls_ca: str | None = None

    @classmethod
    def from_options(cls, auth_token=None, tls_cert=None, tls_key=None, tls_ca=None):
        if (tls_cert is None) != (tls_key is None):
            raise ValueError("TLS needs both a certificate (tls_cert) and its key (tls_key)")
        return cls(resolve_token(auth_token), tls_cert, tls_key, tls_ca)

    @property
    def tls(self):
        return self.tls_cert is not None or self.tls_ca is not None

    def server_ssl_context(self):
        """For listening: our certificate; with a CA, clients must present one it signed."""
        if self.tls_cert is None:
            if self.tls_ca is not None:
                raise ValueError("a TLS server needs tls_cert and tls_key, not only tls_ca")
            return None
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH, cafile=self.tls_ca)
        context.load_cert_chain(self.tls_cert, self.tls_key)
        context.verify_mode = ssl.CERT_REQUIRED if self.tls_ca else ssl.CERT_NONE
        return context

    def client_ssl_context(self):
        """For connecting: verify the server against the CA; present our certificate if any.

        Cluster members are addressed by IP, so the CA vouches for the certificate, not for
        a host name in it.
        """
        if not self.tls:
            return None
        context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=self.tls_ca)
        context.check_hostname = False
        if self.tls_ca is None:
            context.verify_mode = ssl.CERT_NONE  # encrypted, but anyone could be listening
        if self.tls_cert is not None:
            context.load_cert_chain(self.tls_cert, self.tls_key)
        return context

    def environment(self):
        """Environment variables that hand this token to a child process (not its argv)."""
        return {TOKEN_ENV: self.token.decode()} if self.token else {}


NO_SECURITY = Security()
