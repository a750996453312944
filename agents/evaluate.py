"""The evaluation loop of every exit policy: :mod:`ee_gym.evaluation` (the pipeline scores its
stages with it, and the core never imports this package); kept importable from here."""

from __future__ import annotations

from ee_gym.evaluation import EvalResult, evaluate, run_policy, score_predictions

__all__ = ["EvalResult", "evaluate", "run_policy", "score_predictions"]
