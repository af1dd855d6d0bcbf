#!/bin/bash
# Install the edgefleet agent into an NVIDIA Jetson Linux (L4T R36, JetPack 6, Ubuntu
# 22.04) root file system, once, from the wheelhouse the jetson-orin overlay laid beside
# this script (docs/operators-jetson.md). Run it as root inside that root file system:
#
#   sudo chroot Linux_for_Tegra/rootfs /opt/edgefleet-wheelhouse/install.sh
#       (an aarch64 builder, or an x86 one with qemu-user-static: hours, not minutes)
#   sudo /opt/edgefleet-wheelhouse/install.sh
#       (on a Jetson that already runs JetPack 6)
#
# What it does, in order:
#   1. apt: Python 3.11 from Ubuntu's universe (JetPack's python3 is 3.10; edgefleet
#      needs 3.11), the compilers, and CUDA 12.6's compiler and libraries from NVIDIA's
#      L4T repository;
#   2. the agent's venv at /opt/edgefleet, from the wheelhouse only (`pip --no-index`):
#      every package is a pinned wheel for cp311/aarch64, except llama-cpp-python, which
#      is compiled here from its sdist with CUDA for the Orin's GPU (sm_87);
#   3. bytecode (hash-checked), the agent's user and folders, its unit enabled;
#   4. the build-only packages it installed are purged (EDGEFLEET_KEEP_BUILD_TOOLS=1
#      keeps them), and this wheelhouse, this script included, is removed.
#
# The network is needed for apt only (Ubuntu's ports archive and NVIDIA's repository).
# What it installs from apt is written to /opt/edgefleet/apt-packages.txt, with versions.
# A run that failed can be run again: a venv left half-made is replaced.
set -euo pipefail

HERE=$(cd "$(dirname "$0")" && pwd)
VENV=/opt/edgefleet
CUDA=/usr/local/cuda-12.6
GIB_PER_JOB=2 # an nvcc job of ggml-cuda takes up to about 2 GiB

# Needed after the install: Python, and the CUDA runtime libraries llama.cpp links to
# (named, so that purging the -dev packages below leaves them installed).
RUNTIME_PACKAGES="python3.11 python3.11-venv cuda-cudart-12-6 libcublas-12-6 libgomp1"
# Needed to compile llama.cpp only.
BUILD_PACKAGES="python3.11-dev build-essential cmake ninja-build cuda-nvcc-12-6
cuda-cudart-dev-12-6 cuda-driver-dev-12-6 cuda-cccl-12-6 libcublas-dev-12-6"

die() {
	printf 'install.sh: error: %s\n' "$*" >&2
	exit 1
}
step() { printf '\n==> %s\n' "$*"; }

# What the image build decided (from firmware-images/jetson-orin/recipe.toml):
# EDGEFLEET_PYTHON, EDGEFLEET_REQUIREMENT, EDGEFLEET_LLAMA_CMAKE_ARGS, EDGEFLEET_ENABLE.
[ -r "$HERE/install.env" ] || die "no $HERE/install.env: lay the whole jetson-orin overlay over the root file system first (tar xpf jetson-orin.overlay.tar.gz -C rootfs)"
# shellcheck source=/dev/null
. "$HERE/install.env"
: "${EDGEFLEET_PYTHON:?install.env names no interpreter}"
: "${EDGEFLEET_REQUIREMENT:?install.env names no requirement}"
: "${EDGEFLEET_LLAMA_CMAKE_ARGS:?install.env has no CMake arguments for llama.cpp}"
: "${EDGEFLEET_ENABLE=}"

check_target() {
	[ "$(id -u)" -eq 0 ] || die "run it as root: sudo chroot ROOTFS $HERE/install.sh, or sudo $HERE/install.sh on the device"
	local machine
	machine=$(uname -m)
	[ "$machine" = aarch64 ] || die "this runs on $machine, not aarch64: run it inside the Jetson root file system, by chroot on an aarch64 builder or with qemu-user-static on x86 (docs/operators-jetson.md)"
	[ -r /etc/os-release ] || die "no /etc/os-release: this is not a root file system (chroot into Linux_for_Tegra/rootfs)"
	local id version
	id=$(sed -n 's/^ID=//p' /etc/os-release | tr -d '"')
	version=$(sed -n 's/^VERSION_ID=//p' /etc/os-release | tr -d '"')
	if [ "$id" != ubuntu ] || [ "$version" != 22.04 ]; then
		die "this root file system is $id $version; JetPack 6 (L4T R36) is Ubuntu 22.04"
	fi
	[ -r /etc/nv_tegra_release ] || die "no /etc/nv_tegra_release: not an L4T root file system, or NVIDIA's binaries are not applied yet (run sudo ./apply_binaries.sh in Linux_for_Tegra first)"
	grep -q '^# R36' /etc/nv_tegra_release || die "$(head -n 1 /etc/nv_tegra_release) is not L4T R36 (JetPack 6): this image needs CUDA 12.6 from R36.4"
	command -v apt-get >/dev/null || die "no apt-get in this root file system: it must be NVIDIA's Ubuntu-based sample root file system"
	grep -rqs 'repo.download.nvidia.com/jetson' /etc/apt/sources.list /etc/apt/sources.list.d/ ||
		die "NVIDIA's L4T apt repository is not configured (/etc/apt/sources.list.d/nvidia-l4t-apt-source.list): apply_binaries.sh writes it; CUDA comes from there"
	[ -r "$HERE/constraints.txt" ] || die "no $HERE/constraints.txt: the overlay is incomplete; unpack it again"
	local sdist
	sdist=$(find "$HERE" -maxdepth 1 -name 'llama_cpp_python-*.tar.gz' | head -n 1)
	[ -n "$sdist" ] || die "no llama_cpp_python sdist in $HERE: the overlay is incomplete; unpack it again"
}

apt_install() {
	step "apt: Python 3.11, compilers, CUDA 12.6 (network: Ubuntu ports and NVIDIA's L4T repository)"
	export DEBIAN_FRONTEND=noninteractive
	apt-get update || die "apt-get update failed: in a chroot, give it the host's DNS (docs/operators-jetson.md: resolv.conf) and check the network"
	# Build packages this run installs (not those the root file system had) are purged at the end.
	INSTALLED_HERE=""
	local package
	for package in $BUILD_PACKAGES; do
		if [ "$(dpkg-query -W -f '${Status}' "$package" 2>/dev/null || true)" != "install ok installed" ]; then
			INSTALLED_HERE="$INSTALLED_HERE $package"
		fi
	done
	local policy
	policy=$(apt-cache policy python3.11)
	[[ "$policy" == *"Candidate: "[0-9]* ]] ||
		die "apt has no python3.11: enable Ubuntu's universe component for jammy and jammy-updates in /etc/apt/sources.list (NVIDIA's sample root file system has it)"
	# shellcheck disable=SC2086 # word splitting of the package lists is meant
	apt-get install -y --no-install-recommends $RUNTIME_PACKAGES $BUILD_PACKAGES ||
		die "apt-get install failed: CUDA's packages (cuda-nvcc-12-6, libcublas-dev-12-6, ...) come from NVIDIA's 'common r36.4' repository; check /etc/apt/sources.list.d/nvidia-l4t-apt-source.list"
	[ -x "$CUDA/bin/nvcc" ] || die "no $CUDA/bin/nvcc after installing cuda-nvcc-12-6: is this L4T R36.4 (JetPack 6.1 or later)?"
	"$EDGEFLEET_PYTHON" -c 'import sys; sys.exit(sys.version_info[:2] != (3, 11))' ||
		die "$EDGEFLEET_PYTHON is not Python 3.11: $("$EDGEFLEET_PYTHON" -V 2>&1)"
}

build_jobs() {
	# Parallel compile jobs: the CPUs, but no more than memory allows (an 8 GB Orin Nano
	# runs out with one nvcc per core). EDGEFLEET_BUILD_JOBS overrides.
	if [ -n "${EDGEFLEET_BUILD_JOBS:-}" ]; then
		printf '%s' "$EDGEFLEET_BUILD_JOBS"
		return
	fi
	local cpus mem_kib by_memory
	cpus=$(nproc)
	mem_kib=$(awk '/^MemTotal:/ { print $2 }' /proc/meminfo 2>/dev/null || true)
	by_memory=$((${mem_kib:-0} / (GIB_PER_JOB * 1024 * 1024)))
	[ "$by_memory" -ge 1 ] || by_memory=1
	if [ "$by_memory" -lt "$cpus" ]; then
		cpus=$by_memory
	fi
	printf '%s' "$cpus"
}

install_venv() {
	step "the agent's venv at $VENV ($EDGEFLEET_REQUIREMENT, from the wheelhouse only)"
	rm -rf "$VENV" # a venv left by a failed run is replaced
	"$EDGEFLEET_PYTHON" -m venv "$VENV" || die "$EDGEFLEET_PYTHON -m venv failed: is python3.11-venv installed?"
	local jobs
	jobs=$(build_jobs)
	printf 'llama.cpp compiles with CUDA for sm_87 (%s jobs): tens of minutes on an Orin, hours under QEMU\n' "$jobs"
	PATH="$CUDA/bin:$PATH" CUDACXX="$CUDA/bin/nvcc" CUDA_HOME="$CUDA" \
		CMAKE_ARGS="$EDGEFLEET_LLAMA_CMAKE_ARGS" CMAKE_BUILD_PARALLEL_LEVEL="$jobs" \
		PIP_DISABLE_PIP_VERSION_CHECK=1 \
		"$VENV/bin/pip" install --no-index --no-cache-dir --no-compile --progress-bar off \
		--find-links "$HERE" -c "$HERE/constraints.txt" "$EDGEFLEET_REQUIREMENT" ||
		die "pip install failed (its output is above): a compile error in llama.cpp usually means a missing CUDA package or too little memory (EDGEFLEET_BUILD_JOBS=1)"
	find "$VENV" -name __pycache__ -type d -prune -exec rm -rf {} +
	# Hash-checked bytecode: no source timestamps in it, and it stays valid on a read-only root.
	"$VENV/bin/python" -m compileall -q -j 0 --invalidation-mode checked-hash "$VENV/lib" >/dev/null
}

install_system() {
	step "the agent's user and folders, units enabled: $EDGEFLEET_ENABLE"
	systemd-sysusers /usr/lib/sysusers.d/edgefleet.conf
	systemd-tmpfiles --create /usr/lib/tmpfiles.d/edgefleet.conf
	if [ -n "$EDGEFLEET_ENABLE" ]; then
		# shellcheck disable=SC2086 # one unit a word
		systemctl enable $EDGEFLEET_ENABLE
	fi
}

finish() {
	step "recording what apt installed; removing build-only packages and the wheelhouse"
	{
		echo "# What the install step installed from apt (build-only ones purged afterwards"
		echo "# unless EDGEFLEET_KEEP_BUILD_TOOLS=1); the rest of the root is NVIDIA's."
		# shellcheck disable=SC2086
		dpkg-query -W -f '${Package}=${Version} ${Architecture}\n' $RUNTIME_PACKAGES $BUILD_PACKAGES 2>/dev/null || true
	} >"$VENV/apt-packages.txt"
	if [ "${EDGEFLEET_KEEP_BUILD_TOOLS:-0}" != 1 ] && [ -n "$INSTALLED_HERE" ]; then
		# shellcheck disable=SC2086
		apt-get purge -y $INSTALLED_HERE
	fi
	apt-get clean
	rm -rf "$HERE" # this script included: bash has it open already
	printf '\nedgefleet agent installed in %s; next: edgefleet-agent provision (docs/operators-jetson.md)\n' "$VENV"
}

check_target
apt_install
install_venv
install_system
finish
