"""A tiny real world for runner tests: a service namespace calling dependency namespaces.

The service answers GET /health on :8080 after calling each dependency over HTTP with a
per-call timeout; with `fallback` it stays healthy when a call fails. Dependencies answer
200 on :8080. Processes run under `ip netns exec` and are killed by pid at teardown.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass, field

from depdrill.testing import ScratchNet

SERVICE = r"""
import http.server, socketserver, sys, urllib.request
bind, mode = sys.argv[1], sys.argv[2]
deps = sys.argv[3:]  # address,timeout_s,critical|fallback

class Handler(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        status = 200
        if mode == "service":
            for dep in deps:
                address, timeout, policy = dep.split(",")
                try:
                    urllib.request.urlopen(f"http://{address}:8080/", timeout=float(timeout)).read()
                except OSError:
                    if policy == "critical":
                        status = 503
        body = b"ok" if status == 200 else b"dependency down"
        self.send_response(status)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass

class Server(http.server.ThreadingHTTPServer):
    def server_bind(self):
        # HTTPServer.server_bind asks DNS for our own name: no resolver answers in here.
        socketserver.TCPServer.server_bind(self)
        self.server_name, self.server_port = bind, 8080

server = Server((bind, 8080), Handler)
server.daemon_threads = True
server.serve_forever()
"""


@dataclass
class World:
    net: ScratchNet
    service_ns: str = ""
    processes: list[subprocess.Popen[bytes]] = field(default_factory=list)

    def start(self, ns: str, address: str, mode: str, *deps: str) -> None:
        proc = subprocess.Popen(
            ["ip", "netns", "exec", ns, sys.executable, "-c", SERVICE, address, mode, *deps],
            stdout=subprocess.DEVNULL,
        )
        self.processes.append(proc)
        deadline = time.monotonic() + 5
        while True:
            try:
                self.net.exec(ns, "true")
                with urllib.request.urlopen(f"http://{address}:8080/", timeout=0.5):
                    return
            except OSError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.05)

    def stop(self) -> None:
        for proc in self.processes:
            # `ip netns exec` execs the interpreter: the pid is the server itself.
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait()


def build(net: ScratchNet, service_deps: list[str]) -> World:
    """Dependencies at .3 and .4, the service at .2 using them as `service_deps` says."""
    world = World(net)
    try:
        for host in (3, 4):
            ns = net.add(f"dep{host}", host)
            world.start(ns, net.address(host), "dependency")
        world.service_ns = net.add("svc", 2)
        world.start(world.service_ns, net.address(2), "service", *service_deps)
    except BaseException:
        world.stop()
        raise
    return world
