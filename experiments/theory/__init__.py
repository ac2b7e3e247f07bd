"""Numerical checks of the MBN paper's theory (Yong et al., ECCV 2020): Theorem 1 (the noise BN's batch
statistics carry), Theorem 2 (the regularizer that noise induces) and the noise of MBN's momentum statistics.

Each study is one command that writes JSON/CSV numbers and PNG figures into ``--out``::

    python -m experiments.theory.theorem1 --out outputs/experiments/theory/theorem1
    python -m experiments.theory.theorem2 --out outputs/experiments/theory/theorem2
    python -m experiments.theory.mbn_noise --out outputs/experiments/theory/mbn_noise
"""
