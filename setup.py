from pathlib import Path

from setuptools import find_packages, setup

setup(
    name="contrast",
    version="0.1.0",
    description="Self-supervised visual representation learning: PIC and the methods it is compared with",
    long_description=Path(__file__).with_name("README.md").read_text(encoding="utf-8"),
    long_description_content_type="text/markdown",
    packages=find_packages(include=["contrast", "contrast.*"]),
    python_requires=">=3.9",
    install_requires=[
        "torch>=2.1",
        "torchvision>=0.16",
        "timm>=1.0",
        "numpy>=1.21",
        "pillow>=9.0",
        "termcolor>=2.0",
        "tensorboard>=2.10",
        "PyYAML>=5.1",
        "matplotlib>=3.5",
    ],
    extras_require={
        "test": ["pytest>=7.3", "pytest-timeout>=2.1", "matplotlib>=3.5", "scipy>=1.7", "scikit-learn>=1.0", "wandb>=0.15"],
        "tools": ["matplotlib>=3.5", "scikit-image>=0.19", "scikit-learn>=1.0"],
        "wandb": ["wandb>=0.15"],
        "umap": ["umap-learn>=0.5"],
    },
)
