"""``python -m beitv2_fast`` (and ``torchrun -m beitv2_fast``): the ``beitv2`` command."""

from .cli import main

raise SystemExit(main())
