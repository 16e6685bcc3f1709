"""Compatibility shims for benchmarking microsoft/unilm ``beit2/`` from a user's checkout
(``bench/train_step.py --unilm-dir PATH``); none of the reference's code lives here."""
