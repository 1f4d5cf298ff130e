"""memray-layers: product-key memory layers at scale, trained on Ray.

The import package is ``memray``; ``kernels/`` (Triton kernels and their pure-torch references,
importing only torch and triton) is installed as ``memray.kernels``, and ``jobs/`` (the Ray job
entrypoints that ``memray submit`` ships) as ``memray.jobs``.
"""

from setuptools import find_packages, setup

setup(
    name="memray-layers",
    version="0.1.0",
    description="Product-key memory layers (Memory Layers at Scale) trained on Ray with DeepSpeed",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    license="Apache-2.0",
    license_files=["LICENSE"],
    classifiers=[
        "Development Status :: 3 - Alpha",
        "License :: OSI Approved :: Apache Software License",
        "Intended Audience :: Science/Research",
        "Intended Audience :: Developers",
        "Operating System :: POSIX :: Linux",
        "Programming Language :: Python :: 3",
        "Programming Language :: Python :: 3.10",
        "Programming Language :: Python :: 3.11",
        "Programming Language :: Python :: 3.12",
        "Programming Language :: C++",
        "Topic :: Scientific/Engineering :: Artificial Intelligence",
    ],
    python_requires=">=3.10",
    packages=find_packages(include=["memray", "memray.*"]) + ["memray.kernels", "memray.jobs"],
    package_dir={"memray.kernels": "kernels", "memray.jobs": "jobs"},
    package_data={"memray": ["configs/*.yaml"], "memray.kernels": ["*.cpp"]},
    install_requires=[
        "torch>=2.13,<2.15",
        "triton>=3.6",  # 3.6: a lent GPU host's (make gpu-host-sim compiles and runs the kernels with it)
        "click>=8.1",
        "pyyaml>=6",
        "safetensors>=0.4",
        "tqdm>=4.66",
        "numpy",
    ],
    extras_require={
        "cluster": ["ray[default,train,data]==2.60.0", "deepspeed==0.19.8"],
        "storage": ["pyarrow==26.0.1", "zarr==3.1.6", "tokenizers"],
        "plots": ["matplotlib"],
        "tensorboard": ["tensorboard"],
        "hf": ["transformers>=4.45"],
        "test": ["pytest"],
    },
    entry_points={"console_scripts": ["memray=memray.cli:main"]},
)
