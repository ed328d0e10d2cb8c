"""Multi-Modal Moment Matching (M4) solvers: pure NumPy and cvxpy, no Beam, no torch.

The only place in balancebeam that holds optimisation math (see DESIGN.md, "M4").
"""
