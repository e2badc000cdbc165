"""The comparison pipeline (``dlm compare``): every family over seeds on one budget, evaluated under one protocol.

``spec`` holds what a comparison is (``CompareSpec``, ``load_compare_spec``, ``arm_run_config``, ``spec_hash``);
``state`` the comparison directory (``open_compare_dir``: spec.yaml, compare.json, lock, run statuses).
"""

from dlm.compare.spec import (
    Arm,
    Budget,
    CompareSpec,
    Corpus,
    Evaluation,
    LikelihoodEval,
    SampleEval,
    SpeedEval,
    arm_run_config,
    available_compare_presets,
    dump_spec,
    known_families,
    load_compare_spec,
    spec_from_dict,
    spec_hash,
)
from dlm.compare.state import CompareDir, RunState, open_compare_dir, run_state

__all__ = [
    "Arm",
    "Budget",
    "CompareDir",
    "CompareSpec",
    "Corpus",
    "Evaluation",
    "LikelihoodEval",
    "RunState",
    "SampleEval",
    "SpeedEval",
    "arm_run_config",
    "available_compare_presets",
    "dump_spec",
    "known_families",
    "load_compare_spec",
    "open_compare_dir",
    "run_state",
    "spec_from_dict",
    "spec_hash",
]
