"""Files and the terminal: checkpoints (orbax), metric and TensorBoard writers, the console, plots,
the workdir lock, EDM pickles. A regular package: without this file setup.py's find_packages
leaves fdistill.io out of a non-editable install."""
