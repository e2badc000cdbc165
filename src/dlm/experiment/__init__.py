"""Experiments that chain the pipeline (prepare -> train -> sample -> evaluate) and write one result file.

``formal``: AR vs MDLM on a formal language, TER and SER against sampling steps (MDM theory paper, figure 1).
"""

from dlm.experiment.formal import FormalExperimentConfig, matched_speedup, run_formal_experiment

__all__ = ["FormalExperimentConfig", "matched_speedup", "run_formal_experiment"]
