"""The sampling time grid and the step-budget remask cap η_cap(T) (Sec 5.2, 6.1, App C.2).

The paper prints three η_cap tables that disagree:

* Sec 6.1:  128→0.010, 256→0.008, 512→0.007, 1024→0.002   (our default);
* eq. 24:   128→0.010, 256→0.008, 512→0.007, 1024→0.004;
* Table 4:  128→0.010, 256→0.008, 512→0.008, 1024→0.002.

Table 5's mean rewrites per token are reproduced by ReMDM-loop with σ = η in the loop window and
R_i counted as remask events (0.5T loop steps × η × α_on): 0.576, 0.922, 1.613, 1.843 against the
printed 0.580, 0.925, 1.611, 1.849, i.e. by the **eq. 24** values; all three tables are shipped by name.

A schedule is loaded from ``''`` (the default), a built-in name (``sec6.1``, ``eq24``, ``table4``),
inline JSON, a JSON file or a storage URI (``s3://...``), holding either
``{"table": {"128": 0.01, ...}}`` (interpolated linearly in log T between entries, held constant
beyond the ends) or ``{"rule": {"form": "linear_log_t", "a": A, "b": B}}`` (η = A + B·ln T) or
``{"rule": {"form": "power", "a": A, "b": B}}`` (η = A·T^B); η is clipped at 0. Two optional keys say
where a schedule was measured: ``"length"`` (the sequence length L) and, for a rule, ``"budgets"``
([T_min, T_max] it was fitted on); the paper's tables are for OWT at L = 1024 (Sec 6.1).

Used outside what it was measured on — T beyond a table's ends (held at the end value), T beyond a
rule's fitted budgets (a fitted line in log T can cross zero, and η is then clipped to 0: no
remasking at all), or another L than it was measured at — a schedule still answers, and
:meth:`EtaCapSchedule.extrapolation` says so in one line that the outputs record.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field

import torch

from dsl.errors import UserError

PAPER_LENGTH = 1024  # the tables of Sec 6.1, eq. 24 and Table 4 are for OpenWebText at L = 1024
SEC61_TABLE = {128: 0.010, 256: 0.008, 512: 0.007, 1024: 0.002}
EQ24_TABLE = {128: 0.010, 256: 0.008, 512: 0.007, 1024: 0.004}
TABLE4_TABLE = {128: 0.010, 256: 0.008, 512: 0.008, 1024: 0.002}
BUILTIN_TABLES = {"sec6.1": SEC61_TABLE, "eq24": EQ24_TABLE, "table4": TABLE4_TABLE}
RULE_FORMS = ("linear_log_t", "power")

# Official ReMDM hyper-parameters (kuleshov-group/remdm scripts/remdm-cap.sh, remdm-loop.sh).
OFFICIAL_CAP_ETA = 0.008
OFFICIAL_LOOP = {"eta": 0.02, "t_on": 0.55, "t_off": 0.05, "alpha_on": 0.9}


def time_grid(steps: int, eps: float) -> torch.Tensor:
    """t_i = linspace(1, ε, T+1) (ReMDM's ``_sample``, ε = 1e-5); step i goes from t_i to s = t_{i+1}. (T+1,) float64."""
    return torch.linspace(1.0, eps, steps + 1, dtype=torch.float64)


@dataclass
class EtaCapSchedule:
    """η_cap(T): a table interpolated in log T, or a fitted rule. ``source`` says which, for outputs."""

    source: str
    table: dict[int, float] = field(default_factory=dict)
    rule: dict[str, float | str] = field(default_factory=dict)
    length: int | None = None                  # the sequence length L it was measured at, if known
    budgets: tuple[int, int] | None = None     # a rule's fitted range of T, if known

    def _rule_value(self, steps: int) -> float:
        a, b = float(self.rule["a"]), float(self.rule["b"])
        return a + b * math.log(steps) if self.rule["form"] == "linear_log_t" else a * steps ** b

    def __call__(self, steps: int) -> float:
        if steps < 1:
            raise ValueError(f"steps={steps} must be >= 1")
        if self.rule:
            return max(0.0, self._rule_value(steps))
        keys = sorted(self.table)
        if steps <= keys[0]:
            return self.table[keys[0]]
        if steps >= keys[-1]:
            return self.table[keys[-1]]
        hi = next(k for k in keys if k >= steps)
        lo = max(k for k in keys if k <= steps)
        if lo == hi:
            return self.table[lo]
        w = (math.log(steps) - math.log(lo)) / (math.log(hi) - math.log(lo))
        return max(0.0, (1 - w) * self.table[lo] + w * self.table[hi])

    def extrapolation(self, steps: int, length: int | None = None) -> str | None:
        """One line when η_cap(``steps``) at sequence length ``length`` lies outside what this schedule
        was measured on (see the module docstring), else None."""
        notes = []
        if self.rule:
            raw = self._rule_value(steps)
            if self.budgets and not self.budgets[0] <= steps <= self.budgets[1]:
                notes.append(f"T={steps} is outside the budgets T∈[{self.budgets[0]}, {self.budgets[1]}] the rule "
                             f"was fitted on")
            if raw < 0:
                notes.append(f"the rule gives η={raw:.3g} < 0, clipped to 0 (no remasking)")
        else:
            lo, hi = min(self.table), max(self.table)
            if not lo <= steps <= hi:
                notes.append(f"T={steps} is outside the table's T∈[{lo}, {hi}]: held at η={self(steps):g}, "
                             f"the T={lo if steps < lo else hi} entry")
        if self.length and length and length != self.length:
            notes.append(f"measured at L={self.length}, used at L={length}")
        if not notes:
            return None
        return f"η_cap(T={steps}) from {self.source} is extrapolated: " + "; ".join(notes)

    def to_dict(self) -> dict:
        where = {"length": self.length} if self.length else {}
        if self.rule:
            return {"rule": dict(self.rule), **where, **({"budgets": list(self.budgets)} if self.budgets else {})}
        return {"table": {str(k): v for k, v in sorted(self.table.items())}, **where}


def _read_spec_text(spec: str) -> str:
    if "://" in spec:
        from dsl.storage import open_storage  # the storage layer owns URI schemes (s3:// etc.)

        scheme_end = spec.index("://") + 3
        head, _, name = spec[scheme_end:].rpartition("/")
        try:
            return open_storage(spec[:scheme_end] + head).get_bytes(name).decode()
        except Exception as exc:  # noqa: BLE001 - any storage failure becomes one user line
            raise UserError(f"eta_cap_table={spec}: cannot read it ({exc})") from None
    if not os.path.isfile(spec):
        raise UserError(f"eta_cap_table={spec}: no such file; give '', one of {', '.join(BUILTIN_TABLES)}, "
                        "inline JSON, a JSON file or a URI")
    from dsl.utf8 import read_utf8

    return read_utf8(spec)


def parse_eta_cap(data: object, where: str) -> EtaCapSchedule:
    """Validate a decoded ``{"table": ...}`` or ``{"rule": ...}`` mapping."""
    accepted = ('{"table": {"128": 0.01, ...}} or {"rule": {"form": "linear_log_t", "a": ..., "b": ...}}, '
                'optionally with "length": L (and, for a rule, "budgets": [T_min, T_max])')
    if not isinstance(data, dict) or len({"table", "rule"} & set(data)) != 1 or \
            set(data) - {"table", "rule", "length", "budgets"} or ("budgets" in data and "table" in data):
        raise UserError(f"eta_cap_table={where}: expected {accepted}")
    length = data.get("length")
    if length is not None and (not isinstance(length, int) or isinstance(length, bool) or length < 1):
        raise UserError(f"eta_cap_table={where}: 'length' must be the sequence length L (an integer >= 1)")
    budgets = data.get("budgets")
    if budgets is not None:
        if (not isinstance(budgets, list) or len(budgets) != 2 or not all(isinstance(t, int) and t >= 1 for t in budgets)
                or budgets[0] > budgets[1]):
            raise UserError(f"eta_cap_table={where}: 'budgets' must be [T_min, T_max] with 1 <= T_min <= T_max")
        budgets = (budgets[0], budgets[1])
    if "table" in data:
        raw = data["table"]
        if not isinstance(raw, dict) or not raw:
            raise UserError(f"eta_cap_table={where}: 'table' must map step counts to η values")
        table: dict[int, float] = {}
        for k, v in raw.items():
            try:
                steps, eta = int(k), float(v)
            except (TypeError, ValueError):
                raise UserError(f"eta_cap_table={where}: entry {k!r}: {v!r} is not <int steps>: <float η>") from None
            if steps < 1 or not eta >= 0 or math.isinf(eta):
                raise UserError(f"eta_cap_table={where}: entry {k!r}: {v!r} needs steps >= 1 and finite η >= 0")
            table[steps] = eta
        return EtaCapSchedule(source=where, table=table, length=length)
    rule = data["rule"]
    if not isinstance(rule, dict) or rule.get("form") not in RULE_FORMS:
        raise UserError(f"eta_cap_table={where}: rule form must be one of {', '.join(RULE_FORMS)}")
    try:
        a, b = float(rule["a"]), float(rule["b"])
    except (KeyError, TypeError, ValueError):
        raise UserError(f"eta_cap_table={where}: rule needs numeric 'a' and 'b'") from None
    if not (math.isfinite(a) and math.isfinite(b)):
        raise UserError(f"eta_cap_table={where}: rule coefficients must be finite")
    return EtaCapSchedule(source=where, rule={"form": rule["form"], "a": a, "b": b}, length=length, budgets=budgets)


def load_eta_cap(spec: str = "") -> EtaCapSchedule:
    """η_cap(T) from ``spec`` (see the module docstring); ``source`` names what was used."""
    spec = (spec or "").strip()
    if not spec:
        return EtaCapSchedule(source="default:sec6.1", table=dict(SEC61_TABLE), length=PAPER_LENGTH)
    if spec in BUILTIN_TABLES:
        return EtaCapSchedule(source=f"builtin:{spec}", table=dict(BUILTIN_TABLES[spec]), length=PAPER_LENGTH)
    text = spec if spec.startswith("{") else _read_spec_text(spec)
    where = "inline" if spec.startswith("{") else spec
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise UserError(f"eta_cap_table={where}: not valid JSON ({exc.msg} at line {exc.lineno})") from None
    schedule = parse_eta_cap(data, where)
    if where == "inline":
        schedule.source = "inline:" + json.dumps(data, sort_keys=True)
    return schedule


__all__ = ["EtaCapSchedule", "load_eta_cap", "parse_eta_cap", "time_grid", "SEC61_TABLE", "EQ24_TABLE",
           "TABLE4_TABLE", "BUILTIN_TABLES", "OFFICIAL_CAP_ETA", "OFFICIAL_LOOP", "PAPER_LENGTH"]
