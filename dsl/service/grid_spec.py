"""The Table 1 grid's layout (Sec 6.2): a :class:`GridSpec` of rows and step budgets, named
(``dsl/config/presets/grid/<name>.toml``) or a TOML file; the models its rows name (``table.models``); the
settings a named layout implies; the cells (row × T) a grid computes. Checked before any work
(:func:`check_grid`); the driver is :func:`dsl.service.grid.run_grid`."""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, replace
from typing import Any

from dsl.config import ConfigError, JobConfig, SamplingConfig
from dsl.errors import UserError, one_line

DATA_ROW = "data"             # a row of exact samples of the judge's source (Table 1's ceiling)
_SPEC_KEYS = ("description", "steps", "steps_per_length", "settings", "rows")
_ROW_KEYS = ("label", "model", "sampler", "eta_cap_table", "steps")


# ----------------------------------------------------------------------------------------------
# The spec: rows and columns.


@dataclass(frozen=True)
class GridRow:
    """A Table 1 row: ``model`` (a role of ``table.models``, a model spec, or ``data``) decoded with
    ``sampler``; ``eta_cap_table`` replaces ``sampling.eta_cap_table`` for this row; ``steps`` replaces
    the grid's budgets (a data row has one cell, at T = L)."""

    label: str
    model: str
    sampler: str = ""
    eta_cap_table: str = ""
    steps: tuple[int, ...] = ()


@dataclass(frozen=True)
class GridSpec:
    """Rows, columns (``steps``, or ``steps_per_length``: T = max(1, round(f·L))) and the ``settings``
    (``key=value`` words of the config tree) a named layout implies."""

    name: str
    rows: tuple[GridRow, ...]
    steps: tuple[int, ...] = ()
    steps_per_length: tuple[float, ...] = ()
    settings: tuple[str, ...] = ()
    description: str = ""

    def budgets(self, length: int, override: Sequence[int] = ()) -> list[int]:
        if override:
            return list(override)
        if self.steps:
            return list(self.steps)
        if self.steps_per_length:
            return sorted({max(1, round(f * length)) for f in self.steps_per_length})
        raise ConfigError(f"grid spec {self.name}: no step budgets; give table.steps=T,T,...")

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, "rows": [asdict(r) for r in self.rows], "steps": list(self.steps),
                "steps_per_length": list(self.steps_per_length), "settings": list(self.settings)}


def named_specs() -> dict[str, str]:
    """``{name: description}`` of the grid specs in ``dsl/config/presets/grid/``."""
    from dsl.config.presets import descriptions

    return dict(descriptions("grid"))


def load_spec(ref: str) -> GridSpec:
    """The :class:`GridSpec` ``ref`` names: a named spec or a TOML file (one line naming what is wrong)."""
    from dsl.config.presets import preset_files, read_preset, table_overrides

    named = preset_files("grid")
    if ref in named:
        data, where = read_preset(named[ref]), f"table.spec={ref}"
    elif ref.endswith(".toml") or os.path.sep in ref:
        if not os.path.isfile(ref):
            raise UserError(f"table.spec={ref}: no such file; give a named spec ({', '.join(named)}) or a TOML file")
        from dsl.config.presets import tomllib

        try:
            with open(ref, "rb") as fh:
                data = tomllib.load(fh)
        except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
            raise ConfigError(f"table.spec={ref}: {one_line(exc)}") from None
        where = f"table.spec={ref}"
    else:
        raise ConfigError(f"table.spec={ref!r}: not a named spec ({', '.join(named)}) nor a .toml file")
    unknown = sorted(set(data) - set(_SPEC_KEYS))
    if unknown:
        raise ConfigError(f"{where}: unknown key(s) {', '.join(unknown)}; a spec has {', '.join(_SPEC_KEYS)}")
    rows = []
    for i, raw in enumerate(data.get("rows") or []):
        bad = sorted(set(raw) - set(_ROW_KEYS))
        if bad or not raw.get("label") or not raw.get("model"):
            raise ConfigError(f"{where}: row {i + 1} needs label and model (and a sampler unless model = "
                              f"{DATA_ROW}); keys of a row: {', '.join(_ROW_KEYS)}"
                              + (f"; unknown: {', '.join(bad)}" if bad else ""))
        if raw["model"] != DATA_ROW and not raw.get("sampler"):
            raise ConfigError(f"{where}: row {raw['label']!r} names no sampler")
        rows.append(GridRow(label=str(raw["label"]), model=str(raw["model"]), sampler=str(raw.get("sampler", "")),
                            eta_cap_table=str(raw.get("eta_cap_table", "")),
                            steps=tuple(int(t) for t in raw.get("steps", ()))))
    if not rows:
        raise ConfigError(f"{where}: no [[rows]]")
    if len({r.label for r in rows}) != len(rows):
        raise ConfigError(f"{where}: two rows share a label")
    name = ref if ref in named else os.path.splitext(os.path.basename(ref))[0]
    return GridSpec(name=name, rows=tuple(rows), steps=tuple(int(t) for t in data.get("steps", ())),
                    steps_per_length=tuple(float(f) for f in data.get("steps_per_length", ())),
                    settings=tuple(table_overrides(data.get("settings") or {})), description=str(data.get("description", "")))


def parse_models(text: str) -> dict[str, str]:
    """``table.models`` → ``{role: model spec}``."""
    out = {}
    for part in (p.strip() for p in text.split(",") if p.strip()):
        role, sep, uri = part.partition("=")
        if not sep or not role or not uri:
            raise ConfigError(f"table.models={text}: expected role=<checkpoint>,... (e.g. mdlm=runs/mdlm-ft,"
                              f"dsl=runs/dsl-ft), got {part!r}")
        out[role.strip()] = uri.strip()
    return out


def row_checkpoint(row: GridRow, models: dict[str, str]) -> str:
    """The model spec a row samples from (``data`` for a data row)."""
    if row.model == DATA_ROW:
        return DATA_ROW
    if row.model in models:
        return models[row.model]
    if ":" in row.model or os.path.sep in row.model:
        return row.model
    raise ConfigError(f"row {row.label!r} samples from model {row.model!r}: give table.models={row.model}=<checkpoint>"
                      + (f" (given: {', '.join(models)})" if models else ""))


def settle_grid(cfg: JobConfig, named: frozenset[str]) -> None:
    """A named layout's settings go in where the command line is silent (one line on a conflict with a
    fixed setting of ``eval.protocol=paper-table1``)."""
    from dsl.config.parse import set_key, split_override

    spec = load_spec(cfg.table.spec)
    for word in spec.settings:
        key, raw = split_override(word)
        if key not in named:
            set_key(cfg, key, raw)
    if cfg.eval.protocol != "none":
        from dsl.eval.paper_protocol import PaperTable1

        PaperTable1().apply(cfg.eval, {k.removeprefix("eval.") for k in named if k.startswith("eval.")})
    import typing

    samplers = typing.get_args(typing.get_type_hints(SamplingConfig)["sampler"])
    for row in spec.rows:
        if row.sampler and row.sampler not in samplers:
            raise ConfigError(f"table.spec={cfg.table.spec}: row {row.label!r} has sampler {row.sampler!r}; "
                              f"samplers: {', '.join(samplers)}")


def check_grid(cfg: JobConfig) -> None:
    """Before anything is loaded or recorded: every row's model is named, MLflow is on."""
    models = parse_models(cfg.table.models)
    for row in load_spec(cfg.table.spec).rows:
        row_checkpoint(row, models)
    if cfg.service.mlflow == "off":
        raise ConfigError("service.mlflow=off: a grid records its cells in MLflow (that is how it resumes); "
                          "use service.mlflow=on or auto")


@dataclass
class Cell:
    row: GridRow
    checkpoint: str
    steps: int
    sampling: SamplingConfig
    run_id: str = ""          # set when complete in MLflow (skipped) or once its child run exists
    old_partial: list[str] = field(default_factory=list)


def plan_cells(spec: GridSpec, job: JobConfig, models: dict[str, str], length: int) -> list[Cell]:
    budgets = spec.budgets(length, job.table.steps)
    cells = []
    for row in spec.rows:
        ckpt = row_checkpoint(row, models)
        for steps in (row.steps or ([length] if row.model == DATA_ROW else budgets)):
            sampling = replace(job.sampling, steps=steps, length=length, num_samples=job.sampling.num_samples,
                               sampler=row.sampler or job.sampling.sampler,
                               eta_cap_table=row.eta_cap_table or job.sampling.eta_cap_table,
                               first_index=0, trajectory="", plot="")
            cells.append(Cell(row=row, checkpoint=ckpt, steps=steps, sampling=sampling))
    return cells


__all__ = ["DATA_ROW", "GridRow", "GridSpec", "Cell", "named_specs", "load_spec", "parse_models", "row_checkpoint",
           "settle_grid", "check_grid", "plan_cells"]
