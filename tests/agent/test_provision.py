"""Provisioning an image: the pure decisions, the files on disk, the fleet's answers, the CLI.

The controller is the enrollment fake over real HTTP (``tests/fakes/enrollment.py``),
answering the token check like the real one; tests/integration/test_provision_agent.py
provisions against the real controller and boots an agent from the result.
"""

from __future__ import annotations

import os
import ssl
import stat
import threading
from collections.abc import Iterator
from datetime import UTC, datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from securesystemslib.signer import CryptoSigner
from tuf.api.metadata import Metadata, Root, Snapshot, Targets, Timestamp
from typer.testing import CliRunner

from agent.cli import app as cli
from agent.config import AgentSettings
from agent.errors import ConfigError
from agent.link.errors import EnrollmentRejected, LinkUnavailable
from agent.provision import (
    BROKER_CA,
    ENV_FILE,
    ROOT_JSON,
    check_layout,
    check_token,
    env_file,
    explain_check_refusal,
    group_id,
    plan_files,
    provision,
    resolve_token,
    token_from_csv,
    token_source_problem,
)
from models.wire import ProvisionCheckResponse
from scripts.servers import free_port
from tests.agent.test_link_tls import make_ca, pem
from tests.fakes.enrollment import FakeController, accept_as, check_tokens


def signed_root(version: int = 1, *, signed: bool = True) -> str:
    """A fleet's TUF root.json: one key for every role, signed by it (or not at all)."""
    signer = CryptoSigner.generate_ed25519()
    root = Root(version=version)
    for role in (Root.type, Timestamp.type, Snapshot.type, Targets.type):
        root.add_key(signer.public_key, role)
    metadata = Metadata(root)
    if signed:
        metadata.sign(signer)
    return metadata.to_bytes().decode()


TUF_ROOT = signed_root()
CA_PEM = "-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----\n"
GOOD, USED, EXPIRED, REVOKED = "eft_good", "eft_used", "eft_expired", "eft_revoked"
STATES = {GOOD: "active", USED: "used", EXPIRED: "expired", REVOKED: "revoked"}
# the gid the image's edgefleet group has; as root, one that differs from ours
AGENT_GID = 4242 if os.geteuid() == 0 else os.getgid()
CSV = (
    "index,token_id,secret,group,expires_at\n"
    "1,tok-a,eft_first,lab,2030-01-01T00:00:00+00:00\n"
    "2,tok-b,eft_second,lab,\n"
    "3,tok-c,eft_third,,\n"
)


def answer(**changes: object) -> ProvisionCheckResponse:
    values: dict[str, object] = {
        "token_id": "tok-1",
        "group": "lab",
        "uses_left": 1,
        "expires_at": datetime(2030, 1, 1, tzinfo=UTC),
        "tuf_root": TUF_ROOT,
        "broker_url": "mqtts://broker.example:8883",
        "broker_ca_pem": CA_PEM,
    }
    values.update(changes)
    return ProvisionCheckResponse.model_validate(values)


def make_rootfs(root: Path) -> Path:
    for folder in ("usr/bin", "opt/edgefleet/bin", "etc/edgefleet", "var/lib"):
        (root / folder).mkdir(parents=True, exist_ok=True)
    (root / "usr/lib").mkdir(parents=True, exist_ok=True)
    (root / "usr/lib/os-release").write_text('ID=debian\nVERSION_ID="12"\n')
    (root / "etc/os-release").symlink_to("../usr/lib/os-release")
    (root / "opt/edgefleet/bin/edgefleet-agent").write_text("#!/opt/edgefleet/bin/python\n")
    (root / "etc/edgefleet/agent.toml").write_text('store_dir = "/var/lib/edgefleet/models"\n')
    (root / "etc/group").write_text(f"root:x:0:\nedgefleet:x:{AGENT_GID}:\n")
    return root


@pytest.fixture
def rootfs(tmp_path: Path) -> Path:
    return make_rootfs(tmp_path / "rootfs")


@pytest.fixture
def fleet() -> Iterator[FakeController]:
    check = check_tokens(STATES, tuf_root=TUF_ROOT, broker_ca_pem=CA_PEM)
    with FakeController(accept_as("dev-1", "mqtt://x:1", "pw"), check=check) as controller:
        yield controller


def parse_env_file(text: str) -> dict[str, str]:
    """systemd's EnvironmentFile rules, as far as provision.env uses them."""
    values: dict[str, str] = {}
    for line in text.splitlines():
        if not line or line.startswith(("#", ";")):
            continue
        key, _, value = line.partition("=")
        if value.startswith('"'):
            assert value.endswith('"')
            value = value[1:-1].replace('\\"', '"').replace("\\\\", "\\")
        values[key] = value
    return values


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


# -- pure decisions -----------------------------------------------------------------------------


def test_a_target_must_be_a_root_filesystem_with_edgefleet() -> None:
    full = {"etc/os-release", "usr", "opt/edgefleet/bin/edgefleet-agent", "etc/edgefleet"}
    check_layout("/mnt/img", full)
    with pytest.raises(ConfigError, match=r"^/mnt/img is not a root filesystem: no etc/os-release"):
        check_layout("/mnt/img", full - {"etc/os-release"})
    with pytest.raises(ConfigError, match="not a root filesystem: no usr"):
        check_layout("/mnt/img", full - {"usr"})
    with pytest.raises(
        ConfigError, match="has no edgefleet installed: no opt/edgefleet/bin/edgefleet-agent"
    ):
        check_layout("/mnt/img", full - {"opt/edgefleet/bin/edgefleet-agent"})
    with pytest.raises(ConfigError, match="no etc/edgefleet"):
        check_layout("/mnt/img", full - {"etc/edgefleet"})


def test_a_token_is_picked_from_tokens_csv_by_index() -> None:
    assert token_from_csv(CSV, 1, "tokens.csv") == "eft_first"
    assert token_from_csv(CSV, 3, "tokens.csv") == "eft_third"
    with pytest.raises(
        ConfigError, match=r"tokens.csv has no token with index 4 \(it holds 1 to 3\)"
    ):
        token_from_csv(CSV, 4, "tokens.csv")
    with pytest.raises(ConfigError, match="indexes start at 1"):
        token_from_csv(CSV, 0, "tokens.csv")
    with pytest.raises(ConfigError, match="it holds no tokens"):
        token_from_csv("index,token_id,secret,group,expires_at\n", 1, "tokens.csv")
    with pytest.raises(ConfigError, match="is not a tokens file"):
        token_from_csv("id,value\n1,x\n", 1, "other.csv")
    with pytest.raises(ConfigError, match="has no secret"):
        token_from_csv("index,secret\n1,\n", 1, "tokens.csv")


def test_the_options_must_name_exactly_one_token() -> None:
    csv = Path("tokens.csv")
    assert token_source_problem("eft_x", None, None) is None
    assert token_source_problem(None, csv, 2) is None
    assert "no token" in str(token_source_problem(None, None, None))
    assert "not both" in str(token_source_problem("eft_x", csv, 1))
    assert "--tokens needs --index" in str(token_source_problem(None, csv, None))
    assert "--index needs --tokens" in str(token_source_problem(None, None, 3))
    assert "empty" in str(token_source_problem("  ", None, None))


def test_the_agents_group_comes_from_the_images_etc_group() -> None:
    groups = "root:x:0:\nedgefleet:x:998:\nvideo:x:44:edgefleet\n"
    assert group_id(groups) == 998
    assert group_id("root:x:0:\n") == 0
    assert group_id(None) == 0
    assert group_id("edgefleet:x:notanumber:\n") == 0


def test_provision_env_holds_the_fleet_settings_in_environmentfile_syntax() -> None:
    text = env_file("https://fleet.example:8000", "eft_abc-_1", answer(), broker_ca=True).decode()
    assert text.startswith("# Written by `edgefleet-agent provision`")
    assert "tok-1, group lab, expires 2030-01-01T00:00:00+00:00" in text
    assert parse_env_file(text) == {
        "EDGEFLEET_AGENT_FLEET__URL": "https://fleet.example:8000",
        "EDGEFLEET_AGENT_FLEET__TOKEN": "eft_abc-_1",
        "EDGEFLEET_AGENT_FLEET__TRUST_ROOT": "/etc/edgefleet/root.json",
        "EDGEFLEET_AGENT_FLEET__BROKER_CA": "/etc/edgefleet/broker-ca.pem",
    }
    odd = env_file("https://f", 'we"ird $token\\', answer(), broker_ca=False).decode()
    assert parse_env_file(odd)["EDGEFLEET_AGENT_FLEET__TOKEN"] == 'we"ird $token\\'
    assert "BROKER_CA" not in odd
    with pytest.raises(ConfigError, match="newline"):
        env_file("https://f", "two\nlines", answer(), broker_ca=False)


def test_the_plan_writes_the_ca_only_when_the_broker_has_one() -> None:
    with_ca = plan_files("https://f", "eft_x", answer(), gid=998)
    assert [(f.path, f.mode, f.gid) for f in with_ca.write] == [
        (ROOT_JSON, 0o644, None),
        (BROKER_CA, 0o644, None),
        (ENV_FILE, 0o640, 998),
    ]
    assert with_ca.write[0].data == TUF_ROOT.encode()
    assert with_ca.write[1].data == CA_PEM.encode()
    assert with_ca.remove == ()
    without = plan_files("https://f", "eft_x", answer(broker_ca_pem=None), gid=0)
    assert [f.path for f in without.write] == [ROOT_JSON, ENV_FILE]
    assert without.remove == (BROKER_CA,)  # a stale CA from an earlier provisioning goes
    for bad, why in [
        (signed_root(signed=False), "root was signed by 0/1 keys"),
        (Metadata(Targets()).to_bytes().decode(), "it is targets metadata"),
        ('{"signed": {"_type": "root"}}', "Failed to deserialize"),
    ]:
        with pytest.raises(ConfigError, match=rf"sent a TUF root that cannot be trusted \({why}"):
            plan_files("https://f", "eft_x", answer(tuf_root=bad), 0)


@pytest.mark.parametrize(
    ("status", "message", "hint"),
    [
        (403, "unknown enrollment token: check it was copied whole", "edgefleet tokens create"),
        (403, "enrollment token tok-1 is used up", "each token enrolls a limited number"),
        (403, "enrollment token tok-1 expired at 2026-01-01", "edgefleet tokens create"),
        (403, "enrollment token tok-1 was revoked", "provision again"),
        (404, "Not Found", "has no /api/v1/enroll/check endpoint"),
    ],
)
def test_refusals_say_what_the_controller_said_and_what_to_do(
    status: int, message: str, hint: str
) -> None:
    body = f'{{"error": {{"code": "enrollment_rejected", "message": "{message}"}}}}'.encode()
    text = explain_check_refusal(status, body, "https://f")
    assert text.startswith(f"the fleet at https://f refused the token (HTTP {status}): {message};")
    assert hint in text


# -- the shell, against a real HTTP server ------------------------------------------------------


def test_provisioning_writes_the_trust_anchors_and_the_environment_file(
    rootfs: Path, fleet: FakeController
) -> None:
    done = provision(rootfs, fleet.url + "/", GOOD)
    assert done.fleet_url == fleet.url  # trailing slash dropped, as the agent's config does
    assert [c.token for c in fleet.checks] == [GOOD]
    assert fleet.requests == []  # only checked: nothing enrolled, no use spent
    root_json, ca, env = rootfs / ROOT_JSON, rootfs / BROKER_CA, rootfs / ENV_FILE
    assert root_json.read_text() == TUF_ROOT
    assert ca.read_text() == CA_PEM
    assert (mode(root_json), mode(ca), mode(env)) == (0o644, 0o644, 0o640)
    assert env.stat().st_gid == AGENT_GID
    values = parse_env_file(env.read_text())
    assert values["EDGEFLEET_AGENT_FLEET__TOKEN"] == GOOD
    assert done.warnings == ()
    assert sorted(p.name for p in (rootfs / "etc/edgefleet").iterdir()) == [
        "agent.toml",
        "broker-ca.pem",
        "provision.env",
        "root.json",
    ]  # no temporary files left behind


def test_the_environment_file_configures_the_agent(
    rootfs: Path, fleet: FakeController, monkeypatch: pytest.MonkeyPatch
) -> None:
    provision(rootfs, fleet.url, GOOD)
    for key, value in parse_env_file((rootfs / ENV_FILE).read_text()).items():
        monkeypatch.setenv(key, value)
    settings = AgentSettings()
    assert settings.fleet.url == fleet.url
    assert settings.fleet.token is not None
    assert settings.fleet.token.get_secret_value() == GOOD
    assert settings.fleet.trust_root == Path("/etc/edgefleet/root.json")
    assert settings.fleet.broker_ca == Path("/etc/edgefleet/broker-ca.pem")


@pytest.mark.parametrize(
    ("token", "reason"),
    [
        ("eft_nobody_knows", "unknown enrollment token"),
        (USED, "is used up"),
        (EXPIRED, "expired at"),
        (REVOKED, "was revoked"),
    ],
)
def test_a_refused_token_writes_nothing(
    rootfs: Path, fleet: FakeController, token: str, reason: str
) -> None:
    with pytest.raises(EnrollmentRejected, match=reason):
        provision(rootfs, fleet.url, token)
    assert not (rootfs / ENV_FILE).exists()
    assert not (rootfs / ROOT_JSON).exists()


def test_an_unreachable_fleet_writes_nothing(rootfs: Path) -> None:
    url = f"http://127.0.0.1:{free_port()}"
    with pytest.raises(LinkUnavailable) as caught:
        provision(rootfs, url, GOOD)
    assert caught.value.message == (
        f"cannot reach the fleet at {url}: connection refused; check the URL and that the "
        "controller runs"
    )
    assert sorted(p.name for p in (rootfs / "etc/edgefleet").iterdir()) == ["agent.toml"]


def test_an_untrusted_https_certificate_is_named(rootfs: Path, tmp_path: Path) -> None:
    key, cert = make_ca()  # a self-signed certificate, as a lab controller may have
    cert_file, key_file = tmp_path / "cert.pem", tmp_path / "key.pem"
    cert_file.write_bytes(pem(cert))
    key_file.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    tls = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    tls.load_cert_chain(cert_file, key_file)
    server = ThreadingHTTPServer(("127.0.0.1", 0), BaseHTTPRequestHandler)
    server.socket = tls.wrap_socket(server.socket, server_side=True)
    thread = threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    url = f"https://127.0.0.1:{server.server_address[1]}"
    try:
        with pytest.raises(ConfigError) as caught:  # rejected: retrying will not help
            provision(rootfs, url, GOOD)
    finally:
        server.shutdown()
        server.server_close()
        thread.join(5)
    assert caught.value.message == (
        f"cannot reach the fleet at {url}: the TLS certificate is not trusted (self-signed "
        "certificate); if the controller's certificate comes from a private CA, run with "
        "SSL_CERT_FILE=that-ca.pem"
    )
    assert not (rootfs / ENV_FILE).exists()


def test_a_server_error_is_transient_and_a_redirect_is_refused(rootfs: Path) -> None:
    errors = FakeController(accept_as("d", "mqtt://x:1", "p"), check=lambda _: (503, {}))
    with errors, pytest.raises(LinkUnavailable, match="answered HTTP 503"):
        check_token(errors.url, GOOD)
    garbled = FakeController(accept_as("d", "mqtt://x:1", "p"), check=lambda _: (200, {"x": 1}))
    with garbled, pytest.raises(EnrollmentRejected, match="cannot read"):
        check_token(garbled.url, GOOD)


def test_provisioning_again_replaces_the_files_and_drops_a_stale_ca(
    rootfs: Path, fleet: FakeController
) -> None:
    provision(rootfs, fleet.url, GOOD)
    root_v2 = signed_root(2)
    fleet.check = check_tokens({"eft_new": "active"}, tuf_root=root_v2)
    done = provision(rootfs, fleet.url, "eft_new")
    assert done.removed == (BROKER_CA,)
    assert not (rootfs / BROKER_CA).exists()
    values = parse_env_file((rootfs / ENV_FILE).read_text())
    assert values["EDGEFLEET_AGENT_FLEET__TOKEN"] == "eft_new"
    assert "EDGEFLEET_AGENT_FLEET__BROKER_CA" not in values
    assert (rootfs / ROOT_JSON).read_text() == root_v2


def test_an_image_already_enrolled_gets_a_warning(rootfs: Path, fleet: FakeController) -> None:
    identity = rootfs / "var/lib/edgefleet/agent/identity.json"
    identity.parent.mkdir(parents=True)
    identity.write_text("{}")
    done = provision(rootfs, fleet.url, GOOD)
    assert len(done.warnings) == 1
    assert "already enrolled" in done.warnings[0]


def test_a_target_that_is_not_a_rootfs_is_refused_before_the_fleet_is_asked(
    tmp_path: Path, fleet: FakeController
) -> None:
    with pytest.raises(ConfigError, match="is not a root filesystem: no etc/os-release"):
        provision(tmp_path, fleet.url, GOOD)
    with pytest.raises(ConfigError, match="absent does not exist: pass the image's root"):
        provision(tmp_path / "absent", fleet.url, GOOD)
    raw = tmp_path / "disk.img"
    raw.write_bytes(b"\0" * 512)
    with pytest.raises(ConfigError, match=r"disk.img is a file, not a folder: .* mounted"):
        provision(raw, fleet.url, GOOD)
    with pytest.raises(ConfigError, match="--fleet"):
        provision(tmp_path, "ftp://fleet", GOOD)
    with pytest.raises(ConfigError, match=r"not an enrollment token \(300 characters\)"):
        provision(make_rootfs(tmp_path / "rootfs"), fleet.url, "x" * 300)
    assert fleet.checks == []


def test_a_symlinked_config_folder_is_not_written_through(
    tmp_path: Path, fleet: FakeController
) -> None:
    rootfs = make_rootfs(tmp_path / "rootfs")
    elsewhere = tmp_path / "host-etc"
    (rootfs / "etc/edgefleet/agent.toml").rename(tmp_path / "agent.toml")
    (rootfs / "etc/edgefleet").rmdir()
    elsewhere.mkdir()
    (rootfs / "etc/edgefleet").symlink_to(elsewhere)
    with pytest.raises(ConfigError, match="symbolic link"):
        provision(rootfs, fleet.url, GOOD)
    assert list(elsewhere.iterdir()) == []


def test_resolve_token_reads_the_csv_with_or_without_a_bom(tmp_path: Path) -> None:
    path = tmp_path / "tokens.csv"
    path.write_text("\ufeff" + CSV, encoding="utf-8")
    assert resolve_token(None, path, 2) == "eft_second"
    assert resolve_token(" eft_x ", None, None) == "eft_x"
    with pytest.raises(ConfigError, match="cannot read the tokens file"):
        resolve_token(None, tmp_path / "absent.csv", 1)


# -- the CLI ---------------------------------------------------------------------------------------


def test_the_cli_prints_what_it_wrote_and_the_next_step(
    rootfs: Path, fleet: FakeController, tmp_path: Path
) -> None:
    tokens = tmp_path / "tokens.csv"
    tokens.write_text(CSV.replace("eft_second", GOOD))
    result = CliRunner().invoke(
        cli,
        ["provision", str(rootfs), "--fleet", fleet.url, "--tokens", str(tokens), "--index", "2"],
    )
    assert result.exit_code == 0, result.output
    assert f"provisioned {rootfs} for {fleet.url}" in result.output
    assert "1 use left" in result.output
    assert f"wrote {rootfs / ENV_FILE} (0640, group {AGENT_GID})" in result.output
    assert "edgefleet-agent status" in result.output
    assert "mqtts://broker.example:8883" in result.output
    assert GOOD not in result.output  # the secret is not echoed


@pytest.mark.parametrize(
    ("args", "error"),
    [
        ([], "no token"),
        (["--token", GOOD, "--index", "1"], "not both"),
        (["--tokens", "{csv}", "--index", "9"], "has no token with index 9 (it holds 1 to 3)"),
        (["--token", USED], "is used up"),
    ],
)
def test_cli_errors_exit_2_and_write_nothing(
    rootfs: Path, fleet: FakeController, tmp_path: Path, args: list[str], error: str
) -> None:
    tokens = tmp_path / "tokens.csv"
    tokens.write_text(CSV)
    args = [a.replace("{csv}", str(tokens)) for a in args]
    result = CliRunner().invoke(cli, ["provision", str(rootfs), "--fleet", fleet.url, *args])
    assert result.exit_code == 2
    assert "error: " in result.output
    assert error in " ".join(result.output.split())
    assert not (rootfs / ENV_FILE).exists()


def test_the_cli_says_when_the_fleet_cannot_be_reached_and_to_retry(rootfs: Path) -> None:
    url = f"http://127.0.0.1:{free_port()}"
    result = CliRunner().invoke(cli, ["provision", str(rootfs), "--fleet", url, "--token", GOOD])
    assert result.exit_code == 75  # EX_TEMPFAIL: a batch script may try again later
    assert f"error: cannot reach the fleet at {url}" in result.output
    assert not (rootfs / ENV_FILE).exists()
