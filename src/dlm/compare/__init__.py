"""The comparison pipeline (``dlm compare``): every family over seeds on one budget, evaluated under one protocol.

``spec`` holds what a comparison is (``CompareSpec``, ``load_compare_spec``, ``arm_run_config``, ``spec_hash``).
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

__all__ = [
    "Arm",
    "Budget",
    "CompareSpec",
    "Corpus",
    "Evaluation",
    "LikelihoodEval",
    "SampleEval",
    "SpeedEval",
    "arm_run_config",
    "available_compare_presets",
    "dump_spec",
    "known_families",
    "load_compare_spec",
    "spec_from_dict",
    "spec_hash",
]
