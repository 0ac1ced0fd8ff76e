from pathlib import Path

from setuptools import setup

setup(
    name="bnfast",
    version="0.1.0",
    description="Fused Triton kernels for BatchNorm (+ activation, + residual): drop-ins for "
    "torch.nn.BatchNorm1d/2d/3d and SyncBatchNorm",
    long_description=Path(__file__).with_name("README.md").read_text(encoding="utf-8"),
    long_description_content_type="text/markdown",
    license="MIT",
    python_requires=">=3.10",
    # kernels/ installs as bnfast.kernels: PyPI already has an unrelated top-level package named `kernels`.
    packages=["bnfast", "bnfast.kernels"],
    package_dir={"bnfast": "bnfast", "bnfast.kernels": "kernels"},
    # numpy: Triton's interpreter (TRITON_INTERPRET=1, how the kernels run on CPU) imports it, and torch warns
    # at import without it, yet neither package declares it.
    install_requires=["torch>=2.11", "triton>=3.6; platform_system == 'Linux'", "numpy"],
    extras_require={
        # hypothesis: the differential tests; timm and torchvision: the real-model tests (skipped without them)
        "test": ["pytest>=8", "pytest-benchmark>=4", "hypothesis>=6", "timm", "torchvision"],
        "examples": ["torchvision", "matplotlib", "tqdm"],
        "lint": ["ruff"],
    },
)
