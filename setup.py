from setuptools import find_packages, setup


def requirements():
    with open("requirements.txt") as f:
        return [line.strip() for line in f if line.strip() and not line.startswith("#")]


setup(
    name="xright",
    version="0.1.0",
    description="SFT and preference post-training, jointly (ALRIGHT/MAXRIGHT), on DeepSpeed ZeRO",
    packages=find_packages(include=["xright", "xright.*"]),
    python_requires=">=3.10",
    install_requires=requirements(),
    extras_require={
        "flash": ["flash-attn>=2.5"],
        "plot": ["matplotlib"],
        "tensorboard": ["tensorboard"],
        "dev": ["pytest", "matplotlib", "tensorboard"],
        "bench": ["trl"],
        "vllm": ["vllm"],  # batch_inference --eval_task generate_vllm (CUDA GPU only)
    },
)
