"""The one config tree every entry point parses: its root, :class:`JobConfig`, whose sections are the
science (:mod:`dsl.config.science`) and the work around it (:mod:`dsl.config.job_sections`).

Each key has one meaning in every job that reads it: ``train.steps`` is always optimizer steps,
``sampling.steps`` always the sampler's step budget T, ``search.budgets`` the search's list of T,
``service.storage`` the checkpoint root and ``search.study_db`` the Optuna database. A job reads a
subset of the tree (``dsl.cli.Job.uses``); its ``--help`` lists exactly that subset.

:class:`RunConfig` is the science part of a training run, the self-describing config a checkpoint
stores; it keeps its own type so old checkpoints load unchanged.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from dsl.config.fields import ConfigError, choice, flag, num, section, text
from dsl.config.job_sections import (
    EvalConfig,
    PrepareConfig,
    ReportConfig,
    ReproduceConfig,
    SearchConfig,
    ServiceConfig,
    TableConfig,
)
from dsl.config.science import (
    ChannelConfig,
    DataConfig,
    MDLMLossConfig,
    ModelConfig,
    SamplingConfig,
    TrainConfig,
)

# Help of the keys RunConfig and JobConfig share (one text per key).
NAME_HELP = ("run name: the MLflow run's name; a training run's stable name (re-using it resumes the run, "
             "and it becomes the storage prefix); '' = derived")
SEED_HELP = "seed of the job's randomness (training noise and init, per-sample sampling seeds, MC draws)"
OBJECTIVE_HELP = "training objective: dsl (Alg 1) | mdlm (MDLM SUBS) | ar"
INIT_HELP = ("weights training starts from: scratch | <checkpoint or run dir> | s3://... | "
             "hf:kuleshov-group/mdlm-owt | <MDLM Lightning .ckpt / .safetensors>")


@dataclass
class RunConfig:
    """A training run's science config: what every checkpoint stores as its resolved config."""

    name: str = text("", NAME_HELP)
    seed: int = num(0, 0, help=SEED_HELP)
    objective: Literal["dsl", "mdlm", "ar"] = choice("dsl", OBJECTIVE_HELP)
    init: str = text("scratch", INIT_HELP)
    out_dir: str = text("runs", "local root the run was written under when no storage URI was given")
    model: ModelConfig = section(ModelConfig)
    channel: ChannelConfig = section(ChannelConfig)
    mdlm: MDLMLossConfig = section(MDLMLossConfig)
    data: DataConfig = section(DataConfig)
    train: TrainConfig = section(TrainConfig)

    def validate(self) -> None:
        if self.objective == "ar" and self.model.arch != "ar":
            raise ConfigError("objective=ar needs model.arch=ar (objective dsl/mdlm need model.arch=dit)")
        if self.objective != "ar" and self.model.arch != "dit":
            raise ConfigError(f"objective={self.objective} needs model.arch=dit")


@dataclass
class JobConfig:
    """The root every entry point parses. A job reads the keys it declares; the rest keep their defaults."""

    name: str = text("", NAME_HELP)
    experiment: str = text("dsl", "MLflow experiment the job's runs are logged to")
    seed: int = num(0, 0, help=SEED_HELP)
    objective: Literal["dsl", "mdlm", "ar"] = choice("dsl", OBJECTIVE_HELP)
    init: str = text("scratch", INIT_HELP)
    checkpoint: str = text("", "what the job loads: oracle:hmm|cyclic|topics | <run dir> (its latest "
                               "complete checkpoint) | <checkpoint dir> | s3://... (evaluate calibration/"
                               "likelihood: label=spec,... compares several)")
    out: str = text("", "where the job writes: sample → the .jsonl (a toy: the .png); evaluate, search → a "
                        "directory; finetune → local root of runs when service.storage is ''; prepare_data → "
                        "the token store (a shared directory or s3://bucket/prefix)")
    progress: bool = flag(True, "tqdm progress bars on long work")
    model: ModelConfig = section(ModelConfig)
    channel: ChannelConfig = section(ChannelConfig)
    mdlm: MDLMLossConfig = section(MDLMLossConfig)
    data: DataConfig = section(DataConfig)
    train: TrainConfig = section(TrainConfig)
    sampling: SamplingConfig = section(SamplingConfig)
    eval: EvalConfig = section(EvalConfig)
    search: SearchConfig = section(SearchConfig)
    prepare: PrepareConfig = section(PrepareConfig)
    service: ServiceConfig = section(ServiceConfig)
    report: ReportConfig = section(ReportConfig)
    table: TableConfig = section(TableConfig)
    reproduce: ReproduceConfig = section(ReproduceConfig)


SCIENCE_SECTIONS = ("model", "channel", "mdlm", "data", "train")


def run_config_of(job: JobConfig) -> RunConfig:
    """The science part of ``job``: the :class:`RunConfig` a training run stores in its checkpoints."""
    import copy

    run = RunConfig(name=job.name, seed=job.seed, objective=job.objective, init=job.init,
                    out_dir=job.out or "runs")
    for name in SCIENCE_SECTIONS:
        setattr(run, name, copy.deepcopy(getattr(job, name)))
    return run


__all__ = ["RunConfig", "JobConfig", "run_config_of", "SCIENCE_SECTIONS"]
