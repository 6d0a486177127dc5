"""Evaluation of merged models: perplexity on held-out text, skill probes, and a verdict on the merge.

`mergesmith eval` and `mergesmith merge --eval` are built on `evaluate`; the verdict rules live in
`verdict.judge`, a pure function of the numbers.
"""

from mergesmith.eval.perplexity import perplexity, plan_windows, sequence_nll, text_perplexity
from mergesmith.eval.probes import Probe, load_probes, matches, score_probes
from mergesmith.eval.runner import EvalOptions, ModelSpec, evaluate, load_texts
from mergesmith.eval.table import EvalReport
from mergesmith.eval.verdict import DEGRADED, FAILED, OK, ModelScores, Verdict, judge

__all__ = [
    "DEGRADED", "FAILED", "OK", "EvalOptions", "EvalReport", "ModelScores", "ModelSpec", "Probe", "Verdict",
    "evaluate", "judge", "load_probes", "load_texts", "matches", "perplexity", "plan_windows", "score_probes",
    "sequence_nll", "text_perplexity",
]
