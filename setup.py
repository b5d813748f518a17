"""crossfuse-fast: ``pip install .`` (or ``-e .``) installs ``crossfuse_fast`` with its
``reference`` and ``kernels`` subpackages mapped inside it from the top-level folders."""
from setuptools import setup

setup(
    name="crossfuse-fast",
    version="0.1.0",
    description="Fast, faithful CrossFuse infrared/visible image fusion (reference PyTorch + Triton)",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=["crossfuse_fast", "crossfuse_fast.fast", "crossfuse_fast.metrics", "crossfuse_fast.reference",
              "crossfuse_fast.kernels"],
    package_dir={
        "crossfuse_fast": "crossfuse_fast",
        "crossfuse_fast.reference": "reference",
        "crossfuse_fast.kernels": "kernels",
    },
    install_requires=[
        "torch>=2.4",
        "triton>=3.0; platform_system == 'Linux'",
        "numpy",
        "einops",
        "opencv-python-headless",
        "safetensors",
        "tqdm",
    ],
    extras_require={"export": ["onnx", "onnxruntime"], "metrics": ["pyrtools", "PyWavelets"],
                    "dev": ["pytest", "pytest-xdist", "pytest-benchmark", "matplotlib", "scikit-image", "scikit-learn", "scipy",
                            "onnx", "onnxruntime", "pyrtools", "PyWavelets"]},
    entry_points={"console_scripts": ["crossfuse = crossfuse_fast.cli:main"]},
)
