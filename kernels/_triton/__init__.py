"""The Triton kernels of the ops, one module per op (``kernels/_triton/<op>.py``): the kernels,
their tile tables and their launchers. Each op module's ``IMPLEMENTATIONS["triton"]`` imports
its module here on the first call that runs it (a CUDA tensor, or a CPU tensor under
``TRITON_INTERPRET=1``); nothing here is public API.
"""
