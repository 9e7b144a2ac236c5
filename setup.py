"""Packaging for lxmert-engine: the LXMERT model (lxmert/), Triton ops (kernels/) and training (engine/).

The install is `bash scripts/setup.sh` (Python 3.10 to 3.13; it pins torch, triton and numpy and never replaces
an installed torch); the ranges here are the ones the code is known to work with.
"""

from setuptools import find_packages, setup

setup(
    name="lxmert-engine",
    version="0.1.0",
    description="A faithful, fast LXMERT vision-and-language model with Triton kernels and DeepSpeed training",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    packages=find_packages(include=["lxmert", "lxmert.*", "kernels", "kernels.*", "engine", "engine.*"]),
    # the BERT uncased vocabulary the tokenizer reads, and its licence note
    package_data={"lxmert": ["vocab/bert-base-uncased-vocab.txt", "vocab/NOTICE"]},
    python_requires=">=3.10",
    install_requires=[
        "torch>=2.4",
        # scripts/setup.sh pins 2.3.5 (2.2.6 on Python 3.10) on CPU machines: 2.4.x breaks triton 3.6's interpreter
        "numpy>=1.26",
        "triton>=3.2; platform_system=='Linux'",
        "tokenizers>=0.19",
        "safetensors>=0.4",
        "pyyaml",
        "tqdm",
        "matplotlib>=3.7",  # every picture: the run's plots, the attention pictures, the benchmark charts
    ],
    extras_require={
        "data": ["nvidia-dali-cuda130==2.4.0"],
        "flash": ["flash-attn"],
        # an sdist: install after torch with DS_BUILD_OPS=0 and --no-build-isolation
        "deepspeed": ["deepspeed==0.19.8"],
        "tensorboard": ["tensorboard"],  # engine.metrics_log writes its scalars when it is installed
        "dev": ["pytest", "transformers==5.17.0"],
    },
    entry_points={
        "console_scripts": [
            "lxmert-convert = engine.convert_checkpoint:main",
            "lxmert-pretrain = engine.pretrain:main",
            "lxmert-finetune = engine.finetune:main",
            "lxmert-data-convert = engine.data.convert:main",
            "lxmert-synthetic = engine.data.synthetic:main",
            "lxmert-plots = engine.plots:main",
            "lxmert-attention = engine.attention_pictures:main",
        ]
    },
)
