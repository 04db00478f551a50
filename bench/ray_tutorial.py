"""The plain pattern of Ray's batch-inference tutorial ("Image Classification Batch Inference
with PyTorch ResNet"), turned into an embedding job: the baseline the pipeline is compared with.

read_images(mode="RGB") -> map(ToTensor + the weights' own transform, one row at a time)
-> map_batches(model class, one actor) -> write_parquet. ResNet50 with ``fc`` removed, the same
seeded random weights as the pipeline's timed runs, on CPU; nothing else tuned.

    python -m bench.ray_tutorial INPUT OUTPUT --batch-size 64
"""

from __future__ import annotations

import argparse
from typing import Any

import numpy as np
from torchvision import transforms
from torchvision.models import ResNet50_Weights

transform = transforms.Compose([transforms.ToTensor(), ResNet50_Weights.IMAGENET1K_V2.transforms()])


def preprocess_image(row: dict[str, Any]) -> dict[str, Any]:
    return {"transformed_image": transform(row["image"]).numpy()}


class ResnetModel:
    def __init__(self) -> None:
        import torch
        from torchvision.models import resnet50

        torch.manual_seed(0)
        self.model = resnet50(weights=None)
        self.model.fc = torch.nn.Identity()
        self.model.eval()

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        import torch

        with torch.inference_mode():
            features = self.model(torch.from_numpy(batch["transformed_image"]))
        return {"embedding": features.numpy()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("input")
    parser.add_argument("output")
    parser.add_argument("--batch-size", type=int, default=64)
    args = parser.parse_args()

    import ray

    (
        ray.data.read_images(args.input, mode="RGB")
        .map(preprocess_image)
        .map_batches(ResnetModel, concurrency=1, batch_size=args.batch_size)
        .write_parquet(args.output)
    )


if __name__ == "__main__":
    main()
