# shellcheck shell=bash
# Sourced by the tpu_scripts: the common flags (--name --zone --project --dry-run --help), errors a
# user can act on, and `run`, which prints a command and runs it (or, with --dry-run, only prints it).
#
# A script that sources this defines `usage` (its help text) and may define `script_flag`, which
# handles the script's own flags: called with the remaining arguments, it sets SHIFT to the number
# it used and returns 0, or returns 1 when "$1" is not one of its flags. Written for bash >= 3.2
# (macOS) so the scripts run where gcloud runs.

set -euo pipefail

# shellcheck disable=SC2034  # read by the scripts that source this file
REPO_ROOT=$(cd -- "$(dirname -- "${BASH_SOURCE[0]}")/.." && pwd)
SCRIPT_NAME=$(basename -- "$0")
NAME=${HER_TPU_NAME:-}
ZONE=${HER_TPU_ZONE:-}
PROJECT=${HER_TPU_PROJECT:-}
DRY_RUN=0
TAKES_OVERRIDES=0  # a script that accepts `-- ARGS...` sets this to 1 before parse_args
OVERRIDES=()       # the arguments after `--`
SHIFT=0

# Matches the trainer's command line (`.../python -m her_jax.train ...`) but not the remote shell
# that runs pgrep/pkill, whose command line starts with the shell and also names the module.
# shellcheck disable=SC2034
TRAIN_PATTERN='^[^ ]*python[^ ]* -m her_jax[.]train'
# Each worker's number in the slice (0 is the one that logs metrics), from the TPU VM metadata;
# expanded on the worker, hence single quotes.
# shellcheck disable=SC2016,SC2034
WORKER_ID='$(curl -sf -m 5 -H Metadata-Flavor:Google http://metadata.google.internal/computeMetadata/v1/instance/attributes/agent-worker-number || hostname)'

die() {
  printf '%s: error: %s\n' "$SCRIPT_NAME" "$*" >&2
  exit 2
}

note() {
  printf '%s: %s\n' "$SCRIPT_NAME" "$*" >&2
}

common_usage() {
  cat <<'EOF'
Common flags:
  --name NAME        TPU (and queued resource) name     [env HER_TPU_NAME]
  --zone ZONE        e.g. us-east5-a                    [env HER_TPU_ZONE, else gcloud's compute/zone]
  --project PROJECT  Google Cloud project id            [env HER_TPU_PROJECT, else gcloud's core/project]
  --dry-run          print every command (pasteable, prefixed by '+ ') and run none of them
  -h, --help         this help
EOF
}

# Fails unless flag $1 is followed by a value ($2).
need_value() {
  if (($# < 2)) || [[ -z $2 || $2 == --* ]]; then
    die "$1 expects a value"
  fi
}

parse_args() {
  local arg
  while (($#)); do
    arg=$1
    if [[ $arg == --*=* ]]; then  # --flag=value is the same as --flag value
      shift
      set -- "${arg%%=*}" "${arg#*=}" "$@"
      arg=$1
    fi
    case $arg in
      --name) need_value "$@"; NAME=$2; shift 2 ;;
      --zone) need_value "$@"; ZONE=$2; shift 2 ;;
      --project) need_value "$@"; PROJECT=$2; shift 2 ;;
      --dry-run) DRY_RUN=1; shift ;;
      -h | --help) usage; exit 0 ;;
      --)
        shift
        ((TAKES_OVERRIDES)) || die "unexpected arguments after --: $* ($SCRIPT_NAME takes none)"
        # shellcheck disable=SC2034
        OVERRIDES=("$@")
        return 0
        ;;
      *)
        SHIFT=0
        if declare -F script_flag >/dev/null && script_flag "$@"; then
          shift "$SHIFT"
        elif [[ $arg == -* ]]; then
          die "unknown flag '$arg' (see $SCRIPT_NAME --help)"
        else
          die "unexpected argument '$arg' (see $SCRIPT_NAME --help)"
        fi
        ;;
    esac
  done
}

# A gcloud property, read only when not a dry run (a dry run calls no gcloud at all).
gcloud_default() {
  ((DRY_RUN)) && return 0
  command -v gcloud >/dev/null || return 0
  gcloud config get-value "$1" 2>/dev/null || true
}

# Fills ZONE and PROJECT from gcloud's config where flags and env left them empty, then checks
# that NAME, ZONE and PROJECT are all set.
require_target() {
  [[ -n $NAME ]] || die "no TPU name: pass --name NAME or set HER_TPU_NAME"
  [[ -n $ZONE ]] || ZONE=$(gcloud_default compute/zone)
  [[ -n $ZONE ]] || die "no zone: pass --zone ZONE (e.g. us-east5-a) or set HER_TPU_ZONE$(dry_hint)"
  [[ -n $PROJECT ]] || PROJECT=$(gcloud_default core/project)
  [[ -n $PROJECT ]] || die "no project: pass --project PROJECT or set HER_TPU_PROJECT$(dry_hint)"
  [[ $NAME =~ ^[a-z]([-a-z0-9]*[a-z0-9])?$ ]] ||
    die "--name expects lower-case letters, digits and '-' starting with a letter (a GCE name), got '$NAME'"
}

dry_hint() {
  if ((DRY_RUN)); then
    printf ' (a dry run does not read gcloud config)'
  else
    printf ' (or set a default: gcloud config set ...)'
  fi
}

# One word, quoted so that a shell reads it back unchanged; plain words stay as they are.
quote_word() {
  local q="'\\''"
  if [[ $1 =~ ^[-A-Za-z0-9_./:=@%+,]+$ ]]; then
    printf '%s' "$1"
  elif [[ $1 == *$'\n'* ]]; then
    printf '%q' "$1"
  else
    printf "'%s'" "${1//\'/$q}"
  fi
}

# A command as one pasteable line.
quote_command() {
  local word out=""
  for word in "$@"; do
    out+="${out:+ }$(quote_word "$word")"
  done
  printf '%s' "$out"
}

# Prints a command as '+ CMD'; runs it unless this is a dry run. The print goes to stdout in a dry
# run (it is the output) and to stderr otherwise (a trace beside the command's own output).
run() {
  if ((DRY_RUN)); then
    printf '+ %s\n' "$(quote_command "$@")"
    return 0
  fi
  printf '+ %s\n' "$(quote_command "$@")" >&2
  "$@"
}

# Runs a command on every worker of the slice at once (each worker's shell is bash).
on_all_workers() {
  run gcloud compute tpus tpu-vm ssh "$NAME" --zone "$ZONE" --project "$PROJECT" --worker=all --command "$1"
}
