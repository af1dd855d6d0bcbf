"""Real servers for the tests and the benchmarks: Mosquitto, PostgreSQL, ``edgefleet serve``,
and haproxy in front of controller replicas.

Both start the same servers, configured as in production, so they live here once; the
tests import ``scripts.servers``, the bench scripts (run with scripts/ on ``sys.path``)
import ``servers``. Mosquitto comes from Debian's ``mosquitto`` package (scripts/test and
scripts/bench-fleet install it). Each broker gets its own folder with the password and ACL
files the controller writes, and a pid file the controller signals (SIGHUP) to reload
them. PostgreSQL is the server named by ``EDGEFLEET_TEST_POSTGRES_URL`` (scripts/test
starts one when none is running); each test or benchmark run gets a database of its own.
"""

from __future__ import annotations

import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator, Mapping
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from pathlib import Path

import httpx

MOSQUITTO = shutil.which("mosquitto") or "/usr/sbin/mosquitto"
HAPROXY = shutil.which("haproxy") or "/usr/sbin/haproxy"


_HANDED_OUT: set[int] = set()


def _ephemeral_low() -> int:
    """Where the kernel's ephemeral ports (outgoing connections, ``bind(0)``) begin."""
    try:
        return int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768


def free_port() -> int:
    """A port nothing listens on, below the kernel's ephemeral range, for a server to take.

    ``bind(0)`` would pick an ephemeral port, which any outgoing connection made before
    the server binds it may take (seen: a NATS node failing with "address already in
    use" while 2,000 simulated devices connected). A port is handed out once per process
    and checked free on every address, as a server in a namespace listens on them all.
    """
    low = _ephemeral_low()
    first = 10_000 if low > 12_000 else 1_024
    for _ in range(1_000):
        port = first + secrets.randbelow(low - first)
        if port in _HANDED_OUT:
            continue
        with socket.socket() as s:
            try:
                s.bind(("0.0.0.0", port))  # probing: closed at once
            except OSError:
                continue
        _HANDED_OUT.add(port)
        return port
    raise RuntimeError(f"no free port between {first} and {low}")


def wait_port(port: int, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return
        except OSError:
            if time.monotonic() > deadline:
                raise TimeoutError(f"nothing listening on 127.0.0.1:{port}") from None
            time.sleep(0.05)


class MosquittoBroker:
    """One real Mosquitto, authenticated by files in ``auth_dir``; restartable on its port."""

    def __init__(self, root: Path, port: int | None = None, bind: str = "127.0.0.1") -> None:
        self.root = root
        self.port = port or free_port()
        self.auth_dir = root / "auth"
        self.pid_file = root / "mosquitto.pid"
        self.log_file = root / "mosquitto.log"
        self.process: subprocess.Popen[bytes] | None = None
        self.auth_dir.mkdir(parents=True, exist_ok=True)
        (root / "data").mkdir(exist_ok=True)
        for name in ("passwd", "acl"):
            (self.auth_dir / name).touch(mode=0o600)
        # A second listener as production should expose to devices: there the client id
        # is the username, so no device can take over another's session (docs/broker.md).
        self.device_port = free_port()
        lines = [
            f"listener {self.port} {bind}",
            f"listener {self.device_port} 127.0.0.1",
            "use_username_as_clientid true",
            "allow_anonymous false",
            f"password_file {self.auth_dir / 'passwd'}",
            f"acl_file {self.auth_dir / 'acl'}",
            "persistence true",
            f"persistence_location {root / 'data'}/",
            f"pid_file {self.pid_file}",
            "max_queued_messages 100000",
            "log_type error",
            "log_type warning",
            "log_type notice",
            f"log_dest file {self.log_file}",
        ]
        if os.geteuid() == 0:
            lines.append("user root")  # keep root, so it can read the 0600 files we own
        self.config = root / "mosquitto.conf"
        self.config.write_text("\n".join(lines) + "\n")

    @property
    def url(self) -> str:
        return f"mqtt://127.0.0.1:{self.port}"

    def start(self) -> None:
        assert self.process is None, "already running"
        with self.log_file.open("ab") as out:  # its start-up warnings, e.g. about root
            self.process = subprocess.Popen(
                [MOSQUITTO, "-c", str(self.config)], stdout=out, stderr=subprocess.STDOUT
            )
        wait_port(self.port)

    def stop(self) -> None:
        """A clean shutdown (SIGTERM): Mosquitto saves its persistent sessions first."""
        if self.process is None:
            return
        self.process.send_signal(signal.SIGTERM)
        self.process.wait(timeout=10)
        self.process = None

    def kill(self) -> None:
        if self.process is None:
            return
        self.process.kill()
        self.process.wait(timeout=10)
        self.process = None

    def log(self) -> str:
        return self.log_file.read_text(errors="replace") if self.log_file.exists() else ""


@contextmanager
def mosquitto(root: Path, bind: str = "127.0.0.1") -> Iterator[MosquittoBroker]:
    broker = MosquittoBroker(root, bind=bind)
    broker.start()
    try:
        yield broker
    finally:
        broker.kill()


def postgres_admin_url() -> str | None:
    """The server the suite may create databases on, or None when there is none."""
    return os.environ.get("EDGEFLEET_TEST_POSTGRES_URL")


@contextmanager
def postgres_database(admin_url: str) -> Iterator[str]:
    """A fresh, uniquely named database on ``admin_url``'s server, dropped afterwards."""
    import sqlalchemy as sa

    name = f"edgefleet_test_{uuid.uuid4().hex[:12]}"
    # No pool: a test that restarts the server leaves no dead connection to drop with.
    admin = sa.create_engine(admin_url, isolation_level="AUTOCOMMIT", poolclass=sa.NullPool)
    with admin.connect() as conn:
        conn.execute(sa.text(f'CREATE DATABASE "{name}"'))
    try:
        yield sa.make_url(admin_url).set(database=name).render_as_string(hide_password=False)
    finally:
        with admin.connect() as conn:
            conn.execute(sa.text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()


def _postgres_bin(name: str) -> str:
    """A server binary from Debian's newest PostgreSQL (they are not on ``PATH``)."""
    found = shutil.which(name)
    if found:
        return found
    versions = sorted(Path("/usr/lib/postgresql").glob("*/bin"), key=lambda p: int(p.parent.name))
    if not versions:
        raise FileNotFoundError("PostgreSQL is not installed: scripts/test installs it")
    return str(versions[-1] / name)


class PostgresServer:
    """A PostgreSQL server of one test's own (``initdb`` on a free port), to stop and start.

    The suite's shared server must stay up for every other test; a fault test that
    restarts PostgreSQL restarts this one. As root, the server runs as ``postgres``
    (it refuses root), so its folder lies outside pytest's root-only temporary tree.
    """

    def __init__(self, also_listen: str | None = None) -> None:
        self.also_listen = also_listen  # another address, trusted from its /24
        self.root = Path(tempfile.mkdtemp(prefix="edgefleet-pg-"))
        self.data = self.root / "data"
        self.port = free_port()
        self.log_file = self.root / "postgres.log"
        self._as: list[str] = []
        if os.geteuid() == 0:
            self._as = ["runuser", "-u", "postgres", "--"]
            shutil.chown(self.root, "postgres")
        self._run(_postgres_bin("initdb"), "-D", str(self.data), "-A", "trust", "-U", "postgres")
        if also_listen is not None:
            subnet = also_listen.rsplit(".", 1)[0] + ".0/24"
            with (self.data / "pg_hba.conf").open("a") as hba:
                hba.write(f"host all all {subnet} trust\n")

    def _run(self, *argv: str) -> None:
        subprocess.run([*self._as, *argv], check=True, capture_output=True, timeout=120)

    @property
    def admin_url(self) -> str:
        return f"postgresql+psycopg://postgres@127.0.0.1:{self.port}/postgres"

    def start(self) -> None:
        listen = ",".join(filter(None, ["127.0.0.1", self.also_listen]))
        options = f"-p {self.port} -k {self.root} -c listen_addresses={listen}"
        ctl = _postgres_bin("pg_ctl")
        self._run(ctl, "-D", str(self.data), "-l", str(self.log_file), "-o", options, "-w", "start")

    def crash(self) -> None:
        """Stop at once, as a crash would (``immediate``): recovery replays the WAL."""
        self._run(_postgres_bin("pg_ctl"), "-D", str(self.data), "-m", "immediate", "stop")

    def stop(self) -> None:
        self._run(_postgres_bin("pg_ctl"), "-D", str(self.data), "-m", "fast", "stop")

    def log(self) -> str:
        return self.log_file.read_text(errors="replace") if self.log_file.exists() else ""


@contextmanager
def postgres_server(also_listen: str | None = None) -> Iterator[PostgresServer]:
    """A running :class:`PostgresServer`, removed with its data afterwards."""
    server = PostgresServer(also_listen)
    server.start()
    try:
        yield server
    finally:
        with suppress(subprocess.CalledProcessError):
            server.crash()
        shutil.rmtree(server.root, ignore_errors=True)


IP = shutil.which("ip") or "/usr/sbin/ip"


@dataclass(frozen=True)
class VethLink:
    """One veth pair: the host's end and its address, the namespace's address."""

    host_link: str
    host_ip: str
    inside_ip: str


@dataclass(frozen=True)
class NetworkNamespace:
    """A network namespace joined to the host by veth links, to cut and heal (root only).

    A process started in it (:meth:`command`) reaches the host at ``host_ip`` and is
    reached at ``inside_ip`` (those of the first link; ``links[k]`` for the others, each
    its own subnet, so which link a connection takes is decided by the address it
    uses). :meth:`cut` takes the host's end of a link down, which is a network
    partition to both sides: packets are dropped, nothing is refused.
    """

    name: str
    links: tuple[VethLink, ...]

    @property
    def host_ip(self) -> str:
        return self.links[0].host_ip

    @property
    def inside_ip(self) -> str:
        return self.links[0].inside_ip

    def command(self, *argv: str) -> list[str]:
        return [IP, "netns", "exec", self.name, *argv]

    def cut(self, link: int = 0) -> None:
        _ip("link", "set", self.links[link].host_link, "down")

    def heal(self, link: int = 0) -> None:
        _ip("link", "set", self.links[link].host_link, "up")


def _ip(*argv: str) -> None:
    subprocess.run([IP, *argv], check=True, capture_output=True, timeout=30)


@contextmanager
def network_namespace(links: int = 1) -> Iterator[NetworkNamespace]:
    """A fresh namespace with ``links`` veth links, each on a random 10.x.y.0/24.

    Removed with its links afterwards.
    """
    tag = secrets.token_hex(3)
    first = secrets.randbelow(250) + 1
    subnets = [f"10.{secrets.randbelow(200) + 50}.{(first + k) % 250 + 1}" for k in range(links)]
    veths = tuple(
        VethLink(f"efh{tag}{k}", f"{subnet}.1", f"{subnet}.2") for k, subnet in enumerate(subnets)
    )
    ns = NetworkNamespace(f"ef-{tag}", veths)
    _ip("netns", "add", ns.name)
    try:
        _ip("-n", ns.name, "link", "set", "lo", "up")
        for k, veth in enumerate(veths):
            inside_link = f"efn{tag}{k}"
            _ip("link", "add", veth.host_link, "type", "veth", "peer", "name", inside_link)
            _ip("link", "set", inside_link, "netns", ns.name)
            _ip("addr", "add", f"{veth.host_ip}/24", "dev", veth.host_link)
            _ip("link", "set", veth.host_link, "up")
            _ip("-n", ns.name, "addr", "add", f"{veth.inside_ip}/24", "dev", inside_link)
            _ip("-n", ns.name, "link", "set", inside_link, "up")
        yield ns
    finally:
        for veth in veths:
            with suppress(subprocess.CalledProcessError):
                _ip("link", "del", veth.host_link)
        _ip("netns", "del", ns.name)


EDGEFLEET = Path(sys.executable).parent / "edgefleet"
CONTROLLER_READY_S = 30.0


@dataclass
class Controller:
    proc: subprocess.Popen[bytes]
    url: str
    data_dir: Path
    log: Path

    def output(self) -> str:
        return self.log.read_text(errors="replace")

    def kill(self) -> int:
        """SIGKILL the process, as a crash or the OOM killer would; its exit status."""
        if self.proc.poll() is None:
            self.proc.kill()
        return self.proc.wait(timeout=10)

    def cli(self, *args: str) -> str:
        result = subprocess.run(
            [str(EDGEFLEET), *args, "--url", self.url, "--data-dir", str(self.data_dir)],
            capture_output=True,
            text=True,
            timeout=60,
            env={k: v for k, v in os.environ.items() if "ADMIN_TOKEN" not in k},
        )
        assert result.returncode == 0, result.stdout + result.stderr
        return result.stdout


def _wait_ready(controller: Controller, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if controller.proc.poll() is not None:
            raise AssertionError(f"edgefleet serve exited:\n{controller.output()[-4000:]}")
        try:
            if httpx.get(f"{controller.url}/readyz", timeout=2).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.1)  # polling another process
    raise AssertionError(f"/readyz never said ready:\n{controller.output()[-4000:]}")


@contextmanager
def running_controller(
    tmp_path: Path,
    database_url: str,
    *args: str,
    env: Mapping[str, str] | None = None,
    ready_s: float = CONTROLLER_READY_S,
    name: str = "controller",
    data_dir: Path | None = None,
    netns: NetworkNamespace | None = None,
) -> Iterator[Controller]:
    """``edgefleet serve *args`` on a free port, ready; stopped (SIGTERM) on the way out.

    Only ``args`` and ``env`` configure it: ``EDGEFLEET_FLEET_*`` variables of the caller's
    environment are left out. Its data folder is ``tmp_path/<name>`` and its log
    ``tmp_path/<name>.log``; give replicas (or a controller restarted after a crash) one
    ``data_dir`` and a ``name`` each. One killed (:meth:`Controller.kill`) is left dead.
    In ``netns`` it listens on the namespace's address.
    """
    port = free_port()
    data_dir = data_dir or tmp_path / name
    log = tmp_path / f"{name}.log"
    inherited = {k: v for k, v in os.environ.items() if not k.startswith("EDGEFLEET_FLEET_")}
    host = netns.inside_ip if netns is not None else "127.0.0.1"
    command = [
        str(EDGEFLEET), "serve", "--data-dir", str(data_dir), "--db", database_url,
        "--host", host, "--port", str(port), "--log-level", "warning", *args,
    ]  # fmt: skip
    if netns is not None:
        command = netns.command(*command)
    with log.open("wb") as out:
        proc = subprocess.Popen(
            command,
            stdout=out,
            stderr=subprocess.STDOUT,
            env={**inherited, **(env or {}), "PYTHONUNBUFFERED": "1"},
        )
    running = Controller(proc, f"http://{host}:{port}", data_dir, log)
    try:
        _wait_ready(running, ready_s)
        yield running
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


# What a load balancer should ask a NATS node: the server and its JetStream cluster
# membership, not every stream and consumer (plain /healthz is 503 whenever one of
# those is catching up, which under load is often: haproxy dropped all three nodes).
# Even this flaps under a connect storm ("not current with the meta leader"), so a node
# taken out keeps its sessions: only new connections go elsewhere. A node cut off from
# its peers closes its clients' connections itself, as their publishes time out.
NATS_LB_HEALTH = "/healthz?js-server-only=true"


def _haproxy_config(
    port: int, backends: list[str], mode: str, health_ports: list[int] | None = None
) -> str:
    """Round robin over ``backends`` (``host:port``), each health-checked every 300 ms.

    ``http``: controller replicas, checked on ``/readyz``. ``tcp``: MQTT broker nodes,
    checked by connecting, as a cloud's network load balancer does, or, with
    ``health_ports``, by :data:`NATS_LB_HEALTH` on each node's monitoring port (NATS says
    503 there while it has lost its JetStream cluster). A backend that dies or says it is
    not ready leaves the rotation within a second; a connection that fails is sent to
    another backend (``option redispatch``).
    """
    servers = [f"    server r{n} {where} check" for n, where in enumerate(backends, 1)]
    check = ["    option httpchk GET /readyz", "    http-check expect status 200"]
    if health_ports is not None:
        servers = [f"{line} port {p}" for line, p in zip(servers, health_ports, strict=True)]
        check = [f"    option httpchk GET {NATS_LB_HEALTH}", "    http-check expect status 200"]
    elif mode != "http":
        check = []
    return "\n".join(
        [
            "global",
            "    maxconn 4096",
            "defaults",
            f"    mode {mode}",
            "    timeout connect 2s",
            "    timeout client 60s" if mode == "http" else "    timeout client 1h",
            "    timeout server 60s" if mode == "http" else "    timeout server 1h",
            "    retries 3",
            "    option redispatch",
            "frontend front",
            f"    bind 127.0.0.1:{port}",
            "    default_backend backends",
            "backend backends",
            "    balance roundrobin",
            *check,
            "    default-server inter 300ms fall 2 rise 1",
            *servers,
            "",
        ]
    )


@contextmanager
def haproxy(
    root: Path, backends: list[str], mode: str = "http", health_ports: list[int] | None = None
) -> Iterator[str]:
    """haproxy (Debian's) in front of controller replicas (or, ``tcp``, broker nodes).

    Yields ``http://127.0.0.1:<port>`` (``mqtt://...`` in ``tcp`` mode).
    """
    root.mkdir(parents=True, exist_ok=True)
    port = free_port()
    config = root / "haproxy.cfg"
    config.write_text(_haproxy_config(port, backends, mode, health_ports))
    with (root / "haproxy.log").open("ab") as out:
        proc = subprocess.Popen(
            [HAPROXY, "-db", "-f", str(config)], stdout=out, stderr=subprocess.STDOUT
        )
    try:
        try:
            wait_port(port)
        except TimeoutError:
            log = (root / "haproxy.log").read_text(errors="replace")
            raise AssertionError(f"haproxy did not start (exit {proc.poll()}):\n{log}") from None
        yield f"{'http' if mode == 'http' else 'mqtt'}://127.0.0.1:{port}"
    finally:
        proc.terminate()
        proc.wait(timeout=10)
