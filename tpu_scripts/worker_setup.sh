#!/usr/bin/env bash
# Runs on one TPU VM worker; tpu_scripts/setup.sh copies it to /tmp and runs it on every worker.
#   bash worker_setup.sh TARBALL COMMIT [BUCKET]
# Unpacks the repository tarball (of COMMIT) into ~/her_jax (keeping .venv/ and logs/), builds
# ~/her_jax/.venv with the pinned TPU stack (`pip install -e '.[tpu]'`), makes /mnt/models and
# /mnt/data writable (the configs' model and data paths) and, given a bucket, mounts it at /mnt/gcs
# with gcsfuse.
set -euo pipefail

TARBALL=${1:?usage: worker_setup.sh TARBALL COMMIT [BUCKET]}
COMMIT=${2:?usage: worker_setup.sh TARBALL COMMIT [BUCKET]}
BUCKET=${3:-}
DEST=$HOME/her_jax
MOUNT=/mnt/gcs
WORKER=$(hostname)

say() {
  printf '[%s] %s\n' "$WORKER" "$*"
}

apt_install() {
  # The dpkg lock is often held by unattended-upgrades on a VM that just booted.
  sudo DEBIAN_FRONTEND=noninteractive apt-get -o DPkg::Lock::Timeout=600 install -y -q "$@"
}

apt_update() {
  sudo apt-get -o DPkg::Lock::Timeout=600 update -q
}

# The first Python >= 3.11 (the project's floor) on PATH, python3 first.
find_python() {
  local py
  for py in python3 python3.13 python3.12 python3.11; do
    if command -v "$py" >/dev/null && "$py" -c 'import sys; sys.exit(sys.version_info < (3, 11))'; then
      echo "$py"
      return 0
    fi
  done
  return 1
}

python_for_venv() {
  local py
  if ! py=$(find_python); then
    # Ubuntu 22.04 TPU images ship Python 3.10: take 3.12 from the deadsnakes archive.
    say "no Python >= 3.11 here ($(python3 --version 2>&1)); installing python3.12 from ppa:deadsnakes" >&2
    sudo add-apt-repository -y ppa:deadsnakes/ppa >&2
    apt_update >&2
    apt_install python3.12 python3.12-venv >&2
    py=python3.12
  fi
  if ! "$py" -c 'import ensurepip, venv' 2>/dev/null; then
    say "installing the venv module for $py" >&2
    apt_update >&2
    apt_install "$("$py" -c 'import sys; print(f"python3.{sys.version_info.minor}-venv")')" >&2
  fi
  echo "$py"
}

unpack() {
  if [[ -e $DEST/.git ]]; then
    say "error: $DEST is a git checkout; setup.sh replaces that folder's contents, so move it away first" >&2
    exit 1
  fi
  mkdir -p "$DEST"
  # Files deleted from the repository must not linger; the venv and the logs stay.
  find "$DEST" -mindepth 1 -maxdepth 1 ! -name .venv ! -name logs -exec rm -rf {} +
  tar -xzf "$TARBALL" -C "$DEST"
  mkdir -p "$DEST/logs"
  echo "$COMMIT" >"$DEST/.commit"
  say "commit $COMMIT unpacked into $DEST"
}

make_venv() {
  local py
  py=$(python_for_venv)
  if [[ ! -x $DEST/.venv/bin/python ]]; then
    "$py" -m venv "$DEST/.venv"
  fi
  "$DEST/.venv/bin/python" -m pip install -q --upgrade pip
  (cd "$DEST" && .venv/bin/python -m pip install -q -e '.[tpu]')
  say "venv ready: $("$DEST/.venv/bin/python" --version), jax $("$DEST/.venv/bin/python" -c 'import jax; print(jax.__version__)')"
}

writable_dir() {
  sudo mkdir -p "$1"
  sudo chown "$(id -u):$(id -g)" "$1"
}

install_gcsfuse() {
  local codename
  codename=$(lsb_release -cs)
  say "installing gcsfuse"
  curl -fsSL https://packages.cloud.google.com/apt/doc/apt-key.gpg |
    sudo tee /usr/share/keyrings/cloud.google.asc >/dev/null
  echo "deb [signed-by=/usr/share/keyrings/cloud.google.asc] https://packages.cloud.google.com/apt gcsfuse-$codename main" |
    sudo tee /etc/apt/sources.list.d/gcsfuse.list >/dev/null
  apt_update
  apt_install gcsfuse
}

mount_bucket() {
  local mounted
  command -v gcsfuse >/dev/null || install_gcsfuse
  if mountpoint -q "$MOUNT"; then
    mounted=$(findmnt -n -o SOURCE "$MOUNT")
    if [[ $mounted != "$BUCKET" ]]; then
      say "error: $MOUNT already holds '$mounted', not '$BUCKET'; unmount it (fusermount -u $MOUNT) and rerun" >&2
      exit 1
    fi
    say "gs://$BUCKET is already mounted at $MOUNT"
    return 0
  fi
  writable_dir "$MOUNT"
  # Orbax commits a checkpoint by renaming its temporary folder; gcsfuse renames folders of a flat
  # bucket only up to --rename-dir-limit objects.
  gcsfuse --implicit-dirs --rename-dir-limit=1000000 "$BUCKET" "$MOUNT"
  say "gs://$BUCKET mounted at $MOUNT"
}

unpack
make_venv
writable_dir /mnt/models
writable_dir /mnt/data
if [[ -n $BUCKET ]]; then
  mount_bucket
fi
rm -f "$TARBALL"
say "setup done"
