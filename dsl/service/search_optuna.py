"""Ray Tune's searcher for one step budget: Optuna's TPE proposes, Tune runs and schedules the trials.

:class:`StudySearcher` implements Tune's public ``Searcher`` hooks (``suggest``, ``on_trial_result``,
``on_trial_complete``) with Optuna's public ask-and-tell API on the budget's study, so what a trial
means to Optuna is decided here:

- each result reports the trial's score as an intermediate value at its ``training_iteration`` (its
  rung), so a trial ASHA stops keeps its last MAUVE-based score;
- a trial stopped before full fidelity (fewer than ``full_samples`` samples) is told as PRUNED, not as
  COMPLETE with a low-fidelity value, with ``samples``/``full_fidelity`` user attrs, so only
  full-fidelity trials can be chosen;
- the metrics a trial reports are kept as user attrs of its Optuna trial (the study is the record a
  resumed search reads back) and handed to ``on_record`` (MLflow, the progress bar).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import optuna
from optuna.trial import TrialState
from ray.tune.search import Searcher

METRIC = "score"

# the keys of a trial's result kept in the study (with every diag_* key)
RECORDED = {"score", "mauve", "mauve_std", "mean_rewrites", "band_distance", "genppl", "impossible", "entropy",
            "nfe", "samples"}


def _recorded(result: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in result.items() if k in RECORDED or k.startswith("diag_")}


class StudySearcher(Searcher):
    """Tune's searcher over the Optuna study ``name`` in ``storage`` (created if absent), with a TPE
    sampler seeded by ``sampler_seed`` whose first ``startup`` trials are random."""

    def __init__(self, space: dict[str, Any], storage: Any, name: str, sampler_seed: int, startup: int,
                 full_samples: int, steps: int, on_record: Callable[[dict[str, Any]], None]):
        super().__init__(metric=METRIC, mode="max")
        sampler = optuna.samplers.TPESampler(seed=sampler_seed, n_startup_trials=startup)
        self.study = optuna.create_study(storage=storage, study_name=name, direction="maximize",
                                         sampler=sampler, load_if_exists=True)
        self.space, self.full_samples, self.steps, self.on_record = space, full_samples, steps, on_record
        self.trials: dict[str, optuna.Trial] = {}

    def suggest(self, trial_id: str) -> dict[str, Any]:
        if trial_id not in self.trials:
            self.trials[trial_id] = self.study.ask(self.space)
        return dict(self.trials[trial_id].params)

    def on_trial_result(self, trial_id: str, result: dict[str, Any]) -> None:
        trial = self.trials.get(trial_id)
        if trial is not None and METRIC in result:
            trial.report(float(result[METRIC]), int(result["training_iteration"]))

    def on_trial_complete(self, trial_id: str, result: dict[str, Any] | None = None, error: bool = False) -> None:
        trial = self.trials.pop(trial_id, None)
        if trial is None:
            return
        ok = bool(result) and not error
        full = ok and int(result.get("samples", 0)) >= self.full_samples
        if ok:
            for key, value in _recorded(result).items():
                trial.set_user_attr(key, value)
            trial.set_user_attr("full_fidelity", full)
        if ok and full and METRIC in result:
            self.study.tell(trial, float(result[METRIC]))
            state = "COMPLETE"
        elif ok:
            # ASHA stopped it: PRUNED keeps its score as an intermediate value, not a final one
            self.study.tell(trial, state=TrialState.PRUNED)
            state = "PRUNED"
        else:
            self.study.tell(trial, state=TrialState.FAIL)
            state = "FAIL"
        if ok:
            self.on_record({**_recorded(result), **trial.params, "number": trial.number, "steps": self.steps,
                            "full_fidelity": full, "state": state})

    def save(self, checkpoint_path: str) -> None:
        # The RDB study is the record a resumed search continues from; Tune's experiment snapshot of
        # the searcher (which would hold the driver's callbacks) is not written.
        return None

    def restore(self, checkpoint_path: str) -> None:
        return None


__all__ = ["METRIC", "RECORDED", "StudySearcher"]
