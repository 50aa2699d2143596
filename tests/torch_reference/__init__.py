"""Test-only PyTorch reference of NVlabs/edm's networks and pickle format.

NOT part of fdistill and never imported by it. ``edm_reference`` ports EDM's
``training/networks.py`` and ``persistence`` mimics ``torch_utils/persistence.py``;
both follow NVlabs/edm, which is licensed CC BY-NC-SA 4.0, and are kept here only
as a reference to test our JAX ports and the torch-free importer against.
"""
