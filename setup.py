from setuptools import find_packages, setup

setup(
    name="fdlora-cluster",
    version="0.1.0",
    description="Personalized federated fine-tuning of LLMs with dual LoRA (FDLoRA), each client a DeepSpeed cluster",
    packages=find_packages(include=["fdlora_cluster", "fdlora_cluster.*"]),
    python_requires=">=3.10",
    install_requires=[
        "torch>=2.1",
        "deepspeed>=0.14",
        "transformers>=4.45",
        "peft>=0.13",
        "mpi4py>=3.1",
        "pyyaml>=6",
        "nevergrad>=1.0",
        "numpy",
        "safetensors",
        "matplotlib",
    ],
    extras_require={
        # An MPI for pip users; on clusters use the system MPI (module load) instead.
        "mpich": ["mpich"],
        # data.source: hf (local Hugging Face datasets); ~10 s to install, so the tests use it too.
        "hf": ["datasets>=2.14"],
        # log.tensorboard: TensorBoard event files without TensorFlow or tensorboard (numpy + protobuf);
        # W&B (log.wandb) and MLflow (log.mlflow) are installed by those who use them.
        "track": ["tensorboardX>=2.6"],
        # privacy: (client-level DP on the global adapter): Google's accountant; pure Python + scipy.
        "dp": ["dp-accounting>=0.4"],
        "test": ["pytest>=7", "pytest-timeout", "mpich", "hypothesis>=6", "datasets>=2.14", "tensorboardX>=2.6",
                 "dp-accounting>=0.4"],
    },
    entry_points={"console_scripts": ["fdlora-cluster=fdlora_cluster.cli:main"]},
)
