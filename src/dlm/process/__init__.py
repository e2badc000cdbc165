"""Processes: one file per family (loss, likelihood, samplers), registered by name.

``get_process(ProcessConfig(name=...), specials)`` builds one; importing this package registers them all.
"""

from dlm.process import ar, bd3lm, d3pm, mdlm, sedd  # noqa: F401  (registers the families)
from dlm.process.ar import ARProcess
from dlm.process.base import (
    AttnSpec,
    NLLResult,
    Process,
    ProcessConfig,
    SampleResult,
    SamplerOptions,
    SamplerSpec,
    available_processes,
    get_process,
    process_class,
    register_process,
)
from dlm.process.bd3lm import BD3LMProcess
from dlm.process.d3pm import D3PMProcess
from dlm.process.mdlm import MDLMProcess
from dlm.process.sampling import filter_logits, sample_categorical, sample_from_probs
from dlm.process.sedd import SEDDProcess

__all__ = [
    "ARProcess",
    "AttnSpec",
    "BD3LMProcess",
    "D3PMProcess",
    "MDLMProcess",
    "NLLResult",
    "Process",
    "ProcessConfig",
    "SEDDProcess",
    "SampleResult",
    "SamplerOptions",
    "SamplerSpec",
    "available_processes",
    "filter_logits",
    "get_process",
    "process_class",
    "register_process",
    "sample_categorical",
    "sample_from_probs",
]
