"""The MLflow UI as a researcher first sees it: the experiment page shows the runs table (not MLflow 3's
GenAI traces overview) with runs named for what they are; checked in headless Chromium against a real
tracking server."""

from __future__ import annotations

import json
import uuid

import mlflow
import pytest
import torch

from dsl.cli import load_job, main
from dsl.config import DataConfig
from dsl.service import lineage
from dsl.service.tracking import experiment_id, experiment_url
from dsl.sources import build_source

pytestmark = pytest.mark.integration


def runs_view_shown(text: str) -> bool:
    """The rendered experiment page is the runs table: its title and the table's run count are there,
    and the GenAI overview's empty trace charts are not."""
    return (text.startswith("Runs - ") and "matching run" in text
            and "No data available for the selected time range" not in text)


def test_experiments_are_model_training_and_the_ui_opens_on_named_runs(mlflow_server, chromium, tmp_path,
                                                                      monkeypatch, capsys):
    uri = mlflow_server.tracking_uri
    name = f"ui-{uuid.uuid4().hex[:8]}"
    monkeypatch.chdir(tmp_path)
    source = build_source("hmm", DataConfig(), 16)
    with open("reference.jsonl", "w") as fh:
        for row in source.sample(8, torch.Generator().manual_seed(1)):
            fh.write(json.dumps({"text": source.decode(row)}) + "\n")
    common = [f"experiment={name}", f"service.tracking_uri={uri}"]
    assert main(load_job("jobs/sample.py"), ["checkpoint=oracle:hmm", "sampler=remdm-loop", "sampling.steps=4",
                                             "sampling.num_samples=8", "sampling.length=16", "out=s.jsonl",
                                             *common]) == 0
    assert main(load_job("jobs/evaluate.py"), ["eval.samples=s.jsonl", "reference=reference.jsonl",
                                               "eval.feature_cache=", "eval.mauve_seeds=25", *common]) == 0
    names = ["sample oracle-hmm remdm-loop T=4", "evaluate MAUVE sample oracle-hmm remdm-loop T=4"]
    printed = capsys.readouterr().err   # the jobs print where to look
    client = mlflow.MlflowClient(uri)
    exp = client.get_experiment_by_name(name)
    assert exp.tags[lineage.EXPERIMENT_KIND_TAG] == lineage.EXPERIMENT_KIND

    page = experiment_url(uri, exp.experiment_id)
    assert f"open {page} in a browser" in printed
    text = chromium.text(page)
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
