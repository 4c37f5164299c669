"""allcluster: leukemia blood-smear classifiers with explanations, on Slurm clusters with Ray.

Kept import-light on purpose: ``allcluster._bootstrap`` runs before anything is installed.
"""
__version__ = "0.1.0"
