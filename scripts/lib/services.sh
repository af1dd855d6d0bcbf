# Sourced by scripts/test, scripts/demo and scripts/bench-fleet: make sure the real
# servers the suite and the benchmarks talk to are installed (Debian packages) and,
# for PostgreSQL, running. Mosquitto is only installed here: every test and benchmark
# starts its own broker on a free port.

apt_install() {
    if [[ $(id -u) != 0 ]] || ! command -v apt-get >/dev/null; then
        die "missing $*: install it (Debian: sudo apt-get install $*) and run again"
    fi
    log "installing $* (Debian packages)"
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q "$@" >&2 \
        || { apt-get update -q >&2 && DEBIAN_FRONTEND=noninteractive apt-get install -y -q "$@" >&2; }
}

ensure_mosquitto() {
    command -v mosquitto >/dev/null || [[ -x /usr/sbin/mosquitto ]] || apt_install mosquitto
}

# The dashboard's browser tests drive Debian's Chromium through Playwright, which
# cannot download its own browsers here (tests/browser/ launches /usr/bin/chromium).
ensure_chromium() {
    [[ -x /usr/bin/chromium ]] || apt_install chromium
}

# Exports EDGEFLEET_TEST_POSTGRES_URL, pointing at a server the suite may create
# databases on: $EDGEFLEET_TEST_POSTGRES_URL if set, else the local cluster on 5432,
# which is installed and started when missing.
ensure_postgres() {
    if [[ -n "${EDGEFLEET_TEST_POSTGRES_URL:-}" ]]; then
        return 0
    fi
    export EDGEFLEET_TEST_POSTGRES_URL="postgresql+psycopg://postgres@127.0.0.1:5432/postgres"
    if command -v pg_isready >/dev/null && pg_isready -q -h 127.0.0.1 -p 5432; then
        return 0
    fi
    ls /usr/lib/postgresql/*/bin/postgres >/dev/null 2>&1 || apt_install postgresql
    local version
    version="$(ls /etc/postgresql 2>/dev/null | sort -V | tail -n1)"
    if [[ -z "$version" ]]; then
        version="$(ls /usr/lib/postgresql | sort -V | tail -n1)"
        pg_createcluster "$version" main >&2
    fi
    log "starting PostgreSQL $version"
    # Local connections by trust, as on a developer machine; the suite creates and
    # drops its own databases.
    local hba="/etc/postgresql/$version/main/pg_hba.conf"
    if ! grep -q '^host all all 127.0.0.1/32 trust' "$hba"; then
        sed -i '1i host all all 127.0.0.1/32 trust' "$hba"
    fi
    pg_ctlcluster --skip-systemctl-redirect "$version" main start >&2 \
        || pg_ctlcluster "$version" main start >&2
    for _ in $(seq 50); do pg_isready -q -h 127.0.0.1 -p 5432 && return 0; sleep 0.2; done
    die "PostgreSQL did not start: see /var/log/postgresql/"
}

ensure_image_tools() {
    # What `edgefleet images build` runs for a root file system (fleet/images/build.py).
    local missing=()
    command -v mmdebstrap >/dev/null || missing+=(mmdebstrap)
    command -v mkfs.ext4 >/dev/null || missing+=(e2fsprogs)
    command -v mkfs.vfat >/dev/null || missing+=(dosfstools)
    command -v mcopy >/dev/null || missing+=(mtools)
    command -v sfdisk >/dev/null || missing+=(fdisk)
    ((${#missing[@]} == 0)) || apt_install "${missing[@]}"
}

ensure_qemu() {
    # The raw image's boot test (tests/integration/test_image_x86.py): QEMU, UEFI firmware.
    if ! command -v qemu-system-x86_64 >/dev/null || [[ ! -f /usr/share/OVMF/OVMF_CODE_4M.fd ]]; then
        apt_install --no-install-recommends qemu-system-x86 ovmf
    fi
}

ensure_scale_tools() {
    # Scale-out tests (tests/integration/test_scale_out.py): haproxy in front of the
    # replicas; nats-server and rabbitmq-server for the broker clusters
    # (tests/integration/test_broker_cluster.py); iproute2 to cut a replica off.
    local missing=()
    command -v haproxy >/dev/null || [[ -x /usr/sbin/haproxy ]] || missing+=(haproxy)
    [[ -x /usr/sbin/nats-server ]] || missing+=(nats-server)
    [[ -x /usr/sbin/rabbitmq-server ]] || missing+=(rabbitmq-server)
    command -v ip >/dev/null || missing+=(iproute2)  # network namespaces (test_network_cut.py)
    ((${#missing[@]} == 0)) || apt_install "${missing[@]}"
}
