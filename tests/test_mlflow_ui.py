"""The MLflow UI as a researcher first sees it: the experiment page shows the runs table (not MLflow 3's
GenAI traces overview) with runs named for what they are; checked in headless Chromium against a real
tracking server."""

from __future__ import annotations

import uuid

import mlflow
import pytest

from dsl.service import lineage
from dsl.service.tracking import experiment_id, experiment_url, job_run

pytestmark = pytest.mark.integration


def runs_view_shown(text: str) -> bool:
    """The rendered experiment page is the runs table: its title and the table's run count are there,
    and the GenAI overview's empty trace charts are not."""
    return (text.startswith("Runs - ") and "matching run" in text
            and "No data available for the selected time range" not in text)


def test_experiments_are_model_training_and_the_ui_opens_on_named_runs(mlflow_server, chromium):
    uri = mlflow_server.tracking_uri
    name = f"ui-{uuid.uuid4().hex[:8]}"
    names = ["sample oracle-hmm remdm-loop T=128", "evaluate MAUVE sample oracle-hmm remdm-loop T=128"]
    for run_name in names:
        with job_run("sample", {"sampling": {"steps": 128}}, tracking_uri=uri, experiment=name, run_name=run_name):
            pass
    client = mlflow.MlflowClient(uri)
    exp = client.get_experiment_by_name(name)
    assert exp.tags[lineage.EXPERIMENT_KIND_TAG] == lineage.EXPERIMENT_KIND

    text = chromium.text(experiment_url(uri, exp.experiment_id))
    assert runs_view_shown(text), text[:600]
    for run_name in names:
        assert run_name in text, (run_name, text[:600])


def test_an_existing_experiment_without_a_kind_gets_one_and_a_chosen_kind_is_kept(mlflow_server):
    client = mlflow.MlflowClient(mlflow_server.tracking_uri)
    bare, chosen = f"bare-{uuid.uuid4().hex[:8]}", f"genai-{uuid.uuid4().hex[:8]}"
    bare_id = client.create_experiment(bare)
    chosen_id = client.create_experiment(chosen, tags={lineage.EXPERIMENT_KIND_TAG: "genai_development"})
    assert experiment_id(client, bare) == bare_id and experiment_id(client, chosen) == chosen_id
    assert client.get_experiment(bare_id).tags[lineage.EXPERIMENT_KIND_TAG] == lineage.EXPERIMENT_KIND
    assert client.get_experiment(chosen_id).tags[lineage.EXPERIMENT_KIND_TAG] == "genai_development"
