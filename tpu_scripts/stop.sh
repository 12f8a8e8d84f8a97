#!/usr/bin/env bash
# Stops the trainer on every worker with SIGTERM (it saves a checkpoint, then exits) and waits for
# it to exit; with --delete, then deletes the slice.
# shellcheck source-path=SCRIPTDIR source=common.sh
source "$(dirname -- "${BASH_SOURCE[0]}")/common.sh"

usage() {
  cat <<'EOF'
Usage: tpu_scripts/stop.sh --name NAME [--timeout S] [--kill] [--delete [--force]] [--direct] [common flags]

Sends SIGTERM to her_jax.train on every worker (pkill -f; the trainer writes a checkpoint and
exits; rerunning the same launch.sh command resumes from it) and waits until it has exited.

  --timeout S   seconds to wait for the trainer to exit on each worker (default 1800;
                0: do not wait)
  --kill        SIGKILL instead: stops at once, no checkpoint
  --delete      then delete the slice: the queued resource with its TPU VM
                (queued-resources delete --force --async), or with --direct the TPU VM
  --force       with --delete: delete even when a worker did not stop in time or could not be
                reached (e.g. a preempted spot slice)
  --direct      the TPU was created with create.sh --direct (there is no queued resource)

EOF
  common_usage
}

TIMEOUT=1800
SIGNAL=TERM
DELETE=0
FORCE=0
DIRECT=0

script_flag() {
  case $1 in
    --timeout) need_value "$@"; TIMEOUT=$2; SHIFT=2 ;;
    --kill) SIGNAL=KILL; SHIFT=1 ;;
    --delete) DELETE=1; SHIFT=1 ;;
    --force) FORCE=1; SHIFT=1 ;;
    --direct) DIRECT=1; SHIFT=1 ;;
    *) return 1 ;;
  esac
}

parse_args "$@"
require_target
[[ $TIMEOUT =~ ^[0-9]+$ ]] || die "--timeout expects whole seconds, got '$TIMEOUT'"
((!FORCE || DELETE)) || die "--force only applies to --delete"

# Exits 1 on a worker where the trainer is still running after TIMEOUT seconds.
remote="w=$WORKER_ID; pattern=\"$TRAIN_PATTERN\""
remote+="; pids=\$(pgrep -f \"\$pattern\" | tr \"\\n\" \" \")"
remote+="; if [ -z \"\$pids\" ]; then echo \"[worker \$w] her_jax.train not running\"; exit 0; fi"
remote+="; echo \"[worker \$w] SIG$SIGNAL to her_jax.train (pid \$pids)\"; pkill -$SIGNAL -f \"\$pattern\""
if ((TIMEOUT > 0)); then
  remote+="; for _ in \$(seq $TIMEOUT); do pgrep -f \"\$pattern\" >/dev/null || { echo \"[worker \$w] stopped\"; exit 0; }; sleep 1; done"
  remote+="; echo \"[worker \$w] still running after $TIMEOUT s\" >&2; exit 1"
fi
if on_all_workers "$remote"; then
  stopped=1
else
  stopped=0
fi

if ((!DELETE)); then
  ((stopped)) || die "her_jax.train did not stop on every worker (see above); rerun, or pass --kill"
  exit 0
fi
if ((!stopped && !FORCE)); then
  die "not deleting $NAME: her_jax.train did not stop on every worker, or a worker could not be" \
    "reached (see above). Rerun, or add --force to delete anyway (an unfinished checkpoint is lost)"
fi
if ((DIRECT)); then
  run gcloud compute tpus tpu-vm delete "$NAME" --zone "$ZONE" --project "$PROJECT" --quiet --async
else
  run gcloud compute tpus queued-resources delete "$NAME" --zone "$ZONE" --project "$PROJECT" --force --quiet --async
fi
if ((!DRY_RUN)); then
  note "deletion of $NAME requested (it takes a few minutes)"
fi
