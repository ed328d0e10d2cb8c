"""Multi-Modal Moment Matching (M4) solvers: pure NumPy and cvxpy, no Beam, no torch.

The only place in balancebeam that holds optimisation math (see DESIGN.md, "M4").
"""

from solvers.api import solve
from solvers.bias import DataBias, data_bias
from solvers.compress import CompressedRows, compress
from solvers.errors import InfeasibleError
from solvers.max_rate import max_keep_rate
from solvers.problem import BalanceProblem
from solvers.spec import ConstraintSpec
from solvers.solution import BalanceSolution

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
