"""Compatibility shims for benchmarking microsoft/unilm ``beit2/`` from a user's checkout
(``python -m bench.train_step --unilm-dir PATH``); none of the reference's code lives here."""
