#!/usr/bin/env bash
# Puts the repository and its pinned TPU stack on every worker of a slice, optionally mounts a
# GCS bucket at /mnt/gcs, and checks that JAX sees the whole slice from every worker.
# shellcheck source-path=SCRIPTDIR source=common.sh
source "$(dirname -- "${BASH_SOURCE[0]}")/common.sh"

usage() {
  cat <<'EOF'
Usage: tpu_scripts/setup.sh --name NAME [--bucket BUCKET] [common flags]

On every worker, at once: unpack the committed tree (git archive HEAD; uncommitted changes are
not copied) into ~/her_jax, keeping ~/her_jax/.venv and ~/her_jax/logs; create ~/her_jax/.venv
with a Python >= 3.11 (installed from ppa:deadsnakes when the image lacks one) and
pip install -e '.[tpu]'; make /mnt/models and /mnt/data writable; mount the bucket. Then print
what JAX sees on each worker. Rerun it after every commit you want on the workers.

  --bucket BUCKET   mount gs://BUCKET at /mnt/gcs with gcsfuse on every worker (shared storage
                    for checkpoints: put output_dir under /mnt/gcs)

EOF
  common_usage
}

BUCKET=""

script_flag() {
  case $1 in
    --bucket) need_value "$@"; BUCKET=$2; SHIFT=2 ;;
    *) return 1 ;;
  esac
}

parse_args "$@"
require_target
if [[ -n $BUCKET ]]; then
  BUCKET=${BUCKET#gs://}
  BUCKET=${BUCKET%/}
  [[ $BUCKET =~ ^[a-z0-9][-a-z0-9_.]*[a-z0-9]$ ]] ||
    die "--bucket expects a bucket name such as my-bucket or gs://my-bucket (no folder), got '$BUCKET'"
fi

git -C "$REPO_ROOT" rev-parse --verify -q HEAD >/dev/null ||
  die "$REPO_ROOT is not a git checkout with a commit; setup.sh copies the committed tree (git archive HEAD)"
COMMIT=$(git -C "$REPO_ROOT" rev-parse --short HEAD)
if [[ -n $(git -C "$REPO_ROOT" status --porcelain --untracked-files=no) ]]; then
  note "warning: uncommitted changes are not copied; the workers get commit $COMMIT"
fi

STAGING=$(mktemp -d)
trap 'rm -rf "$STAGING"' EXIT
TARBALL=$STAGING/her_jax-src.tar.gz

run git -C "$REPO_ROOT" archive --format=tar.gz -o "$TARBALL" HEAD
run gcloud compute tpus tpu-vm scp "$TARBALL" "$REPO_ROOT/tpu_scripts/worker_setup.sh" "$NAME:/tmp/" \
  --zone "$ZONE" --project "$PROJECT" --worker=all
on_all_workers "bash /tmp/worker_setup.sh /tmp/her_jax-src.tar.gz $COMMIT${BUCKET:+ $(printf '%q' "$BUCKET")}"
# All workers at once: on a multi-host slice JAX waits for every host before it answers.
check="import jax; from her_jax.parallel.mesh import initialize_distributed; initialize_distributed()"
check+="; print(dict(process=jax.process_index(), processes=jax.process_count(),"
check+=" local_devices=jax.local_device_count(), devices=jax.device_count(), kind=jax.devices()[0].device_kind))"
on_all_workers "cd ~/her_jax && HER_DISTRIBUTED=1 .venv/bin/python -c \"$check\""

if ((!DRY_RUN)); then
  note "every worker should report the slice's full device count (e.g. 16 on a v5p-32: 4 workers x 4 chips)"
  note "next: get the model and data onto the workers, then tpu_scripts/launch.sh --name $NAME --config CONFIG -- key=value ..."
fi
