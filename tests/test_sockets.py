"""The socket factory over real sockets: CURVE on tcp, private ipc directories, clear refusals."""

from __future__ import annotations

import os
import socket
import stat

import pytest
import zmq

from protocol.codec import decode, encode
from protocol.messages import Cancel
from protocol.sockets import Security, SocketError, make_keys, make_socket, start_authenticator


@pytest.fixture
def ctx():
    context = zmq.Context()
    yield context
    context.term()


def exchange(server: zmq.Socket, client: zmq.Socket, timeout_ms: int = 2000) -> bool:
    """Whether a message from the client reaches the server within the timeout."""
    client.send_multipart(encode(Cancel("r1")))
    if not server.poll(timeout_ms):
        return False
    identity, *frames = server.recv_multipart()
    assert decode(frames) == Cancel("r1")
    return True


def test_curve_admits_the_authorized_client_only(ctx, tmp_path):
    sec = Security(key_dir=tmp_path / "keys")
    make_keys(sec.key_dir)
    auth = start_authenticator(ctx, sec)
    server = make_socket(ctx, zmq.ROUTER, "tcp://127.0.0.1:*", bind=True, security=sec)
    endpoint = server.getsockopt_string(zmq.LAST_ENDPOINT)
    good = make_socket(ctx, zmq.DEALER, endpoint, bind=False, security=sec)
    # Another pair that knows the server's public key, but is not authorized.
    other = Security(key_dir=tmp_path / "other")
    make_keys(other.key_dir)
    (other.key_dir / "server.key").write_bytes((sec.key_dir / "server.key").read_bytes())
    intruder = make_socket(ctx, zmq.DEALER, endpoint, bind=False, security=other)
    try:
        assert exchange(server, good)
        assert not exchange(server, intruder, timeout_ms=500)
    finally:
        for s in (server, good, intruder):
            s.close(linger=0)
        auth.stop()


def test_plain_tcp_needs_insecure(ctx):
    with pytest.raises(SocketError, match="CURVE keys.*--insecure"):
        make_socket(ctx, zmq.ROUTER, "tcp://127.0.0.1:*", bind=True)
    open_ = Security(insecure=True)
    server = make_socket(ctx, zmq.ROUTER, "tcp://127.0.0.1:*", bind=True, security=open_)
    client = make_socket(
        ctx, zmq.DEALER, server.getsockopt_string(zmq.LAST_ENDPOINT), bind=False, security=open_
    )
    try:
        assert exchange(server, client)
    finally:
        server.close(linger=0)
        client.close(linger=0)


def test_ipc_directory_is_private(ctx, tmp_path):
    endpoint = f"ipc://{tmp_path}/run/stage.sock"
    server = make_socket(ctx, zmq.ROUTER, endpoint, bind=True)
    client = make_socket(ctx, zmq.DEALER, endpoint, bind=False)
    try:
        assert stat.S_IMODE(os.stat(tmp_path / "run").st_mode) == 0o700
        assert exchange(server, client)
    finally:
        server.close(linger=0)
        client.close(linger=0)
    shared = tmp_path / "shared"
    shared.mkdir(mode=0o755)
    os.chmod(shared, 0o755)
    with pytest.raises(SocketError, match="mode 0700"):
        make_socket(ctx, zmq.ROUTER, f"ipc://{shared}/x.sock", bind=True)


def test_bad_endpoints_and_keys_are_named(ctx, tmp_path):
    with pytest.raises(SocketError, match="must be ipc://"):
        make_socket(ctx, zmq.ROUTER, "http://example", bind=True)
    with pytest.raises(SocketError, match="cannot read the CURVE key"):
        make_socket(
            ctx,
            zmq.ROUTER,
            "tcp://127.0.0.1:*",
            bind=True,
            security=Security(key_dir=tmp_path / "none"),
        )


def test_key_files(tmp_path):
    made = make_keys(tmp_path / "k")
    assert stat.S_IMODE(os.stat(tmp_path / "k").st_mode) == 0o700
    for name in ("server_secret", "client_secret"):
        assert stat.S_IMODE(os.stat(made[name]).st_mode) == 0o600


def test_a_live_ipc_endpoint_is_refused_and_a_dead_ones_file_taken_over(ctx, tmp_path):
    run = tmp_path / "run"
    run.mkdir(mode=0o700)
    endpoint = f"ipc://{run}/front.sock"
    first = make_socket(ctx, zmq.ROUTER, endpoint, bind=True)
    other = zmq.Context()  # as another process would (one context refuses by itself)
    with pytest.raises(SocketError, match="another process is serving on it"):
        make_socket(other, zmq.ROUTER, endpoint, bind=True)
    other.term()
    client = make_socket(ctx, zmq.DEALER, endpoint, bind=False)
    assert exchange(first, client)  # the first still serves
    first.close(linger=0)
    client.close(linger=0)
    # A socket file nobody listens on (its process was killed): the next server takes it.
    left = run / "left.sock"
    dead = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    dead.bind(str(left))
    dead.close()
    assert left.exists()
    second = make_socket(ctx, zmq.ROUTER, f"ipc://{left}", bind=True)
    client = make_socket(ctx, zmq.DEALER, f"ipc://{left}", bind=False)
    assert exchange(second, client)
    second.close(linger=0)
    client.close(linger=0)
