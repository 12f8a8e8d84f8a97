#!/usr/bin/env bash
# Starts `python -m her_jax.train` on every worker of the slice at once, in the background, one log
# per worker. HER_DISTRIBUTED=1 makes the trainer start jax.distributed, which finds the other
# workers from the TPU VM's metadata.
# shellcheck source-path=SCRIPTDIR source=common.sh
source "$(dirname -- "${BASH_SOURCE[0]}")/common.sh"

usage() {
  cat <<'EOF'
Usage: tpu_scripts/launch.sh --name NAME --config CONFIG [--run RUN] [common flags] [-- key=value ...]

On every worker: cd ~/her_jax && nohup .venv/bin/python -m her_jax.train --config CONFIG key=value ...
appending to ~/her_jax/logs/RUN-worker-N.log (N: the worker's number; worker 0 logs the metrics).
Refuses to start on a worker where her_jax.train is already running (tpu_scripts/stop.sh).

  --config CONFIG   run config, relative to the repository root (as copied by setup.sh) or an
                    absolute path on the workers, e.g. configs/qwen3_32b_sft_v5p.yaml   (required)
  --run RUN         name of the log files (default: the config's file name without .yaml)
  -- key=value ...  trainer overrides, passed through unchanged, e.g.
                    -- output_dir=/mnt/gcs/runs/qwen3-32b-sft steps=2000

EOF
  common_usage
}

CONFIG=""
RUN=""
TAKES_OVERRIDES=1

script_flag() {
  case $1 in
    --config) need_value "$@"; CONFIG=$2; SHIFT=2 ;;
    --run) need_value "$@"; RUN=$2; SHIFT=2 ;;
    *) return 1 ;;
  esac
}

parse_args "$@"
require_target
[[ -n $CONFIG ]] || die "no run config: pass --config CONFIG (e.g. configs/qwen3_32b_sft_v5p.yaml)"
if [[ $CONFIG != /* ]]; then
  [[ -f $REPO_ROOT/$CONFIG ]] ||
    die "--config $CONFIG: no such file under $REPO_ROOT (a relative path names a file of the" \
      "repository; an absolute one, a file on the workers)"
  if ! git -C "$REPO_ROOT" cat-file -e "HEAD:$CONFIG" 2>/dev/null; then
    note "warning: $CONFIG is not committed, so setup.sh did not copy it to the workers"
  fi
fi
if [[ -z $RUN ]]; then
  RUN=$(basename -- "$CONFIG")
  RUN=${RUN%.yaml}
  RUN=${RUN%.yml}
fi
[[ $RUN =~ ^[A-Za-z0-9._-]+$ ]] || die "--run expects letters, digits, '.', '_' or '-' (it names log files), got '$RUN'"

train=".venv/bin/python -m her_jax.train --config $(printf '%q' "$CONFIG")"
for override in ${OVERRIDES[@]+"${OVERRIDES[@]}"}; do
  train+=" $(printf '%q' "$override")"
done
# nohup + setsid + no open terminal fds: the trainer outlives the ssh session. The log is appended
# to, so a resumed run keeps one log.
remote="set -e; cd ~/her_jax; mkdir -p logs; w=$WORKER_ID; log=logs/$RUN-worker-\$w.log"
remote+="; if pgrep -f \"$TRAIN_PATTERN\" >/dev/null; then echo \"[worker \$w] her_jax.train is already running; stop it first (tpu_scripts/stop.sh)\" >&2; exit 1; fi"
remote+="; HER_DISTRIBUTED=1 PYTHONUNBUFFERED=1 setsid nohup $train >>\"\$log\" 2>&1 </dev/null &"
remote+=" echo \"[worker \$w] started pid \$!, log ~/her_jax/\$log\""
on_all_workers "$remote"

if ((!DRY_RUN)); then
  note "follow worker 0 (it logs the metrics):"
  note "  $(quote_command gcloud compute tpus tpu-vm ssh "$NAME" --zone "$ZONE" --project "$PROJECT" --worker=0 \
    --command "tail -f ~/her_jax/logs/$RUN-worker-0.log")"
  note "all workers: tpu_scripts/status.sh --name $NAME --run $RUN; stop (checkpoints first): tpu_scripts/stop.sh --name $NAME"
fi
