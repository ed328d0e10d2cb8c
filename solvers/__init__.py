"""Multi-Modal Moment Matching (M4) solvers: pure NumPy and cvxpy, no Beam, no torch.

The only place in balancebeam that holds optimisation math (see DESIGN.md, "M4").
"""

import importlib

# The exported names and their modules, imported on the first use of any of them (PEP 562), so
# that `from solvers import progress` (every job's progress lines) does not load scipy.
_EXPORTS = {
    "solve": "solvers.api",
    "DataBias": "solvers.bias",
    "data_bias": "solvers.bias",
    "CompressedRows": "solvers.compress",
    "compress": "solvers.compress",
    "InfeasibleError": "solvers.errors",
    "max_keep_rate": "solvers.max_rate",
    "BalanceProblem": "solvers.problem",
    "ConstraintSpec": "solvers.spec",
    "BalanceSolution": "solvers.solution",
}


def __getattr__(name):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'solvers' has no attribute {name!r}")
    # All at once, as the eager imports did: loading the solvers.compress module sets this
    # package's `compress` to the module, and binding the names afterwards makes it the function.
    modules = {module: importlib.import_module(module) for module in set(_EXPORTS.values())}
    for export, module in _EXPORTS.items():
        globals()[export] = getattr(modules[module], export)
    return globals()[name]


__all__ = [
    "BalanceProblem",
    "BalanceSolution",
    "CompressedRows",
    "ConstraintSpec",
    "DataBias",
    "InfeasibleError",
    "compress",
    "data_bias",
    "max_keep_rate",
    "solve",
]
