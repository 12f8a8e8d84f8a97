#!/usr/bin/env bash
# Creates a TPU slice: a queued resource by default (waits in line for capacity), or a TPU VM
# directly with --direct (fails at once when there is no capacity).
# shellcheck source-path=SCRIPTDIR source=common.sh
source "$(dirname -- "${BASH_SOURCE[0]}")/common.sh"

usage() {
  cat <<'EOF'
Usage: tpu_scripts/create.sh --name NAME --accelerator-type TYPE [options]

Creates a TPU slice named NAME (with a queued resource, the queued resource and its node share
the name). The next step is tpu_scripts/setup.sh.

  --accelerator-type TYPE  v5p-32, v5p-64, v5litepod-16, v6e-16, v4-32, ...   (required)
  --runtime-version V      TPU VM image; default per generation: v5p v2-alpha-tpuv5,
                           v5e (v5litepod) v2-alpha-tpuv5-lite, v6e v2-alpha-tpuv6e,
                           v4 tpu-ubuntu2204-base
  --spot                   spot capacity (cheaper, can be preempted)
  --reserved               your project's reserved capacity
  --direct                 gcloud compute tpus tpu-vm create instead of a queued resource
  --wait                   poll every 30 s until the slice is ready (ACTIVE / READY)

EOF
  common_usage
}

ACCELERATOR_TYPE=""
RUNTIME_VERSION=""
CAPACITY=""
DIRECT=0
WAIT=0
POLL_SECONDS=30

script_flag() {
  case $1 in
    --accelerator-type) need_value "$@"; ACCELERATOR_TYPE=$2; SHIFT=2 ;;
    --runtime-version) need_value "$@"; RUNTIME_VERSION=$2; SHIFT=2 ;;
    --spot | --reserved)
      [[ -z $CAPACITY || $CAPACITY == "$1" ]] || die "--spot and --reserved exclude each other"
      CAPACITY=$1; SHIFT=1 ;;
    --direct) DIRECT=1; SHIFT=1 ;;
    --wait) WAIT=1; SHIFT=1 ;;
    *) return 1 ;;
  esac
}

default_runtime_version() {
  case $1 in
    v5p-*) echo v2-alpha-tpuv5 ;;
    v5litepod-* | v5e-*) echo v2-alpha-tpuv5-lite ;;
    v6e-*) echo v2-alpha-tpuv6e ;;
    v4-*) echo tpu-ubuntu2204-base ;;
    *) die "no default runtime version for accelerator type '$1'; pass --runtime-version" ;;
  esac
}

# Polls a describe command (the remaining arguments) until it prints state $1; a state among $2
# (space-separated) is an error.
wait_for_state() {
  local want=$1 bad=$2 state="" previous=""
  shift 2
  run "$@"
  if ((DRY_RUN)); then
    printf '# then again every %s s until it prints %s\n' "$POLL_SECONDS" "$want"
    return 0
  fi
  note "waiting for $NAME to be $want, polling every $POLL_SECONDS s (Ctrl-C stops the wait, not the request)"
  while true; do
    state=$("$@") || state="(describe failed)"
    if [[ $state != "$previous" ]]; then
      note "$(date +%H:%M:%S) $NAME: ${state:-(no state yet)}"
      previous=$state
    fi
    [[ $state == "$want" ]] && return 0
    [[ -n $state && " $bad " == *" $state "* ]] && die "$NAME is $state; see: $(quote_command "$@")"
    sleep "$POLL_SECONDS"
  done
}

parse_args "$@"
require_target
[[ -n $ACCELERATOR_TYPE ]] || die "no accelerator type: pass --accelerator-type TYPE (e.g. v5p-32)"
[[ $ACCELERATOR_TYPE =~ ^v[0-9][a-z]*-[0-9]+$ ]] ||
  die "--accelerator-type expects GENERATION-SIZE such as v5p-32 or v5litepod-16, got '$ACCELERATOR_TYPE'"
[[ -n $RUNTIME_VERSION ]] || RUNTIME_VERSION=$(default_runtime_version "$ACCELERATOR_TYPE")

# The full cloud-platform scope leaves access to IAM, so the workers can reach a GCS bucket.
common=(--zone "$ZONE" --project "$PROJECT" --accelerator-type "$ACCELERATOR_TYPE"
  --scopes https://www.googleapis.com/auth/cloud-platform)
if [[ -n $CAPACITY ]]; then
  common+=("$CAPACITY")
fi

if ((DIRECT)); then
  run gcloud compute tpus tpu-vm create "$NAME" "${common[@]}" --version "$RUNTIME_VERSION"
  describe=(gcloud compute tpus tpu-vm describe "$NAME" --zone "$ZONE" --project "$PROJECT" --format 'value(state)')
  ready=READY failed="PREEMPTED TERMINATED"
else
  run gcloud compute tpus queued-resources create "$NAME" --node-id "$NAME" "${common[@]}" \
    --runtime-version "$RUNTIME_VERSION"
  describe=(gcloud compute tpus queued-resources describe "$NAME" --zone "$ZONE" --project "$PROJECT"
    --format 'value(state.state)')
  ready=ACTIVE failed="FAILED SUSPENDED"
fi

if ((WAIT)); then
  wait_for_state "$ready" "$failed" "${describe[@]}"
elif ((!DRY_RUN)); then
  note "requested; tpu_scripts/status.sh shows when it is $ready"
fi
if ((!DRY_RUN)); then
  note "next: tpu_scripts/setup.sh --name $NAME --zone $ZONE --project $PROJECT [--bucket BUCKET]"
fi
