"""The one place that makes ZeroMQ sockets: bind or connect, linger, high-water marks, security.

- `ipc://` endpoints live in a directory only the owner can enter (made 0700 if missing; one that
  group or others can enter is refused).
- `tcp://` endpoints are authenticated and encrypted with CURVE: a binding socket is the CURVE
  server (its secret key), a connecting one the client (the server's public key and its own
  pair); the server side admits only the client public keys in a directory, through pyzmq's
  authenticator. Plain tcp needs an explicit `insecure=True`.
- Key pairs are made by `make_keys` (`streamer keys DIR`), as pyzmq's certificate files.
- `Sockets` holds one context's sockets and its authenticator, and closes them all.
"""

from __future__ import annotations

import os
import socket
import stat
from dataclasses import dataclass
from pathlib import Path

import zmq
import zmq.asyncio
import zmq.auth
from zmq.auth.thread import ThreadAuthenticator

from protocol.messages import Limits, ProtocolError

SCHEMES = ("ipc", "tcp", "inproc")


class SocketError(ProtocolError):
    """An endpoint or key that cannot be used; names it."""


@dataclass(frozen=True)
class Security:
    """CURVE keys for tcp:// endpoints; every path is a pyzmq certificate file or directory."""

    key_dir: Path | None = None  # holds server.key[_secret], client.key[_secret]
    authorized_dir: Path | None = None  # client public keys a server admits (default: key_dir)
    insecure: bool = False

    def _cert(self, name: str) -> tuple[bytes, bytes | None]:
        if self.key_dir is None:
            raise SocketError(
                "tcp:// endpoints need CURVE keys (`streamer keys DIR`, then pass "
                "the directory) or an explicit --insecure"
            )
        path = self.key_dir / name
        try:
            return zmq.auth.load_certificate(path)
        except (OSError, ValueError) as e:
            raise SocketError(f"cannot read the CURVE key {path}: {e}") from None


def scheme_of(endpoint: str) -> str:
    scheme, sep, rest = endpoint.partition("://")
    if not sep or scheme not in SCHEMES or not rest:
        raise SocketError(
            f"endpoint {endpoint!r} must be ipc://PATH, tcp://HOST:PORT or inproc://NAME"
        )
    return scheme


def private_ipc_dir(endpoint: str) -> Path:
    """The directory of an ipc endpoint, made 0700 if missing, refused if others can enter."""
    path = Path(endpoint.partition("://")[2]).expanduser()
    directory = path.parent
    if not directory.exists():
        directory.mkdir(mode=0o700, parents=True)
    mode = stat.S_IMODE(directory.stat().st_mode)
    if directory.stat().st_uid != os.getuid() or mode & 0o077:
        raise SocketError(
            f"ipc directory {directory} must belong to this user with mode 0700 "
            f"(it has {mode:o}): others could connect to the pipeline"
        )
    return directory


def refuse_live_ipc(endpoint: str) -> None:
    """Refuse to bind an ipc endpoint a live socket listens on: ZeroMQ would take its file over
    and leave the other process running, unreachable. A file nobody listens on (a process that
    died without removing it) is taken over."""
    path = Path(endpoint.partition("://")[2]).expanduser()
    if not path.exists():
        return
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.connect(str(path))
    except OSError:  # refused, or not a socket: nobody listens
        return
    finally:
        probe.close()
    raise SocketError(f"cannot bind {endpoint}: another process is serving on it")


def make_socket(
    ctx: zmq.Context,
    kind: int,
    endpoint: str,
    bind: bool,
    security: Security | None = None,
    linger_ms: int = 0,
    hwm: int = 1000,
    max_frame_bytes: int = -1,
) -> zmq.Socket:
    """A configured socket, bound or connected to `endpoint`. A peer that sends a frame over
    `max_frame_bytes` (-1: no limit) is disconnected by ZeroMQ before the frame is buffered."""
    scheme = scheme_of(endpoint)
    sock = ctx.socket(kind)
    try:
        sock.linger = linger_ms
        sock.sndhwm = sock.rcvhwm = hwm
        sock.maxmsgsize = max_frame_bytes
        if scheme == "tcp":
            security = security or Security()
            if not security.insecure:
                if bind:
                    public, secret = security._cert("server.key_secret")
                    sock.curve_secretkey, sock.curve_publickey = secret, public
                    sock.curve_server = True
                else:
                    server_public, _ = security._cert("server.key")
                    public, secret = security._cert("client.key_secret")
                    sock.curve_serverkey = server_public
                    sock.curve_publickey, sock.curve_secretkey = public, secret
        elif scheme == "ipc" and bind:
            private_ipc_dir(endpoint)
            refuse_live_ipc(endpoint)
        if bind:
            sock.bind(endpoint)
        else:
            sock.connect(endpoint)
        return sock
    except zmq.ZMQError as e:
        sock.close(linger=0)
        raise SocketError(f"cannot {'bind' if bind else 'connect'} {endpoint}: {e}") from None
    except BaseException:
        sock.close(linger=0)
        raise


def start_authenticator(ctx: zmq.Context, security: Security) -> ThreadAuthenticator | None:
    """Admit, on this context's CURVE servers, only the client keys in the authorized directory.
    The caller stops it (`.stop()`) when it closes its sockets."""
    if security.insecure or security.key_dir is None:
        return None
    auth = ThreadAuthenticator(ctx)
    auth.start()
    auth.configure_curve(domain="*", location=str(security.authorized_dir or security.key_dir))
    return auth


class Sockets:
    """The one way our processes make sockets: a context, its sockets (`make_socket`), and the
    ZAP authenticator, started before the first tcp:// socket binds (a CURVE server admits only
    the authorized client keys). `close()` closes every socket (linger 0), stops the
    authenticator and terminates the context; so does leaving `with`. `max_frame_bytes`: the
    largest frame these sockets take (ZeroMQ drops a peer that sends a bigger one)."""

    def __init__(
        self,
        security: Security | None = None,
        asyncio: bool = False,
        hwm: int = 1000,
        max_frame_bytes: int = Limits().max_frame_bytes,
    ) -> None:
        self.security = security or Security()
        self.ctx: zmq.Context = zmq.asyncio.Context() if asyncio else zmq.Context()
        self.hwm, self.max_frame_bytes = hwm, max_frame_bytes
        self.auth: ThreadAuthenticator | None = None
        self.sockets: list[zmq.Socket] = []

    def socket(self, kind: int, endpoint: str, bind: bool, linger_ms: int = 0) -> zmq.Socket:
        if bind and scheme_of(endpoint) == "tcp" and self.auth is None:
            self.auth = start_authenticator(self.ctx, self.security)
        sock = make_socket(
            self.ctx,
            kind,
            endpoint,
            bind,
            self.security,
            linger_ms,
            self.hwm,
            self.max_frame_bytes,
        )
        self.sockets.append(sock)
        return sock

    def close(self) -> None:
        if self.ctx.closed:
            return
        for sock in self.sockets:
            sock.close(linger=0)
        self.sockets = []
        if self.auth is not None:
            self.auth.stop()
            self.auth = None
        self.ctx.term()

    def __enter__(self) -> Sockets:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def make_keys(directory: Path) -> dict[str, Path]:
    """A server and a client key pair in `directory` (0700; secret files 0600)."""
    directory.mkdir(mode=0o700, parents=True, exist_ok=True)
    os.chmod(directory, 0o700)
    made = {}
    for name in ("server", "client"):
        public, secret = zmq.auth.create_certificates(directory, name)
        os.chmod(secret, 0o600)
        made[name] = Path(public)
        made[name + "_secret"] = Path(secret)
    return made
