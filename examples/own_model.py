"""Your own network on your own arrays: FedBABU with a model whose head is called ``classifier``.

The network below is ordinary PyTorch; ``head="classifier"`` tells fedbabu which layer is the final
linear classifier, which FedBABU keeps frozen at its random initialization during federated training.

    python examples/own_model.py [--rounds 20] [--out runs/examples/own-model]
"""

import argparse

import torch
from sklearn.datasets import load_digits
from torch import nn

import fedbabu


class SmallNet(nn.Module):
    """Two convolutions and a linear classifier for 8x8 grayscale digits."""

    def __init__(self, classes: int = 10) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(1, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(16, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU(), nn.MaxPool2d(2),
            nn.Flatten(),
        )
        self.classifier = nn.Linear(32 * 2 * 2, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--out", default="runs/examples/own-model")
    args = parser.parse_args()

    digits = load_digits()
    # Floats in [0, 1] become uint8 images; 20% of each class is held out as test data.
    data = fedbabu.from_arrays(digits.images / 16.0, digits.target)
    # Start from the embedded digits experiment and change what differs.
    config = fedbabu.load_config(extra={"algorithm": "fedbabu", "rounds": args.rounds, "eval_every": 5})
    # A function building the network: called with torch seeded from config.seed, so every client
    # starts from the same weights and another seed gives other initial weights.
    results = fedbabu.run(config, data=data, model=SmallNet, head="classifier", out=args.out, overwrite=True)

    print(f"initial accuracy {100 * results.initial_accuracy:.2f}%, "
          f"personalized {100 * results.personalized_accuracy:.2f}%")
    # FedBABU never trains the head: it is still the one SmallNet drew from the seed.
    torch.manual_seed(config.seed)
    untrained = SmallNet()
    frozen = torch.equal(untrained.classifier.weight, results.model.head.weight)
    print(f"head unchanged by federated training: {frozen}")
    trained = fedbabu.join_body_head(results.model)  # a SmallNet again, with the trained weights
    print(f"trained network: {type(trained).__name__}, run folder: {results.folder}")


if __name__ == "__main__":
    main()
