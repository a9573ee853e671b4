"""logger=mlflow: a run per job under a run per sweep, through MlflowClient (no global active run: jobs of one
process take turns under hydra/launcher=gpu). Imports mlflow only when used (pip install -e '.[mlflow]')."""
from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Iterable

from normsweep import files

EXPERIMENT = "normsweep"
SWEEP_TAG = "normsweep.sweep"  # the sweep folder: how the jobs of one sweep find their parent run
STATUS_TAG = "normsweep.status"
STATUSES = {files.STATUS_COMPLETED: "FINISHED", files.STATUS_FAILED: "FAILED", files.STATUS_DIVERGED: "FAILED"}
ARTIFACTS = (files.CONFIG, files.SUMMARY, files.METRICS, files.MISCLASSIFIED)
SWEEP_ARTIFACTS = (files.RESULTS_MD, files.RESULTS_CSV, files.CURVES_PNG, files.BATCH_SIZE_PNG, files.FACTORS_PNG)


# the address schemes MLflow's tracking stores take (its REST client, file store and SQLAlchemy databases)
TRACKING_SCHEMES = ("http", "https", "file", "sqlite", "postgresql", "mysql", "mssql", "databricks")


def default_uri(folder: Path) -> str:
    """The local store: an SQLite file in the sweep folder (or the run folder of a single run)."""
    return f"sqlite:///{Path(folder).resolve() / 'mlflow.db'}"


def check_reachable(uri: str) -> None:
    """Raises ValueError (one line) when the address is not one MLflow stores runs at, or a tracking server does not
    answer; local stores are created on use."""
    scheme = uri.split("://", 1)[0].split("+", 1)[0] if "://" in uri else "file"  # postgresql+psycopg2:// too
    if scheme not in TRACKING_SCHEMES:
        raise ValueError(f"logger.tracking_uri={uri}: MLflow stores runs at http(s)://<server>, sqlite:///<file>, "
                         f"file:///<folder> or a database URL, not {scheme}://; or leave it null for a local store")
    if not uri.startswith(("http://", "https://")):
        return
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")  # fail in seconds, not after minutes of retries
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "10")
    from mlflow import MlflowClient

    try:
        MlflowClient(tracking_uri=uri).search_experiments(max_results=1)
    except Exception as e:  # any failure to reach or use the server
        problem = " ".join(str(e).split())[:200]
        raise ValueError(f"logger.tracking_uri={uri} is unreachable ({type(e).__name__}: {problem}); start the "
                         "server, fix the address, or leave it null for a local store") from None


def _client_and_experiment(uri: str, sweep_dir: Path):
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=uri)
    experiment = client.get_experiment_by_name(EXPERIMENT)
    if experiment is not None:
        return client, experiment.experiment_id
    # a local store keeps its artifacts beside it, not in ./mlruns of whatever folder the job ran from
    location = (sweep_dir / "mlartifacts").as_uri() if uri.startswith("sqlite:") else None
    return client, client.create_experiment(EXPERIMENT, artifact_location=location)


class JobTracker:
    """One job's MLflow run: created at the job's first start, continued when the job resumes."""

    def __init__(self, uri: str, job_dir: Path, sweep_dir: Path, run_name: str, params: dict, tags: dict):
        self.job_dir = job_dir
        # one process at a time creates the store, the experiment and the sweep's parent run
        lock = files.FolderLock(sweep_dir, files.MLFLOW_LOCK)
        lock.acquire(wait=True)
        try:
            self.client, experiment = _client_and_experiment(uri, sweep_dir)
            parent = self._parent_run(experiment, sweep_dir)
        finally:
            lock.release()
        self.run_id = self._previous_run(uri)
        if self.run_id is None:
            run = self.client.create_run(experiment, run_name=run_name,
                                         tags={**tags, "mlflow.parentRunId": parent, SWEEP_TAG: str(sweep_dir)})
            self.run_id = run.info.run_id
            self.client.log_batch(self.run_id, params=_params(params))
            files.write_json(job_dir / files.MLFLOW_RUN, {"tracking_uri": uri, "run_id": self.run_id})
        else:
            self.client.update_run(self.run_id, status="RUNNING")
        self.logged_epochs = {m.step for m in self.client.get_metric_history(self.run_id, "test_acc")}

    def _parent_run(self, experiment: str, sweep_dir: Path) -> str:
        found = self.client.search_runs([experiment], filter_string=f"tags.`{SWEEP_TAG}` = '{sweep_dir}' and "
                                        "tags.`normsweep.kind` = 'sweep'", max_results=1)
        if found:
            return found[0].info.run_id
        return self.client.create_run(experiment, run_name=sweep_dir.name,
                                      tags={SWEEP_TAG: str(sweep_dir), "normsweep.kind": "sweep"}).info.run_id

    def _previous_run(self, uri: str) -> str | None:
        try:
            previous = json.loads((self.job_dir / files.MLFLOW_RUN).read_text())
        except (OSError, ValueError):
            return None
        return previous.get("run_id") if previous.get("tracking_uri") == uri else None

    def log_epoch(self, row: dict) -> None:
        from mlflow.entities import Metric

        stamp = int(time.time() * 1000)
        self.client.log_batch(self.run_id, metrics=[Metric(key, float(value), stamp, row["epoch"])
                                                    for key, value in row.items() if key not in files.ROW_FACTS])
        self.logged_epochs.add(row["epoch"])

    def finish(self, status: str, history: Iterable[dict]) -> None:
        """Epochs a kill kept out of MLflow (once the job completed: a failed job's last row may be retrained), the
        job's files as artifacts, its status; then the run ends."""
        if status == files.STATUS_COMPLETED:
            for row in history:
                if row["epoch"] not in self.logged_epochs:
                    self.log_epoch(row)
        for name in ARTIFACTS:
            if (self.job_dir / name).is_file():
                self.client.log_artifact(self.run_id, str(self.job_dir / name))
        self.client.set_tag(self.run_id, STATUS_TAG, status)
        self.client.set_terminated(self.run_id, status=STATUSES.get(status, "FAILED"))


def _params(params: dict):
    from mlflow.entities import Param

    return [Param(key, str(value)) for key, value in params.items()]


def log_collected(out_dir: Path, job_dirs: Iterable[Path]) -> None:
    """After the collector: each job's misclassified grid to its run, the table and curves to the sweep's run."""
    parents = set()
    for job_dir in job_dirs:
        try:
            record = json.loads((job_dir / files.MLFLOW_RUN).read_text())
        except (OSError, ValueError):
            continue
        from mlflow import MlflowClient

        client = MlflowClient(tracking_uri=record["tracking_uri"])
        run = client.get_run(record["run_id"])
        if (job_dir / files.MISCLASSIFIED_PNG).is_file():
            client.log_artifact(run.info.run_id, str(job_dir / files.MISCLASSIFIED_PNG))
        parent = run.data.tags.get("mlflow.parentRunId")
        if parent and (record["tracking_uri"], parent) not in parents:
            parents.add((record["tracking_uri"], parent))
            for name in SWEEP_ARTIFACTS:
                if (out_dir / name).is_file():
                    client.log_artifact(parent, str(out_dir / name))
            client.set_terminated(parent, status="FINISHED")  # a rerun of the sweep reopens nothing: jobs log
