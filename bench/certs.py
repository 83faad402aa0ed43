"""Bench: depdrill walks 200 TLS endpoints on loopback concurrently vs a sequential
`openssl s_client -showcerts` loop over the same endpoints; prints the ratio of the median
walk to the loop.

The 200 endpoints are `openssl s_server` processes, each on its own loopback port with its
own leaf under a bench CA: a server in C, so the figure measures the clients, not a Python
server (one asyncio process answered ~1 ms per handshake and capped both clients).
"""

from __future__ import annotations

import socket
import statistics
import subprocess
import tempfile
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

ENDPOINTS = 200
WALKS = 5


def _cert(
    cn: str,
    key: ec.EllipticCurvePrivateKey,
    issuer: tuple[x509.Certificate, ec.EllipticCurvePrivateKey] | None,
) -> x509.Certificate:
    now = datetime.now(UTC)
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])
    builder = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(issuer[0].subject if issuer else name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - timedelta(days=1))
        .not_valid_after(now + timedelta(days=90 if issuer else 3650))
        .add_extension(x509.BasicConstraints(ca=issuer is None, path_length=None), True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), False)
    )
    if issuer is None:
        usage = x509.KeyUsage(False, False, False, False, False, True, True, False, False)
        builder = builder.add_extension(usage, True)
        return builder.sign(key, hashes.SHA256())
    usage = x509.KeyUsage(True, False, False, False, False, False, False, False, False)
    return (
        builder.add_extension(usage, True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(issuer[1].public_key()), False
        )
        .add_extension(x509.SubjectAlternativeName([x509.DNSName(cn)]), False)
        .sign(issuer[1], hashes.SHA256())
    )


def make_pki(workdir: Path) -> list[str]:
    """A root in bundle.pem and one leaf per endpoint (leaf-N.pem, key.pem); the names."""
    pem = serialization.Encoding.PEM
    root_key = ec.generate_private_key(ec.SECP256R1())
    root = _cert("depdrill bench root", root_key, None)
    (workdir / "bundle.pem").write_bytes(root.public_bytes(pem))
    key = ec.generate_private_key(ec.SECP256R1())
    (workdir / "key.pem").write_bytes(
        key.private_bytes(pem, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )
    names = [f"svc{i}.bench.test" for i in range(ENDPOINTS)]
    for i, name in enumerate(names):
        leaf = _cert(name, key, (root, root_key))
        (workdir / f"leaf-{i}.pem").write_bytes(leaf.public_bytes(pem))
    return names


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def start_servers(workdir: Path) -> tuple[list[subprocess.Popen[bytes]], list[int]]:
    servers, ports = [], []
    for i in range(ENDPOINTS):
        port = _free_port()
        leaf, key = str(workdir / f"leaf-{i}.pem"), str(workdir / "key.pem")
        argv = ["openssl", "s_server", "-quiet", "-www", "-accept", f"127.0.0.1:{port}",
                "-cert", leaf, "-key", key]  # fmt: skip
        servers.append(
            subprocess.Popen(
                argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
            )
        )
        ports.append(port)
    deadline = time.monotonic() + 30
    for port in ports:
        while True:
            with socket.socket() as probe:
                if probe.connect_ex(("127.0.0.1", port)) == 0:
                    break
            if time.monotonic() > deadline:
                raise SystemExit(f"bench: openssl s_server on port {port} never listened")
            time.sleep(0.02)
    return servers, ports


def _graph(ports: list[int], names: list[str]) -> object:
    from depdrill.discover.model import (
        CaptureStats,
        ConnectsEdge,
        EndpointNode,
        Graph,
        NameNode,
        NamesEdge,
        ServiceNode,
        endpoint_id,
        name_id,
    )

    now = datetime.now(UTC)
    nodes: list[object] = [ServiceNode(label="bench")]
    links: list[object] = []
    for port, name in zip(ports, names, strict=True):
        ep = endpoint_id("127.0.0.1", port, "tcp")
        nodes += [
            NameNode(id=name_id(name), name=name),
            EndpointNode(id=ep, address="127.0.0.1", port=port, proto="tcp"),
        ]
        links += [
            ConnectsEdge(source="service", target=ep, count=1),
            NamesEdge(source=ep, target=name_id(name), via="sni"),
        ]
    capture = CaptureStats(started=now, ended=now)
    return Graph(target="bench", capture=capture, nodes=nodes, links=links)  # type: ignore[arg-type]


def main() -> None:
    from depdrill.discover.model import EndpointNode, Graph
    from depdrill.discover.tls.check import check_graph

    with tempfile.TemporaryDirectory(prefix="depdrill-bench-") as tmp:
        workdir = Path(tmp)
        names = make_pki(workdir)
        servers, ports = start_servers(workdir)
        try:
            graph = _graph(ports, names)
            assert isinstance(graph, Graph)
            check_graph(graph, ca_bundle=workdir / "bundle.pem")  # warm-up: imports, bundle

            # The median of a few walks: one 0.2 s walk is at the mercy of the scheduler on a
            # shared 2-core machine, while the 5 s loop below averages itself over 200 runs.
            walks = []
            for _ in range(WALKS):
                started = time.perf_counter()
                checked = check_graph(graph, ca_bundle=workdir / "bundle.pem", timeout_s=5.0)
                walks.append(time.perf_counter() - started)
            ours = statistics.median(walks)
            reports = [n.tls for n in checked.nodes if isinstance(n, EndpointNode)]
            verified = sum(1 for r in reports if r is not None and r.verified)

            started = time.perf_counter()
            fetched = 0
            for port, name in zip(ports, names, strict=True):
                out = subprocess.run(
                    ["openssl", "s_client", "-connect", f"127.0.0.1:{port}",
                     "-servername", name, "-showcerts"],
                    stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=10,
                )  # fmt: skip
                fetched += "BEGIN CERTIFICATE" in out.stdout
            theirs = time.perf_counter() - started
        finally:
            for server in servers:
                server.terminate()
            for server in servers:
                server.wait(timeout=10)
    print(
        f"depdrill check_graph: {len(reports)} endpoints, {verified} verified, "
        f"median {ours:.3f} s of {WALKS} walks ({', '.join(f'{w:.3f}' for w in walks)})"
    )
    print(f"openssl s_client loop: {fetched} chains fetched, {theirs:.2f} s")
    print(f"ratio: {theirs / ours:.1f}x faster (target >= 20x, and <= 2 s for {ENDPOINTS})")
    if verified != ENDPOINTS or fetched != ENDPOINTS:
        raise SystemExit("bench: not every endpoint was checked")


if __name__ == "__main__":
    main()
