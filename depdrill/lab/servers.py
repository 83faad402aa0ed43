"""The lab's own dependency servers: an HTTPS JSON API and a statsd-like UDP sink.

Run inside a lab namespace as `python -P -m depdrill.lab.servers https|statsd ...`.
Standard library only, so each starts in a fraction of a second.
"""

from __future__ import annotations

import argparse
import json
import socket
import socketserver
import ssl
import sys
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

# A client that stalls mid-handshake (a blackholed or slowed peer) frees its thread after this.
HANDSHAKE_TIMEOUT_S = 15.0
STATSD_LOGGED_IN_FULL = 200


class ApiHandler(BaseHTTPRequestHandler):
    server: ApiServer
    protocol_version = "HTTP/1.1"
    # Buffered writes: headers and body leave in one TLS record, one packet to delay or drop.
    wbufsize = 1 << 16

    def do_GET(self) -> None:
        body = json.dumps({"service": self.server.api_name, "path": self.path, "ok": True}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Connection", "close")
        self.end_headers()
        self.wfile.write(body)
        self.close_connection = True

    def log_message(self, format: str, *args: Any) -> None:
        """Quiet: the lab is probed several times a second for minutes."""


class ApiServer(ThreadingHTTPServer):
    daemon_threads = True
    request_queue_size = 128

    def server_bind(self) -> None:
        # HTTPServer.server_bind asks DNS for this host's name (getfqdn): in a lab namespace
        # that can wait out a resolver that does not exist. The name is unused: skip it.
        socketserver.TCPServer.server_bind(self)
        host, port = self.server_address[:2]
        self.server_name, self.server_port = str(host), int(port)

    def __init__(self, address: tuple[str, int], context: ssl.SSLContext, api_name: str):
        super().__init__(address, ApiHandler)
        self.context = context
        self.api_name = api_name

    def finish_request(self, request: Any, client_address: Any) -> None:
        # The TLS handshake runs in the request's own thread, never in the accept loop, so a
        # client that stalls cannot block the others.
        assert isinstance(request, socket.socket)
        request.settimeout(HANDSHAKE_TIMEOUT_S)
        request.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        try:
            tls = self.context.wrap_socket(request, server_side=True)
        except (OSError, ssl.SSLError):
            return
        try:
            super().finish_request(tls, client_address)
        finally:
            tls.close()


def serve_https(bind: str, port: int, chain: str, key: str, api_name: str) -> None:
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(chain, key)
    # No session tickets: the handshake is the same few packets every time.
    context.num_tickets = 0
    server = ApiServer((bind, port), context, api_name)
    print(f"https {api_name} listening on {bind}:{port}", flush=True)
    server.serve_forever()


def serve_statsd(bind: str, port: int) -> None:
    """Log datagrams to stdout: the first ones in full, then a running count (the log lives
    in /run, a tmpfs, and a lab may be probed for days)."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sink:
        sink.bind((bind, port))
        print(f"statsd listening on {bind}:{port}", flush=True)
        count = 0
        while True:
            data, _ = sink.recvfrom(65535)
            count += 1
            if count <= STATSD_LOGGED_IN_FULL:
                # Bounded and escaped: a datagram is anyone's bytes.
                print(f"received {data[:200]!r}", flush=True)
            elif count % 1000 == 0:
                print(f"received {count} datagrams", flush=True)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="depdrill.lab.servers")
    kinds = parser.add_subparsers(dest="kind", required=True)
    https = kinds.add_parser("https", help="an HTTPS JSON API")
    https.add_argument("--bind", required=True)
    https.add_argument("--port", type=int, default=443)
    https.add_argument("--chain", required=True, help="PEM: leaf then intermediate")
    https.add_argument("--key", required=True)
    https.add_argument("--name", required=True)
    statsd = kinds.add_parser("statsd", help="a UDP sink")
    statsd.add_argument("--bind", required=True)
    statsd.add_argument("--port", type=int, default=8125)
    args = parser.parse_args(argv)
    try:
        if args.kind == "https":
            serve_https(args.bind, args.port, args.chain, args.key, args.name)
        else:
            serve_statsd(args.bind, args.port)
    except KeyboardInterrupt:
        sys.exit(0)


if __name__ == "__main__":
    main()
