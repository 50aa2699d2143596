"""The training loop (``loop.train``); train states are ``optim/state.py``'s, the jitted steps
``experiment.py``'s."""
