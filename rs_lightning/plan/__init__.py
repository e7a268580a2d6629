"""Experiment plans: the method described once (`spec`), run by a launcher (`launchers`: local, SLURM through
submitit, Ray), watched through a state file (`state`). The command is `rs run PLAN` (rs_lightning/commands/run.py).
"""
