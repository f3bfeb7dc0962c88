"""grok_torch: Grok-1 in PyTorch (converter, faithful model, Triton MoE kernels, expert parallelism).

`kernels/` and `convert/` install as `grok_torch.kernels` and `grok_torch.convert`: a top-level
package named `kernels` would clash with Hugging Face's `kernels` package.
"""
from setuptools import setup

setup(
    name="grok_torch",
    version="0.1.0",
    description="Grok-1 in PyTorch: JAX-free streaming converter, faithful model, Triton int8 MoE kernels",
    long_description=open("README.md").read() if __import__("os").path.exists("README.md") else "",
    long_description_content_type="text/markdown",
    license="Apache-2.0",
    python_requires=">=3.10",
    packages=["grok_torch", "grok_torch.kernels", "grok_torch.convert", "grok_torch.parallel", "grok_torch.finetune"],
    # Grok-1's tokenizer.model (Apache-2.0, from xai-org/grok-1) travels with the package: see README.
    package_data={"grok_torch": ["tokenizer.model"]},
    package_dir={"grok_torch": "grok_torch", "grok_torch.kernels": "kernels", "grok_torch.convert": "convert"},
    install_requires=[
        "torch==2.13.0",
        "triton==3.7.1",
        "safetensors>=0.4",
        "sentencepiece>=0.2",
        "accelerate>=1.0",
        "tqdm>=4.60",
        "numpy>=1.24",
    ],
    extras_require={"dev": ["pytest>=8"], "peft": ["peft>=0.17"]},
    entry_points={
        "console_scripts": [
            "grok-convert=grok_torch.convert.cli:main",
            "grok-generate=grok_torch.generate_cli:main",
            "grok-plan=grok_torch.plan:main",
            "grok-finetune=grok_torch.finetune.cli:main",
        ]
    },
)
