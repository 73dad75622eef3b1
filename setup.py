from setuptools import find_packages, setup

setup(
    name="topk_ds",
    version="0.1.0",
    description="DeepSpeed training, conversion, evaluation and analysis of TopK language models",
    packages=find_packages(include=["topk_ds", "topk_ds.*"]),
    python_requires=">=3.10",
    # torch is installed first and pinned by the Makefile (a bare `pip install torch` pulls CUDA).
    install_requires=[
        "torch>=2.5",
        "deepspeed==0.19.8",
        "transformers==5.24.0",  # the cache API changed within 5.x; the exported model accepts both names
        "tokenizers>=0.22",
        "safetensors>=0.6",
        "sentencepiece>=0.2",
        "datasets>=4.0",
        "pyarrow>=15",
        "lm-eval[hf]==0.4.13",
        "numpy>=1.26",
        "pyyaml>=6",
        "tqdm>=4.66",
        "psutil>=5.9",  # available host memory, stated before analysis runs
        "matplotlib>=3.8",
        "wandb>=0.19",
        "tensorboard>=2.15",
        "eai-sparsify==1.3.3",  # the post-hoc SAEs the TopK LM is compared with (topk_ds/sae/library.py)
        "scipy>=1.11",  # the Hungarian matching of units across checkpoints and seeds
    ],
    extras_require={
        "mpi": ["openmpi", "mpi4py>=4"],
        # the interpretability tools our exports are tested with (tests/test_interop.py); sae-lens pulls
        # transformer-lens, plotly and statsmodels but changes none of our pins
        "test": ["pytest>=8", "openmpi", "mpi4py>=4", "nnsight==0.8.1", "sae-lens==6.54.12"],
        "dev": ["pytest>=8", "openmpi", "mpi4py>=4", "ruff"],
    },
    entry_points={"console_scripts": ["topk-ds=topk_ds.cli:main"]},
)
