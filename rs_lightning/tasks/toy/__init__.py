"""Analytic toy tasks: rewards in closed form of the weights, so sweeps and theory can be checked exactly."""
