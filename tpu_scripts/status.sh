#!/usr/bin/env bash
# Shows the state of the slice and, on every worker, whether the trainer runs and its log's tail.
# shellcheck source-path=SCRIPTDIR source=common.sh
source "$(dirname -- "${BASH_SOURCE[0]}")/common.sh"

usage() {
  cat <<'EOF'
Usage: tpu_scripts/status.sh --name NAME [--run RUN] [--lines N] [--direct] [common flags]

Describes the queued resource (unless --direct) and the TPU VM, then on every worker prints whether
her_jax.train is running and the last lines of its newest log in ~/her_jax/logs, each line
prefixed by [worker N].

  --run RUN     show RUN's logs (the name launch.sh used); default: each worker's newest log
  --lines N     lines of log per worker (default 20)
  --direct      the TPU was created with create.sh --direct (there is no queued resource)

EOF
  common_usage
}

RUN=""
LINES=20
DIRECT=0

script_flag() {
  case $1 in
    --run) need_value "$@"; RUN=$2; SHIFT=2 ;;
    --lines) need_value "$@"; LINES=$2; SHIFT=2 ;;
    --direct) DIRECT=1; SHIFT=1 ;;
    *) return 1 ;;
  esac
}

parse_args "$@"
require_target
[[ $LINES =~ ^[0-9]+$ ]] || die "--lines expects a number of lines, got '$LINES'"
[[ -z $RUN || $RUN =~ ^[A-Za-z0-9._-]+$ ]] || die "--run expects the run name launch.sh used, got '$RUN'"

if ((!DIRECT)); then
  describe=(gcloud compute tpus queued-resources describe "$NAME" --zone "$ZONE" --project "$PROJECT"
    --format 'value(state.state)')
  if ((DRY_RUN)); then
    run "${describe[@]}"
  else
    state=$(run "${describe[@]}") ||
      die "could not describe queued resource $NAME in $ZONE / $PROJECT (made with create.sh --direct? then pass --direct)"
    echo "queued resource $NAME: $state"
    if [[ $state != ACTIVE ]]; then
      note "the slice is not up (ACTIVE) yet; nothing to show on the workers"
      exit 0
    fi
  fi
fi
run gcloud compute tpus tpu-vm describe "$NAME" --zone "$ZONE" --project "$PROJECT" \
  --format 'table(name.basename():label=NODE,acceleratorType:label=TYPE,state,health,runtimeVersion)'

# Workers answer in parallel: every line carries its worker's number.
remote="w=$WORKER_ID; say() { printf \"[worker %s] %s\\n\" \"\$w\" \"\$*\"; }"
remote+="; cd ~/her_jax 2>/dev/null || { say \"no ~/her_jax: run tpu_scripts/setup.sh\"; exit 0; }"
remote+="; pids=\$(pgrep -f \"$TRAIN_PATTERN\" | tr \"\\n\" \" \")"
remote+="; if [ -n \"\$pids\" ]; then say \"her_jax.train running (pid \$pids)\"; else say \"her_jax.train not running\"; fi"
remote+="; log=\$(ls -t logs/${RUN:-*}-worker-*.log 2>/dev/null | head -n 1)"
remote+="; if [ -z \"\$log\" ]; then say \"no log in ~/her_jax/logs\"; exit 0; fi"
remote+="; say \"~/her_jax/\$log, last $LINES lines:\"; tail -n $LINES \"\$log\" | sed \"s/^/[worker \$w]   /\""
on_all_workers "$remote"
