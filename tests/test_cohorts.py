"""Cohorts on real schedulers: --shard auto from each scheduler's environment, a run report per shard,
`uniseg report` merging them, a single-node Slurm cluster (Debian's slurm-wlm and munge, started here and
stopped by PID) running a job array over real cases, a task cancelled mid-run and the array resubmitted,
and torchrun with two CPU ranks."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from conftest import CT
from uniseg_cli.errors import UsageError
from uniseg_cli.inference.schedulers import parse_shard

SLURM = all(shutil.which(b) for b in ("slurmctld", "slurmd", "sbatch", "squeue", "scancel", "munged"))


# ------------------------------------------------------------------------------------------ --shard auto
def test_shard_auto_reads_each_schedulers_environment():
    slurm = {"SLURM_ARRAY_TASK_ID": "5", "SLURM_ARRAY_TASK_MIN": "3", "SLURM_ARRAY_TASK_MAX": "7",
             "SLURM_ARRAY_TASK_STEP": "2", "SLURM_ARRAY_TASK_COUNT": "3"}            # sbatch --array=3-7:2
    assert parse_shard("auto", slurm).spec == "1/3"
    assert parse_shard("auto", {**slurm, "SLURM_ARRAY_TASK_ID": "7"}).spec == "2/3"
    assert parse_shard("auto", {"JOB_COMPLETION_INDEX": "4", "UNISEG_SHARD_COUNT": "8"}).spec == "4/8"
    assert parse_shard("auto/8", {"JOB_COMPLETION_INDEX": "4"}).spec == "4/8"
    shard = parse_shard("auto", {"RANK": "1", "WORLD_SIZE": "4", "LOCAL_RANK": "1"})
    assert (shard.spec, shard.local_rank, shard.name) == ("1/4", 1, "shard-2-of-4")
    assert parse_shard("2/5", {}).spec == "2/5"
    with pytest.raises(UsageError, match=r"--shard auto: no scheduler found \(looked for SLURM_ARRAY_TASK_ID, "
                                         r"SLURM_ARRAY_TASK_MIN, JOB_COMPLETION_INDEX, UNISEG_SHARD_COUNT, RANK, "
                                         r"WORLD_SIZE\); give --shard I/N"):
        parse_shard("auto", {})
    with pytest.raises(UsageError, match="needs the number of completions"):
        parse_shard("auto", {"JOB_COMPLETION_INDEX": "0"})
    with pytest.raises(UsageError, match="arrays given as lists"):
        parse_shard("auto", {**slurm, "SLURM_ARRAY_TASK_ID": "4"})
    with pytest.raises(UsageError, match="expected I/N with 0 <= I < N"):
        parse_shard("3/3", {})


def test_no_scheduler_is_a_usage_error(run_cli, coarse_model_dir, tmp_path, monkeypatch):
    for name in ("SLURM_ARRAY_TASK_ID", "JOB_COMPLETION_INDEX", "RANK", "WORLD_SIZE"):
        monkeypatch.delenv(name, raising=False)
    code, _, err = run_cli("predict", CT, "-t", "kidney", "-m", coarse_model_dir, "-o", tmp_path / "o", "--shard", "auto")
    assert code == 2 and "Error: --shard auto: no scheduler found" in err


def _cases(folder: Path, count: int) -> Path:
    """``count`` real cases: overlapping axial slabs of the real CT, each with its own geometry."""
    folder.mkdir(parents=True, exist_ok=True)
    ct = nib.load(CT)
    values = np.asarray(ct.dataobj).astype(np.int16)
    for i in range(count):
        low = 8 * i
        affine = ct.affine.copy()
        affine[:3, 3] = ct.affine[:3, :3] @ [0, 0, low] + ct.affine[:3, 3]
        nib.save(nib.Nifti1Image(values[:, :, low:low + 64], affine), folder / f"case{i}.nii.gz")
    return folder


def test_a_run_report_per_shard_merged_by_uniseg_report(run_cli, coarse_model_dir, tmp_path, monkeypatch):
    scans = _cases(tmp_path / "scans", 4)
    nib.save(nib.Nifti1Image(np.zeros((40, 40, 40), np.int16), np.eye(4)), scans / "case9.nii.gz")  # refused
    out = tmp_path / "out"
    for index in range(2):
        monkeypatch.setenv("JOB_COMPLETION_INDEX", str(index))
        monkeypatch.setenv("UNISEG_SHARD_COUNT", "2")
        run_cli("predict", scans, "-t", "kidney", "-m", coarse_model_dir, "-o", out, "--shard", "auto", "--no-tta", "-q")
    report = json.loads((out / "uniseg-run_shard-1-of-2.json").read_text())
    assert report["shard"] == {"index": 0, "count": 2, "source": "Kubernetes indexed job, completion index 0 of 2"}
    from uniseg_cli.inference.predictor import Segmenter
    assert report["precision"] == Segmenter(coarse_model_dir, device="cpu").window.precision_label   # as chosen here
    assert report["model"]["sha256"] and report["device"] == "cpu"
    assert report["settings"]["tta"] is False and report["finished"]
    assert [c["case"] for c in report["cases"]] == ["case0", "case2", "case9"]
    assert report["cases"][2]["outcome"] == "failed" and "a constant image" in report["cases"][2]["error"]
    assert all(c["peak_rss_mb"] > 0 for c in report["cases"])
    code, stdout, err = run_cli("report", out, "--summary", tmp_path / "summary.json", "--failed", tmp_path / "failed.txt")
    assert code == 0, err
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert (summary["cases"], summary["written"], summary["failed"], len(summary["shards"])) == (5, 4, 1, 2)
    assert (tmp_path / "failed.txt").read_text() == f"{scans / 'case9.nii.gz'}\n"
    # the failed list is what predict - reads back: the one case is redone (and refused again, exit 1)
    monkeypatch.delenv("JOB_COMPLETION_INDEX")
    monkeypatch.setattr(sys, "stdin", open(tmp_path / "failed.txt"))
    code, stdout, err = run_cli("predict", "-", "-t", "kidney", "-m", coarse_model_dir, "-o", out, "--json", "-q")
    assert code == 1 and json.loads(stdout)["case"] == "case9"


# ------------------------------------------------------------------------------------------ Slurm
class SlurmCluster:
    """munged, slurmctld and slurmd for this machine alone, in a temporary folder, stopped by PID."""

    def __init__(self, root: Path) -> None:
        self.root = root
        root.chmod(0o700)
        host = socket.gethostname()
        (root / "state").mkdir()
        (root / "spool").mkdir()
        key = root / "munge.key"
        key.write_bytes(os.urandom(1024))
        key.chmod(0o400)
        self.conf = root / "slurm.conf"
        ports = _free_ports(2)
        self.conf.write_text("\n".join([
            "ClusterName=unisegtest", f"SlurmctldHost={host}", "SlurmUser=root", "SlurmdUser=root",
            "AuthType=auth/munge", f"AuthInfo=socket={root}/munge.sock", "CredType=cred/munge",
            f"StateSaveLocation={root}/state", f"SlurmdSpoolDir={root}/spool",
            f"SlurmctldPidFile={root}/slurmctld.pid", f"SlurmdPidFile={root}/slurmd.pid",
            f"SlurmctldPort={ports[0]}", f"SlurmdPort={ports[1]}",
            "ProctrackType=proctrack/linuxproc", "TaskPlugin=task/none", "JobAcctGatherType=jobacct_gather/none",
            "AccountingStorageType=accounting_storage/none", "SchedulerType=sched/backfill",
            "SelectType=select/cons_tres", "SelectTypeParameters=CR_Core", "ReturnToService=2", "MpiDefault=none",
            f"SlurmctldLogFile={root}/slurmctld.log", f"SlurmdLogFile={root}/slurmd.log",
            f"NodeName={host} CPUs={os.cpu_count()} State=UNKNOWN",
            f"PartitionName=test Nodes={host} Default=YES MaxTime=INFINITE State=UP", ""]))
        self.env = {**os.environ, "SLURM_CONF": str(self.conf)}
        self.pids: list[int] = []

    def start(self) -> None:
        subprocess.run(["munged", "--force", f"--socket={self.root}/munge.sock", f"--key-file={self.root}/munge.key",
                        f"--log-file={self.root}/munged.log", f"--pid-file={self.root}/munged.pid",
                        f"--seed-file={self.root}/munged.seed"], check=True, env=self.env)
        self.pids.append(int((self.root / "munged.pid").read_text()))
        for daemon in ("slurmctld", "slurmd"):
            subprocess.run([daemon, "-f", str(self.conf)], check=True, env=self.env)
            self.pids.append(_wait_for_file(self.root / f"{daemon}.pid"))
        deadline = time.time() + 60
        while time.time() < deadline:
            if "idle" in self.run("sinfo", "-h", "-o", "%T"):
                return
            time.sleep(0.3)
        raise AssertionError("the Slurm node did not become idle: " + (self.root / "slurmctld.log").read_text()[-2000:])

    def run(self, *command: str) -> str:
        return subprocess.run(command, capture_output=True, text=True, env=self.env).stdout

    def stop(self) -> None:
        self.run("scancel", "--full", "--user=root")
        for pid in reversed(self.pids):
            try:
                os.kill(pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
        deadline = time.time() + 20
        for pid in self.pids:
            while time.time() < deadline and _alive(pid):
                time.sleep(0.1)

    def wait(self, job: str, timeout: float = 300) -> None:
        deadline = time.time() + timeout
        while time.time() < deadline:
            if not self.run("squeue", "-h", "-j", job).strip():
                return
            time.sleep(0.3)
        raise AssertionError(f"job {job} still queued: {self.run('squeue')}")


def _free_ports(count: int) -> list[int]:
    sockets = [socket.socket() for _ in range(count)]
    for s in sockets:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in sockets]
    for s in sockets:
        s.close()
    return ports


def _wait_for_file(path: Path, timeout: float = 20) -> int:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if path.exists() and path.read_text().strip():
            return int(path.read_text())
        time.sleep(0.05)
    raise AssertionError(f"{path} was not written")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


@pytest.fixture(scope="module")
def slurm(tmp_path_factory):
    if not SLURM:
        pytest.skip("Debian's slurm-wlm and munge are not installed (.ci/run installs them)")
    cluster = SlurmCluster(tmp_path_factory.mktemp("slurm"))
    try:
        cluster.start()
        yield cluster
    finally:
        cluster.stop()


def _submit(slurm: SlurmCluster, scans: Path, out: Path, model: Path, *extra: str) -> str:
    command = " ".join([sys.executable, "-m", "uniseg_cli", "predict", str(scans), "-t", "kidney", "-m", str(model),
                        "-o", str(out), "--shard", "auto", "--skip-existing", "-q", "--json", *(extra or ("--no-tta",))])
    text = slurm.run("sbatch", "--parsable", "--array=0-2", "--cpus-per-task=1",
                     f"--output={out.parent}/%x_%A_%a.log", f"--wrap={command}")
    assert text.strip(), "sbatch printed no job id"
    return text.strip().split(";")[0]


def test_a_slurm_job_array_writes_every_case_once_and_resumes_a_cancelled_task(slurm, coarse_model_dir, tmp_path):
    scans = _cases(tmp_path / "scans", 6)
    out = tmp_path / "out"
    job = _submit(slurm, scans, out, coarse_model_dir)
    slurm.wait(job)
    records = sorted(p.name for p in out.glob("case*_kidney.json"))
    assert records == [f"case{i}_kidney.json" for i in range(6)]
    reports = [json.loads((out / f"uniseg-run_shard-{i}-of-3.json").read_text()) for i in (1, 2, 3)]
    cases = [c["case"] for r in reports for c in r["cases"]]
    assert sorted(cases) == [f"case{i}" for i in range(6)]                      # every case once, none twice
    assert all(r["shard"]["source"].startswith("Slurm array task") and r["finished"] for r in reports)
    summary_path = tmp_path / "summary.json"
    subprocess.run([sys.executable, "-m", "uniseg_cli", "report", str(out), "--summary", str(summary_path)], check=True)
    summary = json.loads(summary_path.read_text())
    assert (summary["cases"], summary["written"], summary["failed"], len(summary["shards"])) == (6, 6, 0, 3)

    # tasks cancelled mid-run (made slow: many tiles, 8 flips each), then the array resubmitted with --skip-existing
    second = tmp_path / "second"
    job = _submit(slurm, scans, second, coarse_model_dir, "--step", "0.05", "--tta")
    path = second / "uniseg-run_shard-2-of-3.json"
    deadline = time.time() + 240
    while time.time() < deadline and not (path.exists() and "case1" in path.read_text()):
        time.sleep(0.05)   # until task 1 has finished its first case (case1; case4 is its second)
    print(slurm.run("squeue", "-j", job))
    slurm.run("scancel", job)                                                     # every task of the array
    slurm.wait(job)
    killed = {}
    for i in (1, 2, 3):
        report = second / f"uniseg-run_shard-{i}-of-3.json"
        data = json.loads(report.read_text()) if report.exists() else {"cases": [], "finished": None}
        assert data["finished"] is None                                           # killed: the report says so
        killed.update({c["case"]: c["outcome"] for c in data["cases"]})
    assert killed.get("case1") == "written" and "case4" not in killed
    job = _submit(slurm, scans, second, coarse_model_dir)
    slurm.wait(job)
    outcomes = {c["case"]: c["outcome"] for i in (1, 2, 3)
                for c in json.loads((second / f"uniseg-run_shard-{i}-of-3.json").read_text())["cases"]}
    assert outcomes == {f"case{i}": "skipped" if f"case{i}" in killed else "written" for i in range(6)}
    assert sorted(p.name for p in second.glob("case*_kidney.json")) == records


def test_torchrun_with_two_cpu_ranks_shares_the_cases(coarse_model_dir, tmp_path):
    scans = _cases(tmp_path / "scans", 4)
    out = tmp_path / "out"
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
                           str(_free_ports(1)[0]), "-m", "uniseg_cli", "predict", str(scans), "-t", "kidney", "-m",
                           str(coarse_model_dir), "-o", str(out), "--shard", "auto", "--no-tta", "-q"],
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    reports = [json.loads((out / f"uniseg-run_shard-{i}-of-2.json").read_text()) for i in (1, 2)]
    assert [[c["case"] for c in r["cases"]] for r in reports] == [["case0", "case2"], ["case1", "case3"]]
    assert all(r["shard"]["source"].startswith("torchrun rank") for r in reports)
    assert sorted(p.name for p in out.glob("case*_kidney.nii.gz")) == [f"case{i}_kidney.nii.gz" for i in range(4)]
